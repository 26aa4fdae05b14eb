"""DINO's projection head and loss module (Caron et al. 2021; the small-data recipe of docs/methods.md §5.1).

    head = DINOHead(192)                                   # 192 -> 512 -> 512 -> 256, L2-normalised; K = 1024
    criterion = DINOLoss(1024, n_student_views=10)         # centre buffer, teacher-temperature warm-up
    z_s = head(student_pooled)                             # [10·B, 256] unit rows (views grouped, globals first)
    z_t = teacher_head(teacher_pooled)                     # [2·B, 256]  (no gradient)
    loss = criterion(z_s, z_t, head.prototypes, teacher_head.prototypes, epoch=1.5)

The head's last layer (weight-normalised Linear(bottleneck, K) without bias, its norm fixed to 1: DINO's
``norm_last_layer``) is the Parameter ``prototypes`` [K, bottleneck] (the v of the weight norm). It is never applied
as a dense layer in training: ``vitfast.ops.dino_loss`` fuses it with the softmaxes and never forms the [V·B, K]
logits. ``DINOHead.logits`` forms them, for inspection only.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .heads import MLPHead
from .loss_state import MomentumCentre

__all__ = ["DINOHead", "DINOLoss"]


class DINOHead(nn.Module):
    """MLP in_dim → hidden → … → bottleneck (GELU, ``num_layers`` Linear layers), L2 normalisation; plus the
    weight-normalised prototypes [n_prototypes, bottleneck] of the last layer. ``forward``: [N, in_dim] -> [N,
    bottleneck] unit rows."""

    def __init__(self, in_dim: int, hidden_dim: int = 512, bottleneck_dim: int = 256, n_prototypes: int = 1024,
                 num_layers: int = 3):
        super().__init__()
        if not isinstance(n_prototypes, int) or isinstance(n_prototypes, bool) or n_prototypes < 1:
            raise ValueError(f"DINOHead: n_prototypes must be a positive int, got {n_prototypes!r}")
        self.mlp = MLPHead(in_dim, hidden_dim, bottleneck_dim, num_layers=num_layers, batch_norm=False,
                           activation="gelu")
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):  # DINO's head init: truncated normal std 0.02, zero bias
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        # v of the last layer; nn.Linear's default init (DINO keeps it; only the direction of each row matters).
        bound = 1.0 / math.sqrt(bottleneck_dim)
        self.prototypes = nn.Parameter(torch.empty(n_prototypes, bottleneck_dim).uniform_(-bound, bound))

    @property
    def n_prototypes(self) -> int:
        return self.prototypes.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.mlp(x), dim=-1)

    def logits(self, x: Tensor) -> Tensor:
        """The last layer applied densely, [N, in_dim] -> [N, K]: for inspection (training uses ops.dino_loss)."""
        return self(x) @ F.normalize(self.prototypes, dim=1).T


class DINOLoss(nn.Module):
    """DINO's cross-entropy between the sharpened, centred teacher and the student (``vitfast.ops.dino_loss``),
    with the centre (``MomentumCentre``, a buffer: saved with the state_dict, averaged over ranks) and the teacher
    temperature's linear warm-up. In training mode each call updates the centre after computing the loss."""

    def __init__(self, n_prototypes: int, n_student_views: int, n_teacher_views: int = 2, student_temp: float = 0.1,
                 teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 10,
                 centre_momentum: float = 0.9, backend: Optional[str] = None):
        super().__init__()
        for name, value in (("teacher_temp", teacher_temp), ("warmup_teacher_temp", warmup_teacher_temp),
                            ("student_temp", student_temp)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"DINOLoss: {name} must be a number > 0, got {value!r}")
        if not isinstance(warmup_teacher_temp_epochs, int) or warmup_teacher_temp_epochs < 0:
            raise ValueError(f"DINOLoss: warmup_teacher_temp_epochs must be an int >= 0, "
                             f"got {warmup_teacher_temp_epochs!r}")
        self.n_student_views, self.n_teacher_views = n_student_views, n_teacher_views
        self.student_temp, self.teacher_temp = float(student_temp), float(teacher_temp)
        self.warmup_teacher_temp, self.warmup_epochs = float(warmup_teacher_temp), warmup_teacher_temp_epochs
        self.centre = MomentumCentre(n_prototypes, centre_momentum)
        self.backend = backend  # ops.dino_loss's backend (None: the default for the device)

    def teacher_temp_at(self, epoch: float) -> float:
        """DINO's schedule, linspace(warmup, teacher_temp, W) at integer epochs (teacher_temp from epoch W − 1 on),
        linear in between for a fractional epoch; W ≤ 1: the warm-up value for epoch < W, then teacher_temp."""
        start, end, w = self.warmup_teacher_temp, self.teacher_temp, self.warmup_epochs
        if w <= 1:
            return start if epoch < w else end
        return start + (end - start) * min(1.0, max(0.0, epoch) / (w - 1))

    def forward(self, student_features: Tensor, teacher_features: Tensor, prototypes: Tensor,
                teacher_prototypes: Tensor, epoch: float) -> Tensor:
        """student [Vs·B, d], teacher [Vt·B, d] (views grouped, as ops.dino_loss), prototypes / teacher_prototypes
        [K, d] (the v of the weight norms); epoch: the training epoch (0-based, may be fractional). Returns the
        loss []."""
        loss, teacher_mean = ops.dino_loss(student_features, teacher_features, prototypes, self.centre.centre,
                                           n_student_views=self.n_student_views,
                                           n_teacher_views=self.n_teacher_views, student_temp=self.student_temp,
                                           teacher_temp=self.teacher_temp_at(epoch),
                                           teacher_prototypes=teacher_prototypes, backend=self.backend)
        if self.training:  # after the loss, as DINO: this step's loss used the previous centre
            self.centre.update(teacher_mean, count=teacher_features.shape[0])
        return loss

    def extra_repr(self) -> str:
        return (f"views={self.n_student_views}/{self.n_teacher_views}, student_temp={self.student_temp}, "
                f"teacher_temp={self.warmup_teacher_temp}->{self.teacher_temp} over {self.warmup_epochs} epochs")
