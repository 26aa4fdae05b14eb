"""masked_pixel_loss: MAE's reconstruction loss on masked patches, without materialising the targets.

    keep_idx, ids_restore, mask = vitfast.ops.random_masking(B, N, mask_ratio=0.75)
    pred = decoder(encoder(images, keep_idx), ids_restore)          # [B, N, p*p*C]
    loss = vitfast.ops.masked_pixel_loss(pred, images, mask, patch_size=p)   # scalar; loss.backward()

Math (He et al. 2021, official ``forward_loss``; docs/methods.md §1.3). Patch n sits at grid row n // S_w,
column n % S_w (S_w = W // p); its target vector is patchified in MAE's (row-in-patch i, col-in-patch j,
channel c) order, element e = (i*p + j)*C + c:

    target[b, n, e] = images[b, c, (n // S_w)*p + i, (n % S_w)*p + j]
    norm_pix:         target = (target - mean) / sqrt(var + 1e-6)     per patch, var unbiased (÷ (p*p*C - 1))
    loss_patch[b, n]  = mean over e of (pred[b, n, e] - target[b, n, e])**2
    loss              = sum(loss_patch * mask) / sum(mask)

Shapes and dtypes: pred [B, N, p*p*C] with N = (H/p)·(W/p); images [B, C, H, W]; mask [B, N], float
weights (MAE: 1 = removed/masked, 0 = kept, as returned by ``random_masking``) or bool. Only the mask form
is accepted (from ``keep_idx`` it is ``ones(B, N).scatter_(1, keep_idx, 0)``). pred is read in place when
its rows are contiguous, whatever its batch stride: MAE's ``decoder_pred(x)[:, 1:]`` (the CLS row dropped)
is not copied; other layouts are made contiguous first. pred and images may have different floating
dtypes: like MAE's eager code the loss has the promoted dtype (an fp16/bf16 pred from an autocast decoder
against fp32 images gives an fp32 loss from fp32 targets; nothing is cast to the autocast dtype), d_pred
has pred's dtype. Statistics and sums are accumulated in fp32 (fp64 for fp64 inputs).

Gradient: with respect to ``pred`` only, d_pred = mask * 2 (pred - target) / (p*p*C · sum(mask)) · grad.
``images`` and ``mask`` are data (MAE's target is a constant): passing one that requires grad while
grad mode is on raises a ValueError instead of silently returning no gradient for it.

Edge cases:
  - ``mask.sum() == 0`` (no masked patch; e.g. mask_ratio 0) makes the mean undefined (MAE returns
    NaN). On CPU tensors this raises a ValueError; on GPU tensors it is an asynchronous device assert
    (no host sync); under ``torch.compile`` the check is skipped and the loss is NaN as in MAE.
  - ``norm_pix`` needs at least two values per patch (unbiased variance); p*p*C == 1 raises.
  - Non-finite values propagate from every patch whose mask weight is nonzero. The fused backends
    (cpu, cuda, triton) never read a patch whose weight is exactly 0 — that is their saving — so a
    NaN/Inf in ``pred`` or ``images`` of a *kept* patch does not reach the loss or the gradient there
    (its gradient is exactly 0). MAE's eager ``(loss * mask)`` turns it into NaN (NaN · 0); the
    ``torch`` backend (the reference) keeps that behaviour.

The fused backends never build the [B, N, p*p*C] target tensor: the forward computes each masked
patch's mean and variance on the fly from the image and saves only (mean, 1/std) per patch
([B, N, 2], fp32); the backward recomputes the target from the image and those statistics.

Backends: ``triton`` (CUDA, or CPU under TRITON_INTERPRET=1), ``cuda`` and ``cpu`` (vitfast._C),
``torch`` (the reference below). Choose with ``backend=`` or VITFAST_BACKEND.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._backend import declare_backends
from ._checks import FLOATING, Checker, _tracing, accumulation_dtype, describe

__all__ = ["masked_pixel_loss", "masked_pixel_loss_reference", "MaskedPixelLoss"]

NORM_PIX_EPS = 1e-6  # MAE: (var + 1.e-6) ** .5


def _patchify(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, N, p*p*C] in MAE's (i, j, c) order (MAE's ``patchify``, any C, any H/W grid)."""
    batch, channels, height, width = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(batch, grid_h * grid_w, patch_size * patch_size * channels)


def masked_pixel_loss_reference(
    pred: Tensor, images: Tensor, mask: Tensor, patch_size: int, norm_pix: bool = True,
) -> Tensor:
    """The spec, written as MAE's ``forward_loss``: patchify, per-patch normalisation, MSE over masked patches."""
    target = _patchify(images, patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as in MAE
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)  # [B, N], mean loss per patch
    if mask.dtype == torch.bool:
        mask = mask.to(loss.dtype)
    return (loss * mask).sum() / mask.sum()


def _loss_dtype(pred: Tensor, images: Tensor) -> torch.dtype:
    return torch.promote_types(pred.dtype, images.dtype)


def _reference_stats(images: Tensor, mask: Tensor, patch_size: int, norm_pix: bool) -> Tensor:
    """(mean, 1/sqrt(var + eps)) per patch [B, N, 2] in the accumulation dtype, 0 where the mask is 0."""
    acc = mask.dtype
    if not norm_pix:
        return images.new_empty(0, dtype=acc)
    target = _patchify(images, patch_size).to(acc)
    stats = torch.stack([target.mean(-1), (target.var(-1) + NORM_PIX_EPS).rsqrt()], dim=-1)
    return torch.where(mask.unsqueeze(-1) != 0, stats, 0)


def _reference_forward(pred, images, mask, patch_size, norm_pix):
    loss = masked_pixel_loss_reference(pred, images, mask, patch_size, norm_pix)
    return loss.to(_loss_dtype(pred, images)), _reference_stats(images, mask, patch_size, norm_pix)


def _reference_backward(grad_loss, pred, images, mask, stats, patch_size, norm_pix):
    """Closed-form d_pred of the reference (tests also hold it against autograd of the reference).

    Custom-op implementations run below the autograd key, so this cannot call torch.autograd itself.
    """
    acc = mask.dtype
    target = _patchify(images, patch_size).to(acc)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + NORM_PIX_EPS) ** 0.5
    scale = grad_loss.to(acc) * 2 / (pred.shape[-1] * mask.sum())
    return ((pred.to(acc) - target) * (mask * scale).unsqueeze(-1)).to(pred.dtype).contiguous()


BACKENDS = declare_backends(
    "masked_pixel_loss",
    reference=(_reference_forward, _reference_backward),
    native=("masked_pixel_loss_forward", "masked_pixel_loss_backward"),
    triton=("vitfast.kernels.masked_pixel_loss", "masked_pixel_loss_forward", "masked_pixel_loss_backward"),
    dtypes={"triton": FLOATING, "cuda": FLOATING, "cpu": FLOATING, "torch": FLOATING},  # pred's dtype
)


# ---- torch.library registration: the op composes with autograd, torch.compile and opcheck ----

@torch.library.custom_op("vitfast::masked_pixel_loss", mutates_args=())
def _masked_pixel_loss_op(
    pred: Tensor, images: Tensor, mask: Tensor, patch_size: int, norm_pix: bool, backend: str,
) -> Tuple[Tensor, Tensor]:
    """(loss [] in the promoted dtype, stats [B, N, 2] (mean, 1/std) in mask's dtype, or [0] without norm_pix)."""
    return tuple(BACKENDS(backend).forward(pred, images, mask, patch_size, norm_pix))


@_masked_pixel_loss_op.register_fake
def _(pred, images, mask, patch_size, norm_pix, backend):
    stats_shape = (pred.shape[0], pred.shape[1], 2) if norm_pix else (0,)
    return pred.new_empty((), dtype=_loss_dtype(pred, images)), mask.new_empty(stats_shape)


@torch.library.custom_op("vitfast::masked_pixel_loss_backward", mutates_args=())
def _masked_pixel_loss_backward_op(
    grad_loss: Tensor, pred: Tensor, images: Tensor, mask: Tensor, stats: Tensor, patch_size: int,
    norm_pix: bool, backend: str,
) -> Tensor:
    return BACKENDS(backend).backward(grad_loss.contiguous(), pred, images, mask, stats, patch_size, norm_pix)


@_masked_pixel_loss_backward_op.register_fake
def _(grad_loss, pred, images, mask, stats, patch_size, norm_pix, backend):
    return pred.new_empty(pred.shape)  # contiguous, whatever pred's batch stride


def _setup_context(ctx, inputs, output):
    pred, images, mask, patch_size, norm_pix, backend = inputs
    # Inputs plus 2 numbers per patch: nothing of size B·N·p·p·C beyond what the caller already holds.
    ctx.save_for_backward(pred, images, mask, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.patch_size, ctx.norm_pix, ctx.backend = patch_size, norm_pix, backend


def _backward(ctx, grad_loss, grad_stats):
    if not ctx.needs_input_grad[0]:
        return (None,) * 6
    pred, images, mask, stats = ctx.saved_tensors
    d_pred = _masked_pixel_loss_backward_op(grad_loss, pred, images, mask, stats, ctx.patch_size, ctx.norm_pix,
                                            ctx.backend)
    return d_pred, None, None, None, None, None


_masked_pixel_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public function and module ----

def _kernel_dtypes(pred: torch.dtype, images: torch.dtype) -> Tuple[torch.dtype, torch.dtype]:
    """The (pred, images) dtypes the kernels run on; every backend sees the same pair.

    Native pairs: equal dtypes, or an fp16/bf16 pred with fp32 images (autocast). Any other pair is
    brought to one by exact up-casts: the lower-precision side is cast, or both go to fp64.
    """
    if pred == images:
        return pred, images
    promoted = torch.promote_types(pred, images)
    if promoted == pred:
        return pred, pred
    if pred in (torch.float16, torch.bfloat16) and promoted == torch.float32:
        return pred, torch.float32
    return promoted, promoted


def _rows_contiguous(pred: Tensor) -> bool:
    """Rows of pred [B, N, E] are contiguous (stride(2) == 1, stride(1) == E); the batch stride is free."""
    _, rows, length = pred.shape
    return (length <= 1 or pred.stride(2) == 1) and (rows <= 1 or pred.stride(1) == length) and pred.stride(0) >= 0


def masked_pixel_loss(
    pred: Tensor, images: Tensor, mask: Tensor, patch_size: int, norm_pix: bool = True, *,
    backend: Optional[str] = None,
) -> Tensor:
    """MAE's loss: mean over masked patches of the per-patch MSE to the (normalised) pixels (see module doc).

    pred [B, N, p*p*C], images [B, C, H, W], mask [B, N] float/bool -> loss [] (promoted dtype of pred, images).
    """
    check = Checker("masked_pixel_loss")
    images = check.tensor("images", images, ("B", "C", "H", "W"))
    batch, channels, height, width = images.shape
    device = images.device
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        check.fail(f"patch_size must be a positive int, got {patch_size!r}")
    if height % patch_size or width % patch_size:
        check.fail(f"image size {height}x{width} is not divisible by the patch size {patch_size}")
    num_patches = (height // patch_size) * (width // patch_size)
    patch_len = channels * patch_size * patch_size
    if isinstance(pred, Tensor) and pred.dim() == 3 and tuple(pred.shape[1:]) != (num_patches, patch_len):
        check.fail(f"pred must be [B, N, p*p*C] = [B, {num_patches}, {patch_len}] for {channels}x{height}x{width} "
                   f"images and patch_size {patch_size}, got {describe(pred)}")
    pred = check.tensor("pred", pred, ("B", num_patches, patch_len), device=device)
    mask = check.tensor("mask", mask, ("B", num_patches), dtypes=FLOATING + (torch.bool,), device=device)
    if norm_pix and patch_len < 2:
        check.fail(f"norm_pix needs at least 2 values per patch (unbiased variance), got p*p*C = {patch_len}")
    if torch.is_grad_enabled():
        for name, value in (("images", images), ("mask", mask)):
            if value.requires_grad:
                check.fail(f"{name} requires grad, but masked_pixel_loss differentiates with respect to pred only "
                           f"({name} is data, as in MAE); pass {name}.detach()")

    pred_dtype, images_dtype = _kernel_dtypes(pred.dtype, images.dtype)
    pred, images = pred.to(pred_dtype), images.to(images_dtype).contiguous()
    if not _rows_contiguous(pred):  # a batch slice such as MAE's decoder_pred(x)[:, 1:] is used in place
        pred = pred.contiguous()
    mask = mask.to(accumulation_dtype(pred_dtype)).contiguous()
    if not _tracing(mask):
        total = mask.sum()
        message = ("mask.sum() is 0: no patch is masked, so the mean over masked patches is undefined "
                   "(MAE's forward_loss would return NaN)")
        if device.type == "cpu":
            if total.item() == 0:
                check.fail(message)
        else:  # no host sync on accelerators: an asynchronous device assert
            # _assert_async fails on a zero value: 2 launches (sum, assert), no separate comparison.
            torch._assert_async(total, f"vitfast.ops.masked_pixel_loss: {message}")

    chosen = BACKENDS.select(device, pred.dtype, backend)
    loss, _ = _masked_pixel_loss_op(pred, images, mask, patch_size, bool(norm_pix), chosen)
    return loss


class MaskedPixelLoss(torch.nn.Module):
    """``masked_pixel_loss`` as a module.

        criterion = MaskedPixelLoss(patch_size=4)          # norm_pix=True, as MAE's best recipe
        loss = criterion(pred, images, mask)
    """

    def __init__(self, patch_size: int, norm_pix: bool = True, *, backend: Optional[str] = None):
        super().__init__()
        self.patch_size, self.norm_pix, self.backend = patch_size, norm_pix, backend

    def forward(self, pred: Tensor, images: Tensor, mask: Tensor) -> Tensor:
        return masked_pixel_loss(pred, images, mask, self.patch_size, self.norm_pix, backend=self.backend)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, norm_pix={self.norm_pix}"
