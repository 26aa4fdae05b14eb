"""Projection and prediction heads of the joint-embedding methods (SimCLR, BYOL, MoCo v3, NNCLR / MAE-CT).

    projector = projection_head(384, "mocov3")              # 384 -> 4096 -> 4096 -> 256, last BN without affine
    predictor = prediction_head(256, "mocov3")              # 256 -> 4096 -> 256
    z = projector(features)                                  # features [B, D] -> [B, 256]
    head = MLPHead(384, 512, 128, num_layers=2, batch_norm=False)   # any other shape

Every head is an ``MLPHead``: ``num_layers`` Linear layers; each hidden layer is Linear → BatchNorm1d
(when ``batch_norm``) → activation; the last layer is Linear, optionally followed by BatchNorm1d
(``last_batch_norm``, with or without affine parameters: MoCo v3's last BN has none). ``bias`` applies
to every Linear; the recipes that put a BN after each Linear leave the bias out (BN's shift makes it
redundant), as their official code does. The recipes' numbers are data (``PROJECTORS``, ``PREDICTORS``;
docs/methods.md §6.1 and §7), and any keyword overrides them, e.g. ``hidden_dim=512`` for a small model.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from torch import nn

__all__ = ["MLPHead", "projection_head", "prediction_head", "PROJECTORS", "PREDICTORS"]

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}

# hidden_dim None = the input width (SimCLR: the encoder's width).
PROJECTORS: Dict[str, Dict[str, Any]] = {
    "simclr": dict(hidden_dim=None, out_dim=128, num_layers=2, batch_norm=False, bias=True),  # SimCLR v1, SupCon
    "byol": dict(hidden_dim=4096, out_dim=256, num_layers=2, batch_norm=True, bias=True),
    "mocov3": dict(hidden_dim=4096, out_dim=256, num_layers=3, batch_norm=True, bias=False,
                   last_batch_norm=True, last_affine=False),
    "mae-ct": dict(hidden_dim=2048, out_dim=256, num_layers=3, batch_norm=True, bias=False, last_batch_norm=True),
}
# A predictor maps the projection back to its own width (out_dim = in_dim).
PREDICTORS: Dict[str, Dict[str, Any]] = {
    "byol": dict(hidden_dim=4096, num_layers=2, batch_norm=True, bias=True),
    "mocov3": dict(hidden_dim=4096, num_layers=2, batch_norm=True, bias=False, last_batch_norm=True,
                   last_affine=False),
    "mae-ct": dict(hidden_dim=4096, num_layers=2, batch_norm=True, bias=False),
}


class MLPHead(nn.Sequential):
    """``num_layers`` Linear layers in_dim → hidden_dim → … → out_dim: [B, in_dim] -> [B, out_dim]."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, num_layers: int = 2, batch_norm: bool = True,
                 bias: bool = True, last_batch_norm: bool = False, last_affine: bool = True,
                 activation: str = "relu"):
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim),
                            ("num_layers", num_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MLPHead: {name} must be a positive int, got {value!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLPHead: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        layers = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
            if i < num_layers - 1:
                if batch_norm:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(ACTIVATIONS[activation]())
            elif last_batch_norm:
                layers.append(nn.BatchNorm1d(out_dim, affine=last_affine))
        super().__init__(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim


def _recipe(table: Dict[str, Dict[str, Any]], kind: str, recipe: str, overrides: Dict[str, Any]) -> Dict[str, Any]:
    if recipe not in table:
        raise ValueError(f"{kind}: recipe must be one of {sorted(table)}, got {recipe!r}")
    return {**table[recipe], **overrides}


def projection_head(in_dim: int, recipe: str = "mocov3", **overrides: Any) -> MLPHead:
    """The projector of ``recipe`` (``PROJECTORS``) on ``in_dim`` encoder features; keywords override its numbers."""
    values = _recipe(PROJECTORS, "projection_head", recipe, overrides)
    hidden: Optional[int] = values.pop("hidden_dim")
    out_dim = values.pop("out_dim")
    return MLPHead(in_dim, in_dim if hidden is None else hidden, out_dim, **values)


def prediction_head(dim: int, recipe: str = "mocov3", **overrides: Any) -> MLPHead:
    """The predictor of ``recipe`` (``PREDICTORS``): [B, dim] -> [B, dim]; keywords override its numbers."""
    values = _recipe(PREDICTORS, "prediction_head", recipe, overrides)
    hidden = values.pop("hidden_dim")
    return MLPHead(dim, hidden, dim, **values)
