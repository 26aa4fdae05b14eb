"""DILEMMA (Sameni, Jenni, Favaro, AAAI 2023; docs/methods.md §3): detect incorrect location embeddings.

An add-on to a two-view contrastive method (``--base mocov3``, the paper's main form, or ``--base simclr``). Every
student pass (``TwoViewMethod.encode_view``, overridden here) sees a sparse, position-corrupted view:

    keep K = int(N·(1 − r)) of the N patches (``random_masking``), give each kept token with probability p = 0.2 the
    position embedding of a dropped patch (``corrupt_positions``), embed only those tokens
    (``ViT.forward_features(x, keep_idx, pos_idx)``, i.e. ``masked_patch_embed``), and score every output patch
    token with a detection head Linear(D, 1): BCE with logits against the corruption labels (1 = wrong position).

    L = contrastive loss of the base + λ · mean over the two views of BCE,   λ = 1

The base's momentum teacher (MoCo v3) encodes the full clean views: it never goes through ``encode_view``.
The base is a setting, so one registered method serves both: ``DILEMMA(config, data)`` returns an instance of
the DILEMMA subclass of the chosen base method (``VARIANTS``); its settings are MoCo v3's plus DILEMMA's own
(SimCLR reads the same names: temperature, proj_hidden_dim, proj_dim and the view settings).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..config import setting
from .base import DataInfo
from .mocov3 import MoCoV3, MoCoV3Config
from .simclr import SimCLR, TwoViewMethod

__all__ = ["DILEMMA", "DILEMMAConfig", "VARIANTS"]


@dataclass
class DILEMMAConfig(MoCoV3Config):
    base: str = setting("mocov3", "the contrastive method DILEMMA is added to: mocov3 or simclr")
    mask_ratio: float = setting(0.5, "fraction of the patches removed from the student's input", within="[0, 1)")
    corrupt_probability: float = setting(0.2, "probability that a kept token gets a wrong position embedding",
                                          within="[0, 1]")
    detection_weight: float = setting(1.0, "lambda: weight of the wrong-position detection BCE", within="[0, inf)")


class DILEMMA(TwoViewMethod):
    """Sparse, position-corrupted student views plus wrong-position detection, on MoCo v3 or SimCLR."""

    name = "dilemma"
    Config = DILEMMAConfig
    presets = {
        # The MoCo v3 quick preset (96 wide x 4 blocks, patch 8: N = 16 tokens, heads 256 wide) with mask ratio 0.5
        # (8 tokens kept, so every wrong position is a dropped one: the paper's rule) and p = 0.2, for 80 epochs of
        # batch 64 (1600 steps): k-NN 98.3 % on digits (random init 66.6 %). With MoCo v3's earlier quick views
        # (crops (0.3, 1), flips) 40 epochs of batch 128 gave 84.1 %, 80 of batch 64 93.9 %.
        "quick": dict(MoCoV3.presets["quick"], epochs=80, batch_size=64, mask_ratio=0.5, corrupt_probability=0.2,
                      detection_weight=1.0),
        # docs/methods.md §3.2 and the release (Separius/DILEMMA, a fork of facebookresearch/moco-v3: README.md,
        # main_moco.py, moco/builder.py, vits.py), value by value: MoCo v3's paper preset (its main_moco.py is
        # unchanged: lr 1.5e-4·batch/256, wd 0.1, 40 warm-up epochs, 300 epochs, τ 0.2, momentum 0.99 -> 1,
        # heads 4096/256, views and crops) with the README's one command, batch 1024 (MoCo v3's published models
        # use 4096), sparsity --token_drop_rate 0.75 (the README's example; "bigger models can have larger
        # sparsities"), --dilemma_probability 0.2 ("always good"), --dilemma_lambda 1 (its default); the loss is
        # InfoNCE terms + λ·(BCE¹ + BCE²)/2 (builder.py). The release ships no linear-eval script: the probe is
        # MoCo v3's length (90 epochs). Deliberate differences (official: value (file), why), besides MoCo v3's
        # (see its paper preset: views, weight decay on every parameter, fp16, SyncBatchNorm, qkv init, warm-up):
        # - wrong positions and sparsity: the release's forward_features never passes the kept and the corrupted
        #   positions on (a dense ViT is trained) and its _pos_embed gathers the table with a batch-1 index
        #   (vits.py); call_encoder compares the kept length with the channel count (builder.py): vitfast does what
        #   the paper describes (docs/methods.md §3.3).
        # - encoder: official ViT-S/16 with 6 heads (DeiT's) and a learned position embedding, none on CLS
        #   (vits.py); here the small-data ViT (192 x 9, 12 heads, patch 4) on 32-px data with MoCo v3's fixed
        #   sin-cos table (zero on CLS): TwoViewMethod builds that table for the mocov3 base (new code otherwise).
        # - patch projection: the command passes --stop-grad-conv1, but vits.py hands it to timm's
        #   VisionTransformer, which has no such argument, and nothing freezes the patch embedding; here it is
        #   frozen as the command asks (random_patch_projection, MoCo v3's --stop-grad-conv1).
        "paper": dict(MoCoV3.presets["paper"], batch_size=1024, mask_ratio=0.75, corrupt_probability=0.2,
                      detection_weight=1.0),
    }

    def __new__(cls, config, data: DataInfo):
        if cls is DILEMMA:  # pick the subclass of the chosen base
            base = config.method_config.base
            if base not in VARIANTS:
                raise ValueError(f"dilemma: base must be one of {sorted(VARIANTS)}, got {base!r}")
            cls = VARIANTS[base]
        return super().__new__(cls)

    def __init__(self, config, data: DataInfo):
        super().__init__(config, data)  # the base method (next in the variant's MRO) builds encoder, heads, views
        self.detector = nn.Linear(self.model.embed_dim, 1)

    def encode_view(self, x: Tensor, generator: torch.Generator) -> Tuple[Tensor, Tensor, Dict[str, float]]:
        """Sparse, corrupted pass over one view x [B, C, H, W]: (pooled [B, D], λ·BCE [], metrics)."""
        s = self.config.method_config
        keep_idx, _, _, ids_shuffle = ops.random_masking(x.shape[0], self.model.num_patches, s.mask_ratio,
                                                         generator=generator, device=x.device, return_shuffle=True)
        pos_idx, corrupted = ops.corrupt_positions(ids_shuffle, keep_idx.shape[1], s.corrupt_probability,
                                                   generator=generator)
        tokens = self.model.forward_features(x, keep_idx, pos_idx)
        logits = self.detector(tokens[:, 1:]).squeeze(-1)  # [B, K]: one score per visible patch token
        bce = F.binary_cross_entropy_with_logits(logits.float(), corrupted)
        accuracy = ((logits > 0).float() == corrupted).float().mean()
        pooled = self.model.forward_head(tokens, pre_logits=True)
        return pooled, s.detection_weight * bce, {"detection_bce": bce.item(), "detection_accuracy": accuracy.item()}


class DILEMMAMoCoV3(DILEMMA, MoCoV3):
    """DILEMMA on MoCo v3: the student sees sparse, corrupted views; the momentum teacher the full clean ones."""


class DILEMMASimCLR(DILEMMA, SimCLR):
    """DILEMMA on SimCLR: both views go through the sparse, corrupted student pass."""


VARIANTS = {"mocov3": DILEMMAMoCoV3, "simclr": DILEMMASimCLR}
