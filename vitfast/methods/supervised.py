"""Supervised baseline: a ViT trained from scratch (or fine-tuned from ``--init``) with cross-entropy.

Recipe of the paper preset: docs/methods.md §5.2 fine-tune recipe (Gani et al. 2022): label smoothing,
mixup / cutmix, random erasing, drop-path. Evaluation: accuracy of the classifier on val and test
(the final epoch's model: never selected on test).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch.nn.functional as F
from torch import Tensor

from ..config import setting
from ..data import augment
from ..data.regularizers import autoaugment, mix_batch, random_erasing
from .base import DataInfo, Method


@dataclass
class SupervisedConfig:
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy", within="[0, 1]")
    mixup: float = setting(0.0, "mixup Beta alpha (0 = off)", within="[0, inf)")
    cutmix: float = setting(0.0, "cutmix Beta alpha (0 = off)", within="[0, inf)")
    random_erasing: float = setting(0.0, "probability of erasing one rectangle per image", within="[0, 1]")
    autoaugment: bool = setting(False, "torchvision's CIFAR-10 AutoAugment policy (one draw per group of 8 images)")


class Supervised(Method):
    """A ViT trained with cross-entropy on the labels, from scratch or from --init (fine-tuning)."""

    name = "supervised"
    Config = SupervisedConfig
    random_init_baseline = False
    presets = {
        # A small ViT (96 wide, 4 blocks, patch 8 on 32-px images: 16 tokens) trained from scratch on
        # digits: about a minute on 2 CPU cores, ~92 % test accuracy.
        "quick": dict(model="tiny", embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0, patch_size=8,
                      epochs=100, batch_size=64, lr=1e-3, warmup_epochs=5, weight_decay=0.05,
                      label_smoothing=0.1, grad_clip=1.0),
        # docs/methods.md §5.2, fine-tune recipe of Gani et al. (2022): small-data ViT, AdamW lr 1e-3, wd 0.05,
        # 100 epochs, 10 warm-up, mixup/cutmix, label smoothing 0.1, random erasing 0.25, drop-path 0.1.
        "paper": dict(model="small_data", epochs=100, batch_size=128, lr=1e-3, warmup_epochs=10, weight_decay=0.05,
                      label_smoothing=0.1, mixup=0.8, cutmix=1.0, random_erasing=0.25, drop_path=0.1,
                      min_lr=1e-6, autoaugment=True),
    }

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
        c = self.config.method_config
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

    def classifier(self):
        return self.model

