"""LaCViT (Long et al., ICASSP 2024; docs/methods.md §4): label-aware contrastive training, then a classifier.

Stages (one command runs ``supcon`` → ``probe`` and the ``baseline``; ``--stage`` runs one):
  supcon    the whole encoder (from ``--init`` or from scratch) + projection head Linear(D, D) → ReLU →
            Linear(D, 128) → normalise, SupCon loss over the two views of ``augment.supcon_views`` (τ = 0.1,
            the τ/τ_base factor, the whole batch gathered over ranks as the pool)
  probe     the supcon encoder frozen (no gradient, eval mode) + BatchNorm without affine + a linear classifier
            (the evaluation's probe head) trained with CE on the un-augmented images: the released code's stage 2,
            and the default second stage (cheap, and a direct read-out of what stage 1 learned)
  finetune  the supcon encoder + a linear classifier, all trained with CE (what the paper calls stage 2);
            ``--stage finetune`` runs it from the sibling supcon folder (or ``--init RUN_DIR``)
  baseline  the finetune stage from random weights for as many epochs as supcon + probe together: the
            CE-trained baseline of the same budget
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import setting
from ..data import augment
from ..nn.contrastive import SupConLoss
from ..nn.heads import projection_head
from .base import DataInfo, Method


@dataclass
class LaCViTConfig:
    supcon_temperature: float = setting(0.1, "SupCon temperature tau (stage supcon)", within="(0, inf)")
    base_temperature: float = setting(0.07, "SupCon tau_base: the loss is multiplied by tau / tau_base",
                                     within="(0, inf)")
    projection_dim: int = setting(128, "output width of the SupCon projection head", within="[1, inf)")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy (stages probe, finetune, baseline)",
                                    within="[0, 1]")


def _stage_epochs(supcon: int, second: int, **extra) -> Dict[str, Dict]:
    """Per-stage values: the baseline trains for supcon + second-stage epochs (the same budget)."""
    return {"supcon": dict(epochs=supcon, metrics="knn,linear,clustering", **extra.get("supcon", {})),
            "probe": dict(epochs=second, metrics="", **extra.get("probe", {})),
            "finetune": dict(epochs=second, metrics="", **extra.get("finetune", {})),
            "baseline": dict(epochs=supcon + second, metrics="", **extra.get("baseline", {}))}


class LaCViT(Method):
    """Label-aware contrastive training (SupCon) of the whole encoder, then a classifier; with the CE baseline."""

    name = "lacvit"
    Config = LaCViTConfig
    presets = {
        # The quick supervised model (96 wide x 4 blocks, patch 8), mean-pooled features; supcon 40 epochs, then
        # the probe 10 epochs (lr 1e-2: 3e-3 tied on val and trained less far); the baseline gets 50 epochs of CE
        # from random weights.
        "quick": dict(model="tiny", embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0, patch_size=8, batch_size=64,
                      lr=1e-3, warmup_epochs=5, weight_decay=0.05, grad_clip=1.0, global_pool="avg",
                      stage_overrides=_stage_epochs(40, 10, probe=dict(lr=1e-2, warmup_epochs=1, weight_decay=0.0),
                                                    baseline=dict(label_smoothing=0.1),
                                                    finetune=dict(label_smoothing=0.1))),
        # docs/methods.md §4.2 and longkukuhi/LaCViT (readme.md commands; main_LaCViT.py, main_linear.py, main_ce.py,
        # utils/util.py, utils/losses.py, models/umae_cl.py), value by value: a pre-trained ViT-B/16 at 224 px (pass
        # its run with --init; the readme's MAE path loads mae_finetuned_vit_base.pth), drop-path 0.1 (every
        # script's --drop_path default), the mean of the patch tokens (--global_pool, default on in main_LaCViT.py and
        # main_linear.py); stage 1 (supcon): τ 0.1 (--temp 0.1), τ_base 0.07 (LaCViTLoss default; factor τ/τ_base),
        # head Linear(768, 768)-ReLU-Linear(768, 128) then normalise, 500 epochs, batch 4096 (--batch_size 128 x
        # --accum_iter 32: "the effective batch size"), no warm-up (--warm is off and only forced above a batch of
        # 256), per-epoch cosine to lr x (1e-4)^3 ~ 0 (--lr_decay_rate 1e-4: min_lr 0 here); stage 2 (probe, the
        # readme's main_linear.py): a linear classifier on the frozen encoder, 100 epochs, batch 128, no weight decay,
        # no warm-up, cosine to 0.2^3 = 0.8 % of its peak (min_lr 8e-6 for the peak 1e-3); the CE fine-tune
        # (main_ce.py readme command, here the finetune and baseline stages): batch 128, 100 epochs, no warm-up,
        # cosine to 0.8 % of its peak (min_lr 8e-7), no label smoothing.
        # Deliberate differences, with the reason:
        # - AdamW instead of SGD (official: SGD momentum 0.9, lr 1e-3 and weight decay 1e-4 in stage 1, lr 0.1 and no
        #   decay in the linear stage, lr 0.01 and 1e-4 in main_ce.py): the engine trains with AdamW only, whose step
        #   does not scale like SGD's, so the lrs are AdamW values of the usual ViT-B fine-tune (1e-4, wd 0.05) and
        #   linear-probe (1e-3) order, not tuned;
        # - the SupCon pool is the whole batch of 4096 (official: each micro-batch of 128 of the accumulated batch is
        #   its own pool, docs §4.3); for the release's pool size pass --batch-size 128 (then 32x the steps);
        # - the lr follows a per-step cosine (official: one value per epoch, utils/util.py adjust_learning_rate);
        # - the probe reads un-augmented images through BatchNorm without affine (official: random-resized crop
        #   (0.2, 1) + flip, a plain Linear): the evaluation's linear probe (docs §8.2);
        # - "avg" is the mean of the final-norm patch tokens (official: the mean, then MAE's fc_norm LayerNorm);
        # - finetune and baseline crop with 4-px padding + flip (official main_ce.py: random-resized crop (0.2, 1)
        #   + flip) and pool the mean (official main_ce.py: CLS, --global_pool off); the baseline trains from random
        #   weights for supcon + probe epochs (official: main_ce.py fine-tunes the pre-trained model for 100 epochs:
        #   `--method supervised --init`).
        "paper": dict(model="base", image_size=224, patch_size=16, batch_size=4096, lr=1e-4, warmup_epochs=0,
                      min_lr=0.0, weight_decay=0.05, drop_path=0.1, global_pool="avg", supcon_temperature=0.1,
                      base_temperature=0.07, projection_dim=128,
                      stage_overrides=_stage_epochs(500, 100,
                                                    probe=dict(batch_size=128, lr=1e-3, weight_decay=0.0, min_lr=8e-6),
                                                    finetune=dict(batch_size=128, lr=1e-4, min_lr=8e-7),
                                                    baseline=dict(batch_size=128, lr=1e-4, min_lr=8e-7))),
    }
    stages = ("supcon", "probe", "baseline")
    stage_init = {"probe": "supcon", "finetune": "supcon"}  # the second stage starts from the supcon encoder
    baselines = {"baseline": ("supcon", "probe")}  # the CE baseline trains as many epochs as these two together
    all_stages = ("supcon", "probe", "finetune", "baseline")
    accumulates = False  # SupCon's pool is the whole batch (docs/methods.md §4.3); the probe's BatchNorm sees it too

    def __init__(self, config, data: DataInfo):
        super().__init__(config, data)
        stage = self.stage_of(config)
        self.stage = stage
        s = config.method_config
        self.random_init_baseline = stage == "supcon"  # the other stages train with labels and report accuracy
        self.model = self.build_encoder(num_classes=0 if stage == "supcon" else data.num_classes)
        size = data.image_size
        self.projector = None
        if stage == "supcon":
            self.projector = projection_head(self.model.embed_dim, "simclr", out_dim=s.projection_dim)
            # The pool is the whole batch, gathered over ranks with gradient (docs/methods.md §4.3).
            self.criterion = SupConLoss(s.supcon_temperature, s.base_temperature, gather_distributed=True)
            self.train_views = augment.supcon_views(size, data.mean, data.std)
        elif stage == "probe":  # frozen features of the un-augmented images, as the evaluation's linear probe
            self.train_views = augment.eval_transform(size, data.mean, data.std)
        else:
            self.train_views = augment.supervised_train(size, data.mean, data.std)
        if config.augment == "none":
            self.train_views = augment.eval_transform(size, data.mean, data.std)
        if stage == "probe":  # only the classifier learns
            for name, param in self.model.named_parameters():
                param.requires_grad_(False)
            # BatchNorm without affine then Linear, as the evaluation's linear probe (docs/methods.md §8.2): it only
            # standardises the frozen features (and folds into the Linear at inference).
            self.model.head = nn.Sequential(nn.BatchNorm1d(self.model.embed_dim, affine=False), self.model.head)
            self.model.head.requires_grad_(True)

    @property
    def encoder(self):
        return self.model

    def train(self, mode: bool = True):
        """The probe's frozen encoder stays in eval mode (no drop-path or dropout) while its head trains."""
        super().train(mode)
        if self.stage == "probe":
            self.model.eval()
            self.model.head.train(mode)
        return self

    def forward(self, images, labels, indices, generator) -> Tuple[Tensor, Dict[str, float]]:
        s = self.config.method_config
        if self.stage == "supcon":
            views = self.train_views(images, generator)
            if not isinstance(views, list):  # augment == "none": two identical views
                views = [views, views]
            z1, z2 = (self.projector(self.model.forward_head(self.model.forward_features(v), pre_logits=True))
                      for v in views)
            return self.criterion(torch.stack([z1, z2], dim=1), labels), {}
        x = self.train_views(images, generator)
        if self.stage == "probe":
            with torch.no_grad():
                pooled = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
            logits = self.model.head(pooled)
        else:
            logits = self.model(x)
        loss = F.cross_entropy(logits, labels, label_smoothing=s.label_smoothing)
        return loss, {"train_accuracy": (logits.argmax(1) == labels).float().mean().item()}

    def classifier(self):
        return None if self.stage == "supcon" else self.model
