"""SimCLR (Chen et al. 2020; docs/methods.md §7.1): two augmented views, projection head, NT-Xent.

    loss = NT-Xent(g(f(x¹)), g(f(x²)))      f: the ViT's pooled feature, g: projection head "simclr"

``TwoViewMethod`` is what SimCLR and MoCo v3 (vitfast/methods/mocov3.py) share, and what DILEMMA builds on:
the encoder, the two training views, and ``encode_view`` — the one place every student encoder pass goes
through. A subclass may override ``encode_view`` (DILEMMA: sparse, position-corrupted input plus a detection
loss); the mean over the views of its extra losses is added to the method's loss, and its metrics are logged
(averaged over the views).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from .. import ops
from ..config import setting
from ..data import augment
from ..nn.heads import projection_head
from .base import DataInfo, Method

__all__ = ["TwoViewMethod", "ViewSettings", "SimCLR", "SimCLRConfig"]


class TwoViewMethod(Method):
    """The encoder (``self.model``), two training views, and the student's pass over one view (``encode_view``).

    The settings dataclass of a subclass extends ``ViewSettings``.
    """

    accumulates = False  # in-batch negatives (and BatchNorm in the heads): a micro-batch is a smaller pool

    def __init__(self, config, data: DataInfo):
        super().__init__(config, data)
        # MoCo v3's ViT (Chen et al. 2021; also its SimCLR-ViT baselines): fixed 2-D sin-cos position embedding,
        # Xavier-uniform weights (the "mae" init), for SimCLR and MoCo v3 alike.
        self.model = self.build_encoder(pos_embed="sincos", weight_init="mae")
        self.train_views = self.build_views()

    def build_views(self) -> augment.MultiView:
        """SimCLR's two views (random-resized crop, flip unless ``flip`` is off, colour jitter of strength s:
        (0.8s, 0.8s, 0.8s, 0.2s) with p 0.8, grayscale p 0.2); with ``augment="none"`` two copies of the
        evaluation transform."""
        data, s = self.data, self.config.method_config
        if self.config.augment == "none":
            return augment.MultiView([augment.eval_transform(data.image_size, data.mean, data.std)], [2], name="none")
        strength = s.jitter_strength
        views = augment.simclr_views(data.image_size, data.mean, data.std, scale=(s.min_crop_scale, 1.0),
                                     jitter=(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength))
        if not s.flip:  # e.g. digits, where a mirrored image is another symbol
            for pipeline in views.pipelines:
                pipeline.steps = [step for step in pipeline.steps if step.name != "horizontal_flip"]
        return views

    @property
    def encoder(self):
        return self.model

    def encode_view(self, x: Tensor, generator: torch.Generator) -> Tuple[Tensor, Tensor, Dict[str, float]]:
        """The student's pass over one view x [B, C, H, W]: (pooled features [B, D], extra loss [] (0 here), metrics).

        Every student encoder pass goes through here; DILEMMA overrides it. A teacher never does."""
        pooled = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return pooled, pooled.new_zeros(()), {}

    def encode_views(self, views: Sequence[Tensor], generator: torch.Generator
                     ) -> Tuple[List[Tensor], Tensor, Dict[str, float]]:
        """``encode_view`` on each view: ([features per view], mean of the extra losses, metrics averaged over
        the views)."""
        features, extras, sums = [], [], {}
        for x in views:
            pooled, extra, metrics = self.encode_view(x, generator)
            features.append(pooled)
            extras.append(extra)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        return features, torch.stack(extras).mean(), {k: v / len(views) for k, v in sums.items()}


@dataclass
class ViewSettings:
    """The settings of ``TwoViewMethod.build_views``; the settings dataclasses of SimCLR and MoCo v3 extend it."""

    min_crop_scale: float = setting(0.08, "smallest area fraction of the random-resized crops", within="(0, 1]")
    jitter_strength: float = setting(0.5, "colour-jitter strength s: (0.8s, 0.8s, 0.8s, 0.2s) with p 0.8",
                                     within="[0, inf)")
    flip: bool = setting(True, "random horizontal flips in the views")


# What the quick presets of SimCLR and MoCo v3 share: the MAE quick encoder (96 wide x 4 blocks, patch 8), mean-pooled,
# on digits, and the values chosen by tuning runs on digits (crops (0.3, 1) with flips reached ~79 % k-NN after 20
# epochs; crops (0.5, 1) without flips (a mirrored digit is another symbol) ~89 % after 10; batch 64 beat 128 at
# equal epochs).
QUICK = dict(model="tiny", embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0, patch_size=8, epochs=40, batch_size=64,
             lr=1e-3, warmup_epochs=4, weight_decay=0.05, global_pool="avg", min_crop_scale=0.5, jitter_strength=0.5,
             flip=False)


@dataclass
class SimCLRConfig(ViewSettings):
    temperature: float = setting(0.5, "softmax temperature of the contrastive loss", within="(0, inf)")
    proj_hidden_dim: int = setting(0, "hidden width of the projection head (0 = the encoder's width)",
                                   within="[0, inf)")
    proj_dim: int = setting(128, "output width of the projection head", within="[1, inf)")


class SimCLR(TwoViewMethod):
    """SimCLR: NT-Xent between the projections of two augmented views (Chen et al. 2020)."""

    name = "simclr"
    Config = SimCLRConfig
    presets = {
        "quick": dict(QUICK, temperature=0.2, proj_hidden_dim=256, proj_dim=64),
        # docs/methods.md §7.1: SimCLR's released CIFAR-10 recipe (google-research/simclr: README.md's pretraining
        # and linear-eval commands, run.py, model_util.py, data_util.py) on a ViT, value by value: batch 512, 1000
        # epochs, 10 warm-up epochs (run.py's default) then a cosine to 0 per step, temperature 0.5 on normalised
        # projections, projection to 128 with hidden width = the encoder's, crops (0.08, 1) with aspect (3/4, 4/3),
        # flips, colour jitter of strength 0.5 = (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2, no blur
        # (--use_blur=False), weight decay not on biases and norms; the linear eval trains 100 epochs.
        # Deliberate differences (official: value (file), why):
        # - encoder: official ResNet-18 (README.md --resnet_depth=18); here the small-data ViT (192 x 9, patch 4,
        #   CLS pooling) on 32-px data: vitfast trains ViTs (SimCLR in the ViT form the MoCo v3 paper compares).
        # - optimizer: official LARS, momentum 0.9, lr 1.0·512/256 = 2.0, wd 1e-4 (README.md; 1e-6 in the first
        #   release's README) (run.py, lars_optimizer.py); here AdamW lr 1.5e-4·batch/256, wd 0.1, MoCo v3's released
        #   ViT optimizer (facebookresearch/moco-v3 CONFIG.md): vitfast has no LARS (new code), and the MoCo v3
        #   paper's SimCLR-ViT baseline has no released script (its lr / wd search is only reported in the paper).
        # - projection head: official Linear(D, D) + BN + ReLU, Linear(D, 128) + BN (model_util.py projection_head;
        #   run.py's SimCLRv2 default num_proj_layers=3 adds a third such layer); here SimCLR v1's paper head,
        #   2 layers with biases and no BN (nn/heads.py "simclr"): a BN option would be new code.
        # - patch projection: the MoCo v3 paper's framework comparison also freezes SimCLR's random patch
        #   projection; SimCLR here trains it (no setting: new code; MoCo v3's random_patch_projection is one).
        # - warm-up: official lr·step/warmup from 0 at the first step (model_util.py learning_rate_schedule); the
        #   shared engine's lr·(step+1)/warmup runs one step ahead.
        # - linear eval: official SGD momentum, lr 0.1·512/256, wd 0, batch 512, no warm-up (README.md); here the
        #   shared protocol of docs/methods.md §8.2 (BN without affine, an lr grid selected on validation) so that
        #   every method is probed alike; only its length, 100 epochs, is the release's.
        "paper": dict(model="small_data", epochs=1000, batch_size=512, base_lr=1.5e-4, warmup_epochs=10,
                      weight_decay=0.1, betas=(0.9, 0.999), global_pool="token", temperature=0.5, proj_hidden_dim=0,
                      proj_dim=128, min_crop_scale=0.08, jitter_strength=0.5, flip=True, probe_epochs=100),
    }

    def __init__(self, config, data: DataInfo):
        super().__init__(config, data)
        s = config.method_config
        self.projector = projection_head(self.model.embed_dim, "simclr", out_dim=s.proj_dim,
                                         hidden_dim=s.proj_hidden_dim or None)

    def forward(self, images, labels, indices, generator) -> Tuple[Tensor, Dict[str, float]]:
        views = self.train_views(images, generator)
        (h1, h2), extra, metrics = self.encode_views(views, generator)
        ntxent = ops.contrastive_loss(self.projector(h1), self.projector(h2),
                                      temperature=self.config.method_config.temperature, positives="ntxent",
                                      gather_distributed=True)
        return ntxent + extra, {"ntxent": ntxent.item(), **metrics}
