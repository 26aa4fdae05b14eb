"""masked_patch_embed: embed only the kept patches of an image batch, plus their positional embedding.

    keep_idx, ids_restore, mask = vitfast.ops.random_masking(B, N, mask_ratio=0.75)
    tokens = vitfast.ops.masked_patch_embed(images, proj.weight, proj.bias, pos_embed, keep_idx)
    tokens.sum().backward()   # grads for images, weight, bias and pos_embed

Math (p = patch size, S_w = W // p, patch n at grid row n // S_w, column n % S_w):

    tokens[b, k] = weight @ patch(images[b], keep_idx[b, k]) + bias + pos_embed[pos_idx[b, k]]

where ``patch`` is the C·p·p vector of the patch in Conv2d order (channel, row-in-patch, col-in-patch),
so ``weight`` is a ``nn.Conv2d(C, D, p, stride=p)`` weight ([D, C, p, p], or flattened [D, C·p·p]):
timm / MAE / DINO checkpoints work unchanged. ``pos_idx`` defaults to ``keep_idx``; DILEMMA passes
deliberately wrong positions. Duplicate indices are allowed and their gradients accumulate.

Shapes: images [B, C, H, W]; weight [D, C, p, p] or [D, C·p·p]; bias [D] or None;
pos_embed [L, D] or None (L is usually N = (H/p)·(W/p)); keep_idx [B, K] int64 in [0, N);
pos_idx [B, K] int64 in [0, L) → tokens [B, K, D] in the dtype of the inputs (fp16/bf16/fp32/fp64;
all floating inputs share one dtype; under autocast they are cast to the autocast dtype).

The usual formulation embeds all N patches and then gathers K of them. The fused backends never
compute the embeddings of dropped patches, and the backward recomputes the kept patches from the
images instead of saving them.

Backends: ``triton`` (CUDA, or CPU under TRITON_INTERPRET=1), ``cuda`` and ``cpu`` (vitfast._C),
``torch`` (the reference below). Choose with ``backend=`` or VITFAST_BACKEND.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import NO_FLOAT64, declare_backends
from ._checks import FLOATING, Checker

__all__ = ["masked_patch_embed", "masked_patch_embed_reference"]


def masked_patch_embed_reference(
    images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Optional[Tensor],
    keep_idx: Tensor, pos_idx: Optional[Tensor] = None,
) -> Tensor:
    """The spec: embed every patch with a strided convolution, then gather the kept ones."""
    channels = images.shape[1]
    patch = math.isqrt(weight[0].numel() // channels)
    weight = weight.reshape(weight.shape[0], channels, patch, patch)
    embedded = F.conv2d(images, weight, bias, stride=patch).flatten(2).transpose(1, 2)  # [B, N, D]
    tokens = torch.gather(embedded, 1, keep_idx.unsqueeze(-1).expand(-1, -1, embedded.shape[-1]))
    if pos_embed is not None:
        tokens = tokens + pos_embed[keep_idx if pos_idx is None else pos_idx]
    return tokens


def _reference_forward(images, weight, bias, pos_embed, keep_idx, pos_idx, patch_size):
    return masked_patch_embed_reference(images, weight, bias, pos_embed, keep_idx, pos_idx)


def _reference_backward(grad_tokens, images, weight, keep_idx, pos_idx, patch_size, num_positions, output_mask):
    """Closed-form gradients of the reference (tests also hold them against autograd of the reference).

    Custom-op implementations run below the autograd key, so this cannot call torch.autograd itself.
    """
    batch, _, height, width = images.shape
    dim = weight.shape[0]
    grad_rows = grad_tokens.reshape(-1, dim)
    rows = keep_idx.unsqueeze(-1).expand(-1, -1, weight.shape[1])  # [B, K, C*p*p]
    d_images = d_weight = d_bias = d_pos = None
    if output_mask[0]:
        d_patches = torch.zeros(batch, (height // patch_size) * (width // patch_size), weight.shape[1],
                                dtype=images.dtype, device=images.device)
        d_patches.scatter_add_(1, rows, grad_tokens @ weight)  # duplicates accumulate
        d_images = F.fold(d_patches.transpose(1, 2), (height, width), patch_size, stride=patch_size)
    if output_mask[1]:
        patches = F.unfold(images, patch_size, stride=patch_size).transpose(1, 2)  # [B, N, C*p*p]
        d_weight = grad_rows.t() @ torch.gather(patches, 1, rows).reshape(-1, weight.shape[1])
    if output_mask[2]:
        d_bias = grad_rows.sum(0)
    if output_mask[3]:
        d_pos = grad_rows.new_zeros(num_positions, dim).index_add_(0, pos_idx.reshape(-1), grad_rows)
    return d_images, d_weight, d_bias, d_pos


BACKENDS = declare_backends(
    "masked_patch_embed",
    reference=(_reference_forward, _reference_backward),
    native=("masked_patch_embed_forward", "masked_patch_embed_backward"),
    triton=("vitfast.kernels.masked_patch_embed", "masked_patch_embed_forward", "masked_patch_embed_backward"),
    dtypes={"triton": NO_FLOAT64, "cuda": FLOATING, "cpu": FLOATING, "torch": FLOATING},
)


# ---- torch.library registration: the op composes with autograd, torch.compile and opcheck ----

@torch.library.custom_op("vitfast::masked_patch_embed", mutates_args=())
def _masked_patch_embed_op(
    images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Optional[Tensor],
    keep_idx: Tensor, pos_idx: Tensor, patch_size: int, backend: str,
) -> Tensor:
    return BACKENDS(backend).forward(images, weight, bias, pos_embed, keep_idx, pos_idx, patch_size)


@_masked_patch_embed_op.register_fake
def _(images, weight, bias, pos_embed, keep_idx, pos_idx, patch_size, backend):
    return images.new_empty(keep_idx.shape[0], keep_idx.shape[1], weight.shape[0])


@torch.library.custom_op("vitfast::masked_patch_embed_backward", mutates_args=())
def _masked_patch_embed_backward_op(
    grad_tokens: Tensor, images: Tensor, weight: Tensor, keep_idx: Tensor, pos_idx: Tensor,
    patch_size: int, num_positions: int, output_mask: List[bool], backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = BACKENDS(backend).backward(grad_tokens.contiguous(), images, weight, keep_idx, pos_idx,
                                       patch_size, num_positions, list(output_mask))
    # A custom op returns tensors only: an unneeded gradient travels as an empty tensor.
    return tuple(g if g is not None and needed else images.new_empty(0) for g, needed in zip(grads, output_mask))


@_masked_patch_embed_backward_op.register_fake
def _(grad_tokens, images, weight, keep_idx, pos_idx, patch_size, num_positions, output_mask, backend):
    shapes = (images.shape, weight.shape, weight.shape[:1], (num_positions, weight.shape[0]))
    return tuple(images.new_empty(shape if needed else (0,)) for shape, needed in zip(shapes, output_mask))


def _setup_context(ctx, inputs, output):
    images, weight, bias, pos_embed, keep_idx, pos_idx, patch_size, backend = inputs
    # Only inputs are saved: the backward regathers the kept patches (nothing of size B·K·C·p·p is kept).
    ctx.save_for_backward(images, weight, keep_idx, pos_idx)
    ctx.patch_size, ctx.backend = patch_size, backend
    ctx.num_positions = pos_embed.shape[0] if pos_embed is not None else 0
    ctx.has_bias, ctx.has_pos = bias is not None, pos_embed is not None


def _backward(ctx, grad_tokens):
    images, weight, keep_idx, pos_idx = ctx.saved_tensors
    needs = ctx.needs_input_grad
    output_mask = [needs[0], needs[1], ctx.has_bias and needs[2], ctx.has_pos and needs[3]]
    if not any(output_mask):
        return (None,) * 8
    grads = _masked_patch_embed_backward_op(grad_tokens, images, weight, keep_idx, pos_idx, ctx.patch_size,
                                            ctx.num_positions, output_mask, ctx.backend)
    grads = [g if needed else None for g, needed in zip(grads, output_mask)]
    return (*grads, None, None, None, None)


_masked_patch_embed_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public function ----

def masked_patch_embed(
    images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Optional[Tensor],
    keep_idx: Tensor, pos_idx: Optional[Tensor] = None, *, backend: Optional[str] = None,
) -> Tensor:
    """tokens [B, K, D] = embedding of the kept patches ``keep_idx`` + ``pos_embed[pos_idx]`` (see module doc)."""
    check = Checker("masked_patch_embed")
    images = check.tensor("images", images, ("B", "C", "H", "W"))
    batch, channels, height, width = images.shape
    device = images.device
    if not isinstance(weight, Tensor) or weight.dim() not in (2, 4):
        check.fail(f"weight must be a Conv2d weight [D, C, p, p] or [D, C*p*p], got "
                   f"{weight.dtype if isinstance(weight, Tensor) else type(weight).__name__} "
                   f"{list(weight.shape) if isinstance(weight, Tensor) else ''}".rstrip())
    if weight.dim() == 4:
        check.tensor("weight", weight, ("D", "C", "p", "p"), device=device)
        patch = weight.shape[2]
        weight = weight.reshape(weight.shape[0], -1)
    else:
        patch = math.isqrt(weight.shape[1] // max(channels, 1))
        if patch == 0 or channels * patch * patch != weight.shape[1]:
            check.fail(f"weight must be [D, C*p*p] with C = {channels} (from images) and a square patch, "
                       f"got {list(weight.shape)}")
        check.tensor("weight", weight, ("D", channels * patch * patch), device=device)
    if height % patch or width % patch:
        check.fail(f"image size {height}x{width} is not divisible by the patch size {patch}")
    num_patches = (height // patch) * (width // patch)
    if bias is not None:
        check.tensor("bias", bias, ("D",), device=device)
    if pos_embed is not None:
        check.tensor("pos_embed", pos_embed, ("L", "D"), device=device)
    num_positions = pos_embed.shape[0] if pos_embed is not None else num_patches
    check.tensor("keep_idx", keep_idx, ("B", "K"), dtypes=(torch.int64,), device=device,
                 value_range=(0, num_patches))
    if pos_idx is None:
        if pos_embed is not None and num_positions < num_patches:
            check.fail(f"pos_embed has {num_positions} rows but there are {num_patches} patches; "
                       f"pass pos_idx to say which rows to use")
        pos_idx = keep_idx  # already checked: in [0, num_patches), inside [0, num_positions); no second pass
    else:
        check.tensor("pos_idx", pos_idx, ("B", "K"), dtypes=(torch.int64,), device=device,
                     value_range=(0, num_positions))

    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        images, weight = images.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        pos_embed = pos_embed.to(dtype) if pos_embed is not None else None
    check.same_dtype("images", images, weight=weight, bias=bias, pos_embed=pos_embed)

    chosen = BACKENDS.select(device, images.dtype, backend)
    contiguous = lambda t: t.contiguous() if t is not None else None
    return _masked_patch_embed_op(images.contiguous(), weight.contiguous(), contiguous(bias), contiguous(pos_embed),
                                  keep_idx.contiguous(), pos_idx.contiguous(), patch, chosen)
