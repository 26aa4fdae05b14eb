"""RelationHead: RelViT's self-supervised position heads over the output patch tokens.

    head = RelationHead(embed_dim=384, grid_size=8)            # direction (9 classes) + absolute position
    out = head(tokens, positions)                                # tokens [B, N, D] without CLS
    out["loss"].backward()                                       # relation CE + absolute-position CE (1:1)

Direction task (RelViT, docs/methods.md §2.1): one bias-free bilinear score per class between tokens i and j,
``<Wq_c z_i, Wk_c z_j> / sqrt(d_h)`` with d_h = D // 9, cross-entropy against where token i lies relative
to token j, over all ordered pairs — computed by ``vitfast.ops.relation_loss`` without the [B, 9, N, N]
logits. Absolute-position task: Linear(D, S·S) per token, cross-entropy against the token's grid cell.
``positions`` [B, N] int64 are the grid cells the tokens came from (None: grid order); masked or shuffled
token subsets (DILEMMA-style inputs) pass their original cells.

``kind="mlp"`` is the MLP pair head (docs/methods.md §2.5): ``out(i, j) = W act(A z_i + B z_j + b) + c``
with ``u_proj`` = Linear(D, H, bias=False) (A), ``v_proj`` = Linear(D, H) (B, b), ``out_proj`` = Linear(H, C_out)
(W, c), hidden H = D by default, computed by ``vitfast.ops.relation_mlp_loss`` without the [B, N, N, H] hidden
activations. Its ``task`` is "direction" (the 9 classes, cross-entropy) or "offset" (DRLoc-style regression of the
normalised offset (Δrow, Δcol) / (S - 1), squared error; no accuracy is reported). The bilinear head is
direction-only.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops.relation_loss import DIRECTION_CLASSES
from ..ops.relation_mlp_loss import ACTIVATIONS, TASK_OUTPUTS


class RelationHead(nn.Module):
    def __init__(self, embed_dim: int, grid_size: int, *, kind: str = "bilinear", absolute: bool = True,
                 relation_weight: float = 1.0, absolute_weight: float = 1.0, label_smoothing: float = 0.0,
                 task: str = "direction", hidden_dim: Optional[int] = None, activation: str = "gelu",
                 backend: Optional[str] = None):
        super().__init__()
        if kind not in ("bilinear", "mlp"):
            raise ValueError(f'kind must be "bilinear" or "mlp", got {kind!r}')
        if task not in TASK_OUTPUTS or (kind == "bilinear" and task != "direction"):
            allowed = tuple(TASK_OUTPUTS) if kind == "mlp" else ("direction",)
            raise ValueError(f"task must be one of {allowed} for kind={kind!r}, got {task!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.grid_size, self.kind, self.task, self.activation, self.backend = grid_size, kind, task, activation, backend
        self.relation_weight, self.absolute_weight = relation_weight, absolute_weight
        self.label_smoothing = label_smoothing
        if kind == "bilinear":
            if embed_dim < DIRECTION_CLASSES:
                raise ValueError(f"embed_dim must be >= {DIRECTION_CLASSES} (d_h = embed_dim // 9), got {embed_dim}")
            self.head_dim = embed_dim // DIRECTION_CLASSES
            self.q_proj = nn.Linear(embed_dim, DIRECTION_CLASSES * self.head_dim, bias=False)
            self.k_proj = nn.Linear(embed_dim, DIRECTION_CLASSES * self.head_dim, bias=False)
        else:
            self.hidden_dim = embed_dim if hidden_dim is None else hidden_dim
            self.u_proj = nn.Linear(embed_dim, self.hidden_dim, bias=False)
            self.v_proj = nn.Linear(embed_dim, self.hidden_dim)
            self.out_proj = nn.Linear(self.hidden_dim, TASK_OUTPUTS[task])
        self.abs_pos = nn.Linear(embed_dim, grid_size * grid_size) if absolute else None

    def forward(self, tokens: Tensor, positions: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """tokens [B, N, D] (no CLS), positions [B, N] int64 grid cells → dict of losses and accuracies."""
        if tokens.dim() != 3:
            raise ValueError(f"tokens must be [B, N, D], got {list(tokens.shape)}")
        batch, num, _ = tokens.shape
        if positions is None:
            if num != self.grid_size ** 2:
                raise ValueError(f"without positions the tokens must be the full {self.grid_size}x{self.grid_size} "
                                 f"grid in order, got N = {num}")
            positions = torch.arange(num, device=tokens.device).expand(batch, num)
        if self.kind == "bilinear":
            q = self.q_proj(tokens).view(batch, num, DIRECTION_CLASSES, self.head_dim)
            k = self.k_proj(tokens).view(batch, num, DIRECTION_CLASSES, self.head_dim)
            relation, relation_accuracy = ops.relation_loss(
                q, k, positions, grid_size=self.grid_size, label_smoothing=self.label_smoothing,
                return_accuracy=True, backend=self.backend)
            out = {"relation_loss": relation, "relation_accuracy": relation_accuracy}
        elif self.task == "direction":
            relation, relation_accuracy = ops.relation_mlp_loss(
                self.u_proj(tokens), self.v_proj(tokens), self.out_proj.weight, self.out_proj.bias, positions,
                grid_size=self.grid_size, task="direction", activation=self.activation,
                label_smoothing=self.label_smoothing, return_accuracy=True, backend=self.backend)
            out = {"relation_loss": relation, "relation_accuracy": relation_accuracy}
        else:
            relation = ops.relation_mlp_loss(
                self.u_proj(tokens), self.v_proj(tokens), self.out_proj.weight, self.out_proj.bias, positions,
                grid_size=self.grid_size, task="offset", activation=self.activation, backend=self.backend)
            out = {"relation_loss": relation}
        loss = self.relation_weight * relation
        if self.abs_pos is not None:
            logits = self.abs_pos(tokens).flatten(0, 1)
            target = positions.reshape(-1)
            absolute = F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)
            out["absolute_loss"] = absolute
            out["absolute_accuracy"] = (logits.argmax(-1) == target).float().mean()
            loss = loss + self.absolute_weight * absolute
        out["loss"] = loss
        return out
