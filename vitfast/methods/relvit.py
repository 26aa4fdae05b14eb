"""RelViT (Camporese, Izzo, Ballan, BMVC 2022; docs/methods.md §2): learn where patches are from their content.

Stages (one command runs ``upstream`` → ``finetune`` and the ``scratch`` baseline; ``--stage`` runs one):
  upstream  no positional embedding, RelViT's per-patch augmentation, relation CE + absolute-position CE
  finetune  the upstream encoder plus a new learned positional embedding, CE on CLS (full fine-tune)
  scratch   the finetune stage without the upstream init: the supervised baseline of the same budget
  joint     CE + relation + absolute-position losses together from scratch (run with --stage joint)
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch.nn.functional as F
from torch import Tensor

from ..data import augment
from ..eval.classification import classification_accuracy
from ..nn.relation_head import RelationHead
from .base import DataInfo, Method


class RelViT(Method):
    name = "relvit"
    stages = ("upstream", "finetune", "scratch")
    stage_init = {"finetune": "upstream"}  # a stage that starts from another stage's encoder
    all_stages = ("upstream", "finetune", "scratch", "joint")

    def __init__(self, config, data: DataInfo):
        super().__init__(config, data)
        stage = config.stage or "upstream"
        if stage not in self.all_stages:
            raise ValueError(f"relvit stage must be one of {self.all_stages}, got {stage!r}")
        self.stage = stage
        classify = stage != "upstream"
        self.model = self.build_encoder(num_classes=data.num_classes if classify else 0,
                                        pos_embed="none" if stage == "upstream" else "learned")
        self.head = None
        if stage in ("upstream", "joint"):
            self.head = RelationHead(self.model.embed_dim, self.model.grid_size[0],
                                     label_smoothing=config.label_smoothing if stage == "upstream" else 0.0)
        size = data.image_size
        if config.augment == "none":
            self.train_views = augment.eval_transform(size, data.mean, data.std)
        elif stage == "upstream":
            self.train_views = augment.relvit_upstream(size, data.mean, data.std, patch_size=self.model.patch_size)
        else:
            self.train_views = augment.supervised_train(size, data.mean, data.std)

    @property
    def encoder(self):
        return self.model

    def forward(self, images, labels, indices, generator) -> Tuple[Tensor, Dict[str, float]]:
        x = self.train_views(images, generator)
        tokens = self.model.forward_features(x)
        loss, metrics = 0.0, {}
        if self.head is not None:
            out = self.head(tokens[:, 1:])
            loss = out["loss"]
            metrics = {k: v.item() for k, v in out.items() if k != "loss"}
        if self.stage != "upstream":
            logits = self.model.forward_head(tokens)
            loss = loss + F.cross_entropy(logits, labels, label_smoothing=self.config.label_smoothing)
            metrics["train_accuracy"] = (logits.argmax(1) == labels).float().mean().item()
        return loss, metrics

    def evaluate(self, splits, transform, device, progress: bool) -> Dict:
        if self.stage == "upstream":
            return {}
        return classification_accuracy(self.model, splits, transform, device)
