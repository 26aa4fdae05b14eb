"""self_attention's benchmark rows beside what a ViT runs today (benchmarks/run.py runs them with the other ops).

    python benchmarks/run.py --ops self_attention --dtypes fp32,bf16 --no-gemm

A step is what a training step runs: the attention of one block from the qkv projection's output [B, N, 3 D] to the
merged heads [B, N, D], forward + d_qkv:

    vitfast-cpu                   vitfast.ops.self_attention(qkv, H): the fused CPU op (no head split / merge copies)
    eager SDPA as timm calls it   reshape + permute to [3, B, H, N, d], F.scaled_dot_product_attention (PyTorch picks
                                  the route: on the CPU its flash kernel), transpose + reshape back (timm's
                                  Attention with fused_attn, the default of timm's ViTs)
    torch.compile(SDPA ...)       the same function compiled

Shapes: the attention of the steps in benchmarks/train_step.py (MAE's encoder on the 16 kept tokens + CLS and its
decoder, RelViT upstream at 56 px) and DeiT-S at 224 px.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vitfast import ops
from vitfast.gpu_check.cases import OpCase
from vitfast.ops.self_attention import _merge_heads, _split_heads

# time_case's names of the two unfused rows -> what they are here
LABELS = {"eager reference": "eager SDPA as timm calls it",
          "torch.compile(reference)": "torch.compile(SDPA as timm calls it)"}


def sdpa_as_timm_calls_it(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """timm's reshape + permute (the op's reference split), SDPA, transpose + reshape back."""
    return _merge_heads(F.scaled_dot_product_attention(*_split_heads(qkv, num_heads)))


def _make(p, gen):
    """qkv [B, N, 3 H d]: unit-variance values, q and k scaled by 2 so that the softmax is not near uniform."""
    qkv = torch.randn(p["B"], p["N"], 3, p["H"] * p["d"], generator=gen)
    qkv[:, :, :2] *= 2
    return dict(qkv=qkv.reshape(p["B"], p["N"], -1), heads=p["H"])


SELF_ATTENTION_BENCH = OpCase(
    name="self_attention",
    shapes={"bench MAE encoder B256 N17 H12 d16": dict(B=256, N=17, H=12, d=16),
            "bench MAE decoder B256 N65 H4 d32": dict(B=256, N=65, H=4, d=32),
            "bench RelViT 56px B64 N196 H12 d16": dict(B=64, N=196, H=12, d=16),
            "bench DeiT-S 224px B32 N197 H6 d64": dict(B=32, N=197, H=6, d=64),
            "ragged B3 N9 H2 d8": dict(B=3, N=9, H=2, d=8)},
    grads=("qkv",),
    bench_grads=("qkv",),
    floating=("qkv",),
    make=_make,
    fused=lambda x, backend: ops.self_attention(x["qkv"], x["heads"], backend=backend),
    reference=lambda x: sdpa_as_timm_calls_it(x["qkv"], x["heads"]),
)
