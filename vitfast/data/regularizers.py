"""Batch regularisers of the supervised / fine-tune recipe (docs/methods.md §5.2, Gani et al. 2022).

    images = autoaugment(images_uint8)                                   # before the float views
    x, soft_targets = mix_batch(x, one_hot, mixup=0.8, cutmix=1.0, generator=g)
    x = random_erasing(x, 0.25, g)                                       # after normalisation

Unlike the per-image steps of ``vitfast.data.augment`` these act on the batch as a whole (mixup and
cutmix pair each image with its mirror in the batch and mix the targets too), or on uint8 images
through torchvision (AutoAugment). Randomness comes from the run's ``generator`` (AutoAugment: from
torch's global RNG), which the checkpoints save: a resumed run draws the same numbers.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["mix_batch", "random_erasing", "autoaugment"]


def _draw_beta(alpha: float, generator: torch.Generator) -> float:
    """Beta(alpha, alpha), reproducible from the run's torch generator."""
    seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mix_batch(images: Tensor, targets: Tensor, mixup: float, cutmix: float, generator: torch.Generator
              ) -> Tuple[Tensor, Tensor]:
    """Mixup or cutmix (equal odds when both are on) of the batch with its reverse.

    images [B, C, H, W] float, targets [B, classes] (one-hot or soft); ``mixup`` / ``cutmix`` are the
    Beta alphas (0 = off). Returns the mixed images and soft targets [B, classes] (each row sums as its
    input did). With both off the inputs come back unchanged (the same tensors).
    """
    if mixup <= 0 and cutmix <= 0:
        return images, targets
    use_cutmix = cutmix > 0 and (mixup <= 0 or _draw_beta(1.0, generator) < 0.5)  # Beta(1, 1) is uniform
    lam = _draw_beta(cutmix if use_cutmix else mixup, generator)
    flipped = images.flip(0)
    if use_cutmix:
        height, width = images.shape[-2:]
        cut = (1 - lam) ** 0.5
        cy, cx = (int(v) for v in torch.randint(0, 1 << 30, (2,), generator=generator, device=generator.device))
        cy, cx = cy % height, cx % width
        y0, y1 = max(cy - int(height * cut) // 2, 0), min(cy + int(height * cut) // 2, height)
        x0, x1 = max(cx - int(width * cut) // 2, 0), min(cx + int(width * cut) // 2, width)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)  # the box was clipped: weight by the area it kept
    else:
        images = lam * images + (1 - lam) * flipped
    return images, lam * targets + (1 - lam) * targets.flip(0)


def random_erasing(images: Tensor, probability: float, generator: torch.Generator) -> Tensor:
    """Per sample, with ``probability``, one rectangle (2-33 % of the area, aspect 0.3-3.3) set to N(0, 1) noise.

    images [B, C, H, W] float (normalised, so N(0, 1) is the data's scale); returns a new tensor
    (the input itself when ``probability`` <= 0).
    """
    if probability <= 0:
        return images
    batch, _, height, width = images.shape
    device = images.device
    u = torch.rand(batch, 5, generator=generator, device=device)
    area = (0.02 + u[:, 0] * (1 / 3 - 0.02)) * height * width
    aspect = torch.exp(np.log(0.3) + u[:, 1] * (np.log(1 / 0.3) - np.log(0.3)))
    # Rounded (as torchvision's RandomErasing), not floored: flooring both sides shrank the mean erased area
    # below the uniform law's, by 7 % at 32 px and 15 % at 16 px.
    h = (area * aspect).sqrt().round().clamp(1, height)
    w = (area / aspect).sqrt().round().clamp(1, width)
    top = ((height - h + 1) * u[:, 2]).floor()
    left = ((width - w + 1) * u[:, 3]).floor()
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    inside = (rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1)) & \
             (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1))
    inside &= (u[:, 4] < probability).view(-1, 1, 1)
    noise = torch.randn(images.shape, generator=generator, device=device, dtype=images.dtype)
    return torch.where(inside.unsqueeze(1), noise, images)


def autoaugment(images: Tensor, group: int = 8) -> Tensor:
    """torchvision's CIFAR-10 AutoAugment policy on a uint8 batch [B, C, H, W] (returns uint8 [B, C, H, W]).

    torchvision draws one sub-policy per call, so the batch is cut into groups of ``group`` images that
    each get their own draw (per-image calls cost ~17 ms each on a CPU: too slow for training). Randomness
    comes from torch's global RNG, which the checkpoints save and restore.
    """
    from torchvision.transforms import v2

    policy = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    return torch.cat([policy(chunk) for chunk in images.split(group)])
