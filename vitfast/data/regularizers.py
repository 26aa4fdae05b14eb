"""Batch regularisers of the supervised / fine-tune recipe, as the small-data ViT release applies them
(docs/methods.md §5.2, Gani et al. 2022).

    images = autoaugment(images_uint8, "cifar10", g)                      # uint8, after crop and flip
    x = random_erasing(x, 0.25, fill=mean, generator=g)                   # normalised float, before mixing
    x, soft_targets = mix_batch(x, one_hot, mixup=1.0, cutmix=1.0, generator=g, probability=0.5)

``mix_batch`` acts on the batch as a whole (each image is paired with a random permutation of the
batch, the targets are mixed too); ``random_erasing`` draws one box per image; ``autoaugment`` is
``vitfast.data.autoaugment`` (one sub-policy per image, batched by operation). Every draw comes from
the run's ``generator``, which the checkpoints save: a resumed run draws the same numbers.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .autoaugment import autoaugment

__all__ = ["mix_batch", "random_erasing", "autoaugment"]


def _draw_beta(alpha: float, generator: torch.Generator) -> float:
    """Beta(alpha, alpha), reproducible from the run's torch generator."""
    seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, device=generator.device))


def mix_batch(images: Tensor, targets: Tensor, mixup: float, cutmix: float, generator: torch.Generator,
              probability: float = 1.0) -> Tuple[Tensor, Tensor]:
    """With ``probability`` per batch, mixup or cutmix (equal odds when both are on) with a permutation of the batch.

    images [B, C, H, W] float, targets [B, classes] (one-hot or soft); ``mixup`` / ``cutmix`` are the
    Beta alphas (0 = off). The partner of image i is image perm[i], perm = randperm(B) from ``generator``.
    Cutmix: lam ~ Beta(a, a), a box of side sqrt(1 − lam)·(H, W) centred on a uniform pixel, clipped,
    lam recomputed from the area kept. Returns the images and soft targets lam·t + (1 − lam)·t[perm];
    an unmixed batch (both off, or the draw >= ``probability``) comes back unchanged (the same tensors).
    Draw order (fixed, so runs replay): mix?, cutmix-or-mixup?, lam, perm, box centre.
    """
    if mixup <= 0 and cutmix <= 0:
        return images, targets
    if probability < 1 and _uniform(generator) >= probability:
        return images, targets
    use_cutmix = cutmix > 0 and (mixup <= 0 or _uniform(generator) < 0.5)
    lam = _draw_beta(cutmix if use_cutmix else mixup, generator)
    perm = torch.randperm(images.shape[0], generator=generator, device=generator.device).to(images.device)
    partner = images[perm]
    if use_cutmix:
        height, width = images.shape[-2:]
        cut = (1 - lam) ** 0.5
        cy, cx = (int(v) for v in torch.randint(0, 1 << 30, (2,), generator=generator, device=generator.device))
        cy, cx = cy % height, cx % width
        y0, y1 = max(cy - int(height * cut) // 2, 0), min(cy + int(height * cut) // 2, height)
        x0, x1 = max(cx - int(width * cut) // 2, 0), min(cx + int(width * cut) // 2, width)
        images = images.clone()
        images[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)  # the box was clipped: weight by the area it kept
    else:
        images = lam * images + (1 - lam) * partner
    return images, lam * targets + (1 - lam) * targets[perm.to(targets.device)]


def random_erasing(images: Tensor, probability: float, generator: torch.Generator, *,
                   fill: Optional[Sequence[float]] = None, area=(0.02, 0.4), ratio: float = 0.3,
                   tries: int = 100) -> Tensor:
    """Per image, with ``probability``, one box set to ``fill`` (Zhong et al. 2020, as the release runs it).

    images [B, C, H, W] float (normalised). Up to ``tries`` draws of area uniform in ``area``·H·W and aspect
    h/w uniform in (``ratio``, 1/``ratio``), h = round(sqrt(area·aspect)), w = round(sqrt(area/aspect)); the
    first with h < H and w < W is placed uniformly (top in [0, H − h], left in [0, W − w]); no box fits:
    unchanged. ``fill``: one value per channel written as it is (the release writes the dataset's mean in
    [0, 1] units into the normalised image); None: 0. Returns a new tensor (the input when ``probability`` <= 0).
    """
    if probability <= 0:
        return images
    batch, channels, height, width = images.shape
    device = images.device
    u = torch.rand(batch, 2 * tries + 3, generator=generator, device=device)
    target = (area[0] + u[:, :tries] * (area[1] - area[0])) * height * width
    aspect = ratio + u[:, tries:2 * tries] * (1 / ratio - ratio)
    h = (target * aspect).sqrt().round()
    w = (target / aspect).sqrt().round()
    fits = (h < height) & (w < width)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    top = ((height - h + 1) * u[:, -3]).floor()
    left = ((width - w + 1) * u[:, -2]).floor()
    erase = (u[:, -1] < probability) & fits.any(1)
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    inside = (rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1)) & \
             (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1)) & erase.view(-1, 1, 1)
    values = torch.zeros(channels, device=device, dtype=images.dtype) if fill is None else \
        torch.tensor([float(v) for v in fill], device=device, dtype=images.dtype)
    if values.numel() != channels:
        raise ValueError(f"random_erasing: fill needs {channels} values (one per channel), got {len(values)}")
    return torch.where(inside.unsqueeze(1), values.view(1, -1, 1, 1).expand_as(images), images)
