"""Supervised baseline: a ViT trained from scratch (or fine-tuned from ``--init``) with cross-entropy.

Recipe of the paper preset: docs/methods.md §5.2 fine-tune recipe (Gani et al. 2022): label smoothing,
mixup / cutmix, random erasing, drop-path. Evaluation: accuracy of the classifier on val and test
(the final epoch's model: never selected on test).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch.nn.functional as F
from torch import Tensor

from ..data import augment
from ..data.regularizers import autoaugment, mix_batch, random_erasing
from ..eval.classification import classification_accuracy
from .base import DataInfo, Method


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

