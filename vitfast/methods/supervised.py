"""Supervised baseline: a ViT trained from scratch (or fine-tuned from ``--init``) with cross-entropy.

Recipe of the paper preset: docs/methods.md §5.2 fine-tune recipe (Gani et al. 2022): label smoothing,
mixup / cutmix, random erasing, drop-path. Evaluation: accuracy of the classifier on val and test
(the final epoch's model: never selected on test).
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import augment
from .base import DataInfo, Method


def _draw_beta(alpha: float, generator: torch.Generator) -> float:
    """Beta(alpha, alpha), reproducible from the run's torch generator."""
    seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mix_batch(images: Tensor, targets: Tensor, mixup: float, cutmix: float, generator: torch.Generator
              ) -> Tuple[Tensor, Tensor]:
    """Mixup or cutmix (equal odds when both are on) of the batch with its reverse; soft targets [B, classes]."""
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
        lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)
    else:
        images = lam * images + (1 - lam) * flipped
    return images, lam * targets + (1 - lam) * targets.flip(0)


def random_erasing(images: Tensor, probability: float, generator: torch.Generator) -> Tensor:
    """Per sample, with ``probability``, one rectangle (2-33 % of the area, aspect 0.3-3.3) set to N(0, 1) noise."""
    if probability <= 0:
        return images
    batch, _, height, width = images.shape
    device = images.device
    u = torch.rand(batch, 5, generator=generator, device=device)
    area = (0.02 + u[:, 0] * (1 / 3 - 0.02)) * height * width
    aspect = torch.exp(np.log(0.3) + u[:, 1] * (np.log(1 / 0.3) - np.log(0.3)))
    h = (area * aspect).sqrt().clamp(1, height).floor()
    w = (area / aspect).sqrt().clamp(1, width).floor()
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
    """torchvision's CIFAR-10 AutoAugment policy on a uint8 batch [B, C, H, W].

    torchvision draws one sub-policy per call, so the batch is cut into groups of ``group`` images that
    each get their own draw (per-image calls cost ~17 ms each on a CPU: too slow for training). Randomness
    comes from torch's global RNG, which the checkpoints save and restore.
    """
    from torchvision.transforms import v2

    policy = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    return torch.cat([policy(chunk) for chunk in images.split(group)])


class Supervised(Method):
    name = "supervised"

    def __init__(self, config, data: DataInfo):
        super().__init__(config, data)
        self.model = self.build_encoder(num_classes=data.num_classes)
        size = data.image_size
        self.train_views = (augment.eval_transform(size, data.mean, data.std) if config.augment == "none"
                            else augment.supervised_train(size, data.mean, data.std))

    @property
    def encoder(self):
        return self.model

    def forward(self, images, labels, indices, generator) -> Tuple[Tensor, Dict[str, float]]:
        c = self.config
        if c.autoaugment:
            images = autoaugment(images)
        x = self.train_views(images, generator)
        targets = F.one_hot(labels, self.data.num_classes).to(x.dtype)
        x, targets = mix_batch(x, targets, c.mixup, c.cutmix, generator)
        x = random_erasing(x, c.random_erasing, generator)
        logits = self.model(x)
        loss = F.cross_entropy(logits, targets, label_smoothing=c.label_smoothing)
        accuracy = (logits.argmax(1) == labels).float().mean()
        return loss, {"train_accuracy": accuracy.item()}

    def evaluate(self, splits, transform, device, progress: bool) -> Dict:
        return classification_accuracy(self.model, splits, transform, device)


@torch.no_grad()
def classification_accuracy(model, splits, transform, device, batch_size: int = 512) -> Dict[str, float]:
    """Top-1 accuracy of a classifier on the val and test splits (the model as it is: no selection on test)."""
    model.eval()
    result = {}
    for split in ("val", "test"):
        data = splits[split]
        correct = 0
        for start in range(0, len(data.labels), batch_size):
            images = transform(data.images[start:start + batch_size].to(device))
            correct += (model(images).argmax(1).cpu() == data.labels[start:start + batch_size]).sum().item()
        result[f"{split}_accuracy"] = correct / max(1, len(data.labels))
    return result
