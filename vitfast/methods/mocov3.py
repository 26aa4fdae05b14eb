"""MoCo v3 (Chen, Xie, He 2021; docs/methods.md §7.2 and §3.2): a momentum teacher and symmetric InfoNCE.

    q¹ = pred(proj(f(x¹))), q² = pred(proj(f(x²)))         student: encoder f (encode_view), projector, predictor
    k¹ = proj_t(f_t(x¹)),   k² = proj_t(f_t(x²))             teacher: EMA of f and proj, no gradient
    loss = 2τ·InfoNCE(q¹, k²) + 2τ·InfoNCE(q², k¹),  τ = 0.2, keys gathered over ranks

The teacher's momentum follows a cosine schedule from ``momentum`` (0.99) to 1 over the run, one EMA update after
each optimizer step (``after_step``): the official code updates right before computing the keys of the next step,
with the same weights and the same m(step), so the two orders give the same numbers. The teacher encodes the clean
views itself (never through ``encode_view``), so DILEMMA's student-only input changes leave it untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from torch import Tensor

from .. import ops
from ..config import setting
from ..nn.heads import prediction_head, projection_head
from ..nn.momentum import MomentumTeacher, cosine_momentum
from .base import DataInfo
from .simclr import QUICK, TwoViewMethod, ViewSettings

__all__ = ["MoCoV3", "MoCoV3Config"]


@dataclass
class MoCoV3Config(ViewSettings):
    temperature: float = setting(0.2, "softmax temperature of the InfoNCE loss (the loss is multiplied by 2·tau)",
                                  within="(0, inf)")
    momentum: float = setting(0.99, "teacher EMA momentum at the start; it rises to 1 on a cosine schedule",
                               within="[0, 1]")
    proj_hidden_dim: int = setting(4096, "hidden width of the 3-layer projector", within="[1, inf)")
    proj_dim: int = setting(256, "output width of the projector (and the predictor)", within="[1, inf)")
    pred_hidden_dim: int = setting(4096, "hidden width of the 2-layer predictor", within="[1, inf)")
    random_patch_projection: bool = setting(False, "freeze the randomly initialised patch embedding (MoCo v3's "
                                                   "random patch projection)")


class MoCoV3(TwoViewMethod):
    """MoCo v3: predictor(projector(student)) against the momentum teacher's projections (Chen et al. 2021)."""

    name = "mocov3"
    Config = MoCoV3Config
    presets = {
        # SimCLR's quick values (simclr.QUICK: encoder, training, views), heads 256 wide.
        "quick": dict(QUICK, temperature=0.2, momentum=0.99, proj_hidden_dim=256, proj_dim=64, pred_hidden_dim=256),
        # docs/methods.md §7.2 / §3.2 and the release, value by value (facebookresearch/moco-v3: CONFIG.md's ViT
        # commands and published models, main_moco.py, moco/builder.py, vits.py, main_lincls.py): AdamW (β 0.9,
        # 0.999), lr 1.5e-4·batch/256, wd 0.1, 40 warm-up epochs then a half-cosine to 0 per step, 300 epochs, batch
        # 4096 (the published ViT models), τ 0.2 with the loss times 2τ, momentum 0.99 -> 1 on a per-step cosine
        # (--moco-m-cos), projector 3 layers 4096/256 and predictor 2 layers 4096 (BN after every bias-free Linear,
        # the last BN without affine), frozen random patch projection (--stop-grad-conv1), CLS pooling, crops
        # (0.08, 1) (--crop-min's default: the ViT commands keep it), flips, no drop-path, no gradient clipping; the
        # linear probe trains 90 epochs (main_lincls.py). Deliberate differences (official: value (file), why):
        # - encoder: official ViT-S/16, 384 wide x 12 blocks x 12 heads, MLP 4, on 224-px images (vits.py); here
        #   the small-data ViT (192 x 9, 12 heads, MLP 2, patch 4) on 32-px data: a /16 patch would leave 2x2 tokens.
        # - views: official BYOL's asymmetric pair, jitter (0.4, 0.4, 0.2, 0.1), blur p 1.0 / 0.1, solarize
        #   p 0 / 0.2 (main_moco.py augmentation1/2); here SimCLR's symmetric views, jitter strength 0.5 =
        #   (0.4, 0.4, 0.4, 0.1), no blur or solarize: TwoViewMethod.build_views has no setting for them (new code).
        # - weight decay: official on every parameter, biases, norms and cls_token included
        #   (main_moco.py: AdamW(model.parameters())); here not on biases, norms and tokens (Method.param_groups;
        #   a switch like MAE's decay_tokens would be new code).
        # - precision: official fp16 autocast + GradScaler (main_moco.py); fp32 here as in every preset (runs on
        #   CPU; pass --precision bf16 on a GPU).
        # - BatchNorm of the heads: official SyncBatchNorm over all processes (main_moco.py); here per process
        #   (identical on one process).
        # - init: official Xavier-uniform with Q, K and V bounded separately (vits.py); here on the joint qkv weight.
        # - warm-up: official lr·t/warmup from 0 at the first step (main_moco.py adjust_learning_rate); the shared
        #   engine's lr·(step+1)/warmup runs one step ahead.
        # - linear probe: official SGD lr 3·1024/256, batch 1024, no BN, cosine per epoch (main_lincls.py, CONFIG.md);
        #   here the shared protocol of docs/methods.md §8.2 (BN without affine, an lr grid selected on validation)
        #   so that every method is probed alike; only its length, 90 epochs, is the release's.
        "paper": dict(model="small_data", epochs=300, batch_size=4096, base_lr=1.5e-4, warmup_epochs=40,
                      weight_decay=0.1, betas=(0.9, 0.999), global_pool="token", temperature=0.2, momentum=0.99,
                      proj_hidden_dim=4096, proj_dim=256, pred_hidden_dim=4096, random_patch_projection=True,
                      min_crop_scale=0.08, jitter_strength=0.5, flip=True, probe_epochs=90),
    }

    def __init__(self, config, data: DataInfo):
        super().__init__(config, data)
        s = config.method_config
        if s.random_patch_projection:
            self.model.patch_embed.requires_grad_(False)
        self.projector = projection_head(self.model.embed_dim, "mocov3", hidden_dim=s.proj_hidden_dim,
                                         out_dim=s.proj_dim)
        self.predictor = prediction_head(s.proj_dim, "mocov3", hidden_dim=s.pred_hidden_dim)
        self.teacher = MomentumTeacher(self.student_parts())

    def student_parts(self) -> Dict[str, torch.nn.Module]:
        """The modules the teacher follows, by name (the teacher holds an EMA copy of each)."""
        return {"encoder": self.model, "projector": self.projector}

    def init_from(self, state, source: str):
        report = super().init_from(state, source)
        self.teacher.copy_from(self.student_parts())  # the teacher starts as the loaded student
        return report

    @torch.no_grad()
    def teacher_keys(self, x: Tensor) -> Tensor:
        """The teacher's projection of one clean view x [B, C, H, W]: [B, proj_dim], no gradient."""
        encoder = self.teacher["encoder"]
        return self.teacher["projector"](encoder.forward_head(encoder.forward_features(x), pre_logits=True))

    def infonce(self, q: Tensor, k: Tensor) -> Tensor:
        """2τ · InfoNCE(q, k): diagonal positives, keys gathered over ranks."""
        tau = self.config.method_config.temperature
        return ops.contrastive_loss(q, k, temperature=tau, positives="diagonal", scale=2 * tau,
                                    gather_distributed=True)

    def forward(self, images, labels, indices, generator) -> Tuple[Tensor, Dict[str, float]]:
        views = self.train_views(images, generator)
        (h1, h2), extra, metrics = self.encode_views(views, generator)
        q1, q2 = self.predictor(self.projector(h1)), self.predictor(self.projector(h2))
        k1, k2 = self.teacher_keys(views[0]), self.teacher_keys(views[1])
        infonce = self.infonce(q1, k2) + self.infonce(q2, k1)
        return infonce + extra, {"infonce": infonce.item(), **metrics}

    def after_step(self, step: int, total_steps: int) -> None:
        """EMA update with m(step): ``step`` optimizer steps are done (the official code's iteration ``step``)."""
        self.teacher.update(self.student_parts(),
                            cosine_momentum(step, total_steps, self.config.method_config.momentum))
