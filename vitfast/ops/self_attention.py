"""self_attention: a ViT block's multi-head attention, straight from the packed qkv projection to the merged heads.

    qkv = block.attn.qkv(x)                                    # [B, N, 3 D], timm's packing [B, N, 3, H, d]
    out = vitfast.ops.self_attention(qkv, num_heads=H)        # [B, N, D] = heads side by side, ready for proj

Math (Vaswani et al. 2017; timm's / MAE's / DINO's ``Attention``): per batch element b and head h, with
q, k, v = qkv[b, :, 0, h], qkv[b, :, 1, h], qkv[b, :, 2, h] ([N, d] each, d = D / H) and scale = d ** -0.5 by default,

    out[b, :, h] = softmax_rows(q k^T scale) v

No mask, no dropout (the ViT recipes here train with attention dropout 0; vitfast.nn.vit uses SDPA when it is not).

Why an op of its own: on the CPU, PyTorch's scaled_dot_product_attention runs its fp16 / bf16 backward several times
slower than fp32 (and its math route materialises [B, H, N, N] scores). The ``cpu`` backend (vitfast._C) computes
each (b, h) with whole score rows in a per-thread buffer (ViT lengths: tens to a few hundred tokens), GEMMs in fp32
(fp64 for fp64) whatever the storage dtype, and saves only the rows' logsumexp ([B, H, N]) for the backward, which
recomputes the probabilities. It reads q, k, v in place from qkv and writes out in place as [B, N, H, d]: the head
split / merge copies of the usual ``reshape + permute`` are gone. Scratch: 2 N^2 accumulation values per thread.

dtypes: out and d_qkv in qkv's dtype; under autocast qkv is cast to the autocast dtype first (as a linear layer's
output already is). The softmax and every product accumulate in fp32 (fp64 for fp64 inputs). A NaN or Inf in q or k
makes the affected rows NaN, as in the reference.

Backends: ``cpu`` (vitfast._C) and ``torch`` (the reference below; any device). On a GPU use
``torch.nn.functional.scaled_dot_product_attention`` (FlashAttention): vitfast.nn.vit does so by default.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ._backend import declare_backends
from ._checks import FLOATING, Checker, accumulation_dtype, describe

__all__ = ["self_attention", "self_attention_reference"]


def _split_heads(qkv: Tensor, num_heads: int) -> Tuple[Tensor, Tensor, Tensor]:
    """[B, N, 3 H d] -> q, k, v [B, H, N, d] (views)."""
    batch, tokens, width = qkv.shape
    return qkv.reshape(batch, tokens, 3, num_heads, width // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


def _merge_heads(x: Tensor) -> Tensor:
    """[B, H, N, d] -> [B, N, H d]."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def self_attention_reference(qkv: Tensor, num_heads: int, scale: Optional[float] = None) -> Tensor:
    """The spec, as timm's Attention writes it: [B, N, 3 D] -> [B, N, D] in qkv's dtype."""
    q, k, v = _split_heads(qkv, num_heads)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return _merge_heads(attn @ v)


def _reference_forward(qkv: Tensor, num_heads: int, scale: float) -> Tuple[Tensor, Tensor]:
    q, k, v = (t.to(accumulation_dtype(qkv.dtype)) for t in _split_heads(qkv, num_heads))
    scores = (q @ k.transpose(-2, -1)) * scale
    lse = scores.logsumexp(dim=-1)
    out = (scores - lse.unsqueeze(-1)).exp() @ v
    return _merge_heads(out).to(qkv.dtype), lse


def _reference_backward(grad_out: Tensor, qkv: Tensor, lse: Tensor, num_heads: int, scale: float) -> Tensor:
    """Closed-form d_qkv (custom-op implementations run below the autograd key; tests hold it against autograd)."""
    acc = accumulation_dtype(qkv.dtype)
    q, k, v = (t.to(acc) for t in _split_heads(qkv, num_heads))
    batch, tokens, _ = grad_out.shape
    d_out = grad_out.to(acc).reshape(batch, tokens, num_heads, -1).transpose(1, 2)
    probs = ((q @ k.transpose(-2, -1)) * scale - lse.unsqueeze(-1)).exp()
    d_probs = d_out @ v.transpose(-2, -1)
    d_scores = probs * (d_probs - (probs * d_probs).sum(-1, keepdim=True))
    d_q, d_k, d_v = (d_scores @ k) * scale, (d_scores.transpose(-2, -1) @ q) * scale, probs.transpose(-2, -1) @ d_out
    d_qkv = torch.stack([d_q, d_k, d_v], dim=0).permute(1, 3, 0, 2, 4)  # [B, N, 3, H, d]
    return d_qkv.reshape(qkv.shape).to(qkv.dtype).contiguous()


BACKENDS = declare_backends(
    "self_attention",
    reference=(_reference_forward, _reference_backward),
    native=("self_attention_forward", "self_attention_backward"),
    dtypes={"cpu": FLOATING, "torch": FLOATING},
)


# ---- torch.library registration: the op composes with autograd, torch.compile and opcheck ----

@torch.library.custom_op("vitfast::self_attention", mutates_args=())
def _self_attention_op(qkv: Tensor, num_heads: int, scale: float, backend: str) -> Tuple[Tensor, Tensor]:
    """(out [B, N, D] in qkv's dtype, lse [B, H, N] in the accumulation dtype)."""
    return tuple(BACKENDS(backend).forward(qkv, num_heads, scale))


@_self_attention_op.register_fake
def _(qkv, num_heads, scale, backend):
    batch, tokens, width = qkv.shape
    return (qkv.new_empty((batch, tokens, width // 3)),
            qkv.new_empty((batch, num_heads, tokens), dtype=accumulation_dtype(qkv.dtype)))


@torch.library.custom_op("vitfast::self_attention_backward", mutates_args=())
def _self_attention_backward_op(grad_out: Tensor, qkv: Tensor, lse: Tensor, num_heads: int, scale: float,
                                backend: str) -> Tensor:
    return BACKENDS(backend).backward(grad_out.contiguous(), qkv, lse, num_heads, scale)


@_self_attention_backward_op.register_fake
def _(grad_out, qkv, lse, num_heads, scale, backend):
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, scale, backend = inputs
    ctx.save_for_backward(qkv, output[1])  # qkv and N numbers per (b, h): no [B, H, N, N] tensor
    ctx.mark_non_differentiable(output[1])
    ctx.num_heads, ctx.scale, ctx.backend = num_heads, scale, backend


def _backward(ctx, grad_out, grad_lse):
    qkv, lse = ctx.saved_tensors
    return _self_attention_backward_op(grad_out, qkv, lse, ctx.num_heads, ctx.scale, ctx.backend), None, None, None


_self_attention_op.register_autograd(_backward, setup_context=_setup_context)


# torch.utils.flop_counter counts the op as it counts scaled_dot_product_attention: 2 matmuls forward, 5 backward
# (the scores recomputed), 2 B H N^2 d each.
def _matmul_flops(qkv_shape) -> int:
    batch, tokens, width = qkv_shape
    return 2 * batch * tokens * tokens * (width // 3)  # B H N^2 d, H d = D


@register_flop_formula(torch.ops.vitfast.self_attention)
def _forward_flops(qkv_shape, num_heads, *args, **kwargs) -> int:
    return 2 * _matmul_flops(qkv_shape)


@register_flop_formula(torch.ops.vitfast.self_attention_backward)
def _backward_flops(grad_out_shape, qkv_shape, lse_shape, num_heads, *args, **kwargs) -> int:
    return 5 * _matmul_flops(qkv_shape)


# ---- public function ----

def self_attention(qkv: Tensor, num_heads: int, scale: Optional[float] = None, *,
                   backend: Optional[str] = None) -> Tensor:
    """softmax(q k^T scale) v per head (see module doc): qkv [B, N, 3 D] packed [B, N, 3, H, d] -> [B, N, D].

    scale defaults to head_dim ** -0.5.
    """
    check = Checker("self_attention")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        check.fail(f"num_heads must be a positive int, got {num_heads!r}")
    qkv = check.tensor("qkv", qkv, ("B", "N", "3D"))
    width = qkv.shape[-1]
    if width % (3 * num_heads) or width == 0:
        check.fail(f"qkv must be [B, N, 3 * num_heads * head_dim] = [B, N, 3 * {num_heads} * head_dim], "
                   f"got {describe(qkv)} ({width} is not a positive multiple of {3 * num_heads})")
    head_dim = width // (3 * num_heads)
    if scale is None:
        scale = head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        check.fail(f"scale must be a positive finite number, got {scale!r}")
    device = qkv.device
    if torch.is_autocast_enabled(device.type):
        qkv = qkv.to(torch.get_autocast_dtype(device.type))
    chosen = BACKENDS.select(device, qkv.dtype, backend)
    out, _ = _self_attention_op(qkv.contiguous(), num_heads, float(scale), chosen)
    return out
