"""Triton kernels for ``masked_pixel_loss``: MAE's per-patch normalised MSE over masked patches.

Math (``M = B*N`` patch rows, ``E = p*p*C``, patch ``n`` at grid row ``n // S_w``, column ``n % S_w``,
element ``e = (i*p + j)*C + c`` of a row pairs with pixel ``images[b, c, (n // S_w)*p + i, (n % S_w)*p + j]``):

    target    = pixels of the patch, normalised by their mean and unbiased variance when NORM_PIX
    loss      = sum_m w_m * mean_e (pred[m, e] - target[m, e])^2 / sum_m w_m          (w = mask)
    d_pred    = 2 w_m (pred - target) / (E * sum_m w_m) * grad

Kernels (one program per block of BLOCK_P patch rows; the [M, E] target is never written):

    _mpl_forward_kernel    a [BLOCK_P, BLOCK_E] tile of pred and of the gathered pixels per program; mean and
                           variance two-pass in registers (or in three passes over BLOCK_E chunks when a patch
                           is wider than one tile); writes one partial loss per program (summed afterwards in
                           a fixed order: deterministic) and (mean, 1/std) per row
    _mpl_backward_kernel   d_pred from pred, the pixels and the saved (mean, 1/std), chunk by chunk

Rows whose mask weight is 0 are masked out of every load: an unmasked patch costs no memory traffic in the
forward and only its zero store in the backward. Accumulation is fp32 (fp64 for fp64 pred).
"""
import torch
import triton
import triton.language as tl

from . import AotSpec

NORM_PIX_EPS = tl.constexpr(1e-6)  # MAE: (var + 1.e-6) ** .5

# ---------------------------------------------------------------------------------------------------
# Launch parameters: one table, keyed by pred dtype; the launchers and AOT_SPECS both read it.
# TILE = BLOCK_P * BLOCK_E elements per program; BLOCK_E = next power of two >= E, at most MAX_BLOCK_E
# (wider patches are walked in chunks). Chosen so that every variant compiles with 0 spills on sm_80 and
# sm_90 (python -m vitfast.compile_check).
# ---------------------------------------------------------------------------------------------------
_HALF = dict(TILE=2048, MAX_BLOCK_E=2048, num_warps=4, num_stages=1)
CONFIG = {
    torch.float32: dict(TILE=2048, MAX_BLOCK_E=2048, num_warps=4, num_stages=1),
    torch.float16: _HALF,
    torch.bfloat16: _HALF,
    torch.float64: dict(TILE=1024, MAX_BLOCK_E=1024, num_warps=4, num_stages=1),
}
del _HALF


def launch_config(patch_len: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options for rows of ``patch_len`` elements of pred ``dtype``."""
    cfg = CONFIG[dtype]
    block_e = min(triton.next_power_of_2(max(patch_len, 1)), cfg["MAX_BLOCK_E"])
    return dict(BLOCK_P=max(1, cfg["TILE"] // block_e), BLOCK_E=block_e,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _split_rows(rows, N):
    """Patch row m = b*N + n -> (b, n)."""
    b = rows // N
    return b, rows - b * N


@triton.jit
def _patch_origin(b, n, W, CHW, S_w, PATCH: tl.constexpr):
    """Offset (int64, elements) of pixel (channel 0, row 0, col 0) of patch n of image b."""
    grid_row = n // S_w
    grid_col = n - grid_row * S_w
    return b.to(tl.int64) * CHW + (grid_row * (PATCH * W) + grid_col * PATCH).to(tl.int64)


@triton.jit
def _pixel_offset(e, W, HW, PATCH: tl.constexpr, CHANNELS: tl.constexpr):
    """Offset inside a patch of element e = (i*p + j)*C + c of MAE's patchify order: c*H*W + i*W + j."""
    pixel = e // CHANNELS
    c = e - pixel * CHANNELS
    i = pixel // PATCH
    j = pixel - i * PATCH
    return c * HW + i * W + j


@triton.jit
def _load_pixels(images_ptr, origin, e, inside, W, HW,
                 PATCH: tl.constexpr, CHANNELS: tl.constexpr, ACC: tl.constexpr):
    """[BLOCK_P, BLOCK_E] pixels of the patches at `origin`, in MAE's (i, j, c) order; 0 outside `inside`."""
    offsets = origin[:, None] + _pixel_offset(e, W, HW, PATCH, CHANNELS)[None, :]
    return tl.load(images_ptr + offsets, mask=inside, other=0.0).to(ACC)


@triton.jit
def _mpl_forward_kernel(
    pred_ptr, images_ptr, mask_ptr, partial_ptr, stats_ptr,
    M, N, E, W, HW, CHW, S_w, stride_pred_b,
    PATCH: tl.constexpr, CHANNELS: tl.constexpr, NORM_PIX: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    row_in = rows < M
    w = tl.load(mask_ptr + rows, mask=row_in, other=0.0)
    active = row_in & (w != 0)  # a NaN weight is active and propagates
    b, n = _split_rows(rows, N)
    origin = _patch_origin(b, n, W, CHW, S_w, PATCH)
    pred_row = pred_ptr + b.to(tl.int64) * stride_pred_b + n.to(tl.int64) * E
    mean = tl.zeros((BLOCK_P,), dtype=ACC)
    rstd = tl.full((BLOCK_P,), 1.0, dtype=ACC)

    if SINGLE_TILE:
        # The whole patch is one tile row: exact two-pass statistics in registers.
        e = tl.arange(0, BLOCK_E)
        inside = active[:, None] & (e < E)[None, :]
        pix = _load_pixels(images_ptr, origin, e, inside, W, HW, PATCH, CHANNELS, ACC)
        x = tl.load(pred_row[:, None] + e[None, :], mask=inside, other=0.0).to(ACC)
        if NORM_PIX:
            mean = tl.sum(pix, axis=1) / E
            centred = tl.where(inside, pix - mean[:, None], 0.0)
            var = tl.sum(centred * centred, axis=1) / (E - 1)
            rstd = 1.0 / tl.sqrt(var + NORM_PIX_EPS)
            d = x - centred * rstd[:, None]
        else:
            d = x - pix
        d = tl.where(inside, d, 0.0)
        squared = tl.sum(d * d, axis=1)
    else:
        # Patches wider than a tile: mean, then centred sum of squares, then the error, chunk by chunk
        # (the second and third passes re-read the pixels from cache).
        if NORM_PIX:
            total = tl.zeros((BLOCK_P,), dtype=ACC)
            for e0 in range(0, E, BLOCK_E):
                e = e0 + tl.arange(0, BLOCK_E)
                inside = active[:, None] & (e < E)[None, :]
                total += tl.sum(_load_pixels(images_ptr, origin, e, inside, W, HW, PATCH, CHANNELS, ACC), axis=1)
            mean = total / E
            m2 = tl.zeros((BLOCK_P,), dtype=ACC)
            for e0 in range(0, E, BLOCK_E):
                e = e0 + tl.arange(0, BLOCK_E)
                inside = active[:, None] & (e < E)[None, :]
                pix = _load_pixels(images_ptr, origin, e, inside, W, HW, PATCH, CHANNELS, ACC)
                centred = tl.where(inside, pix - mean[:, None], 0.0)
                m2 += tl.sum(centred * centred, axis=1)
            rstd = 1.0 / tl.sqrt(m2 / (E - 1) + NORM_PIX_EPS)
        squared = tl.zeros((BLOCK_P,), dtype=ACC)
        for e0 in range(0, E, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            inside = active[:, None] & (e < E)[None, :]
            pix = _load_pixels(images_ptr, origin, e, inside, W, HW, PATCH, CHANNELS, ACC)
            x = tl.load(pred_row[:, None] + e[None, :], mask=inside, other=0.0).to(ACC)
            d = tl.where(inside, x - (pix - mean[:, None]) * rstd[:, None], 0.0)
            squared += tl.sum(d * d, axis=1)

    row_loss = tl.where(active, w.to(ACC) * (squared / E), 0.0)
    tl.store(partial_ptr + pid, tl.sum(row_loss, axis=0))
    if NORM_PIX:
        tl.store(stats_ptr + rows.to(tl.int64) * 2, tl.where(active, mean, 0.0), mask=row_in)
        tl.store(stats_ptr + rows.to(tl.int64) * 2 + 1, tl.where(active, rstd, 0.0), mask=row_in)


@triton.jit
def _mpl_backward_kernel(
    pred_ptr, images_ptr, mask_ptr, stats_ptr, scale_ptr, dpred_ptr,
    M, N, E, W, HW, CHW, S_w, stride_pred_b,
    PATCH: tl.constexpr, CHANNELS: tl.constexpr, NORM_PIX: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    row_in = rows < M
    w = tl.load(mask_ptr + rows, mask=row_in, other=0.0).to(ACC)
    active = row_in & (w != 0)
    b, n = _split_rows(rows, N)
    origin = _patch_origin(b, n, W, CHW, S_w, PATCH)
    pred_row = b.to(tl.int64) * stride_pred_b + n.to(tl.int64) * E
    if NORM_PIX:
        mean = tl.load(stats_ptr + rows.to(tl.int64) * 2, mask=active, other=0.0).to(ACC)
        rstd = tl.load(stats_ptr + rows.to(tl.int64) * 2 + 1, mask=active, other=0.0).to(ACC)
    else:
        mean = tl.zeros((BLOCK_P,), dtype=ACC)
        rstd = tl.full((BLOCK_P,), 1.0, dtype=ACC)
    coef = tl.load(scale_ptr).to(ACC) * w
    offset = rows.to(tl.int64) * E  # d_pred is contiguous
    for e0 in range(0, E, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_in = (e < E)[None, :]
        inside = active[:, None] & e_in
        pix = _load_pixels(images_ptr, origin, e, inside, W, HW, PATCH, CHANNELS, ACC)
        x = tl.load(pred_ptr + pred_row[:, None] + e[None, :], mask=inside, other=0.0).to(ACC)
        grad = coef[:, None] * (x - (pix - mean[:, None]) * rstd[:, None])
        grad = tl.where(inside, grad, 0.0)  # unmasked rows get exact zeros whatever the scale
        tl.store(dpred_ptr + offset[:, None] + e[None, :], grad.to(dpred_ptr.dtype.element_ty),
                 mask=row_in[:, None] & e_in)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------
def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _geometry(images: torch.Tensor, patch_size: int) -> dict:
    _, C, H, W = images.shape
    return dict(N=(H // patch_size) * (W // patch_size), W=W, HW=H * W, CHW=C * H * W, S_w=W // patch_size)


def masked_pixel_loss_forward(pred, images, mask, patch_size: int, norm_pix: bool) -> tuple:
    """(loss [] in the promoted dtype of pred and images, stats [B, N, 2] or [0] in mask's dtype) from pred
    [B, N, E] (contiguous rows, any batch stride), images [B, C, H, W], mask [B, N] (fp32, fp64 for fp64 pred).
    Inputs are validated; all but pred are contiguous."""
    B, N, E = pred.shape
    channels = images.shape[1]
    M = B * N
    stats = torch.empty((B, N, 2) if norm_pix else (0,), device=pred.device, dtype=mask.dtype)
    cfg = launch_config(E, pred.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_P"]),)
    partial = torch.zeros(grid[0] if M else 0, device=pred.device, dtype=mask.dtype)
    if M > 0:
        _mpl_forward_kernel[grid](
            pred, images, mask, partial, stats if norm_pix else partial, M, E=E, stride_pred_b=pred.stride(0),
            **_geometry(images, patch_size),
            PATCH=patch_size, CHANNELS=channels, NORM_PIX=norm_pix, ACC=_acc(pred.dtype),
            SINGLE_TILE=E <= cfg["BLOCK_E"], **cfg,
        )
    loss = partial.sum() / mask.sum()
    return loss.to(torch.promote_types(pred.dtype, images.dtype)), stats


def masked_pixel_loss_backward(grad_loss, pred, images, mask, stats, patch_size: int, norm_pix: bool) -> torch.Tensor:
    """d_pred [B, N, E] in pred's dtype; the target is recomputed from images and the forward's stats."""
    B, N, E = pred.shape
    M = B * N
    d_pred = torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)  # contiguous
    if M == 0 or E == 0:
        return d_pred
    scale = (grad_loss.reshape(1).to(mask.dtype) * 2 / (E * mask.sum())).contiguous()
    cfg = launch_config(E, pred.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_P"]),)
    _mpl_backward_kernel[grid](
        pred, images, mask, stats if norm_pix else mask, scale, d_pred, M, E=E, stride_pred_b=pred.stride(0),
        **_geometry(images, patch_size),
        PATCH=patch_size, CHANNELS=images.shape[1], NORM_PIX=norm_pix, ACC=_acc(pred.dtype), **cfg,
    )
    return d_pred


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (walked by vitfast.compile_check)
# ---------------------------------------------------------------------------------------------------
_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
_INTS = ("M", "N", "E", "W", "HW", "CHW", "S_w", "stride_pred_b")


def _signature(kernel, pointers: dict) -> dict:
    """Signature in argument order: pointers by name, the geometry scalars i32, everything else constexpr."""
    return {name: ("*" + pointers[name] if name in pointers else "i32" if name in _INTS else "constexpr")
            for name in kernel.arg_names}


def _aot_specs() -> list:
    specs = []
    # (pred dtype, images dtype, p, C): the small-data ViTs (p=4 on 32 px, RGB and grayscale), ViT-B/16, an
    # autocast decoder (fp16/bf16 pred against fp32 images), fp64, and p=32 (E = 3072 > one tile: chunked path).
    variants = [(torch.float32, torch.float32, 4, 3), (torch.float32, torch.float32, 16, 3),
                (torch.float16, torch.float16, 4, 1), (torch.float16, torch.float32, 16, 3),
                (torch.bfloat16, torch.float32, 4, 3), (torch.float64, torch.float64, 8, 3),
                (torch.float32, torch.float32, 32, 3)]
    for pred_dtype, images_dtype, patch, channels in variants:
        pt, it = _TRITON_DTYPE[pred_dtype], _TRITON_DTYPE[images_dtype]
        acc = "fp64" if pred_dtype == torch.float64 else "fp32"
        cfg = launch_config(channels * patch * patch, pred_dtype)
        blocks = dict(BLOCK_P=cfg["BLOCK_P"], BLOCK_E=cfg["BLOCK_E"])
        launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        label = f"{pt}{'/' + it if it != pt else ''} p={patch} C={channels}"
        common = dict(PATCH=patch, CHANNELS=channels, NORM_PIX=True, ACC=_acc(pred_dtype), **blocks)
        aligned = ("pred_ptr", "images_ptr", "mask_ptr", "stats_ptr", "E", "W", "HW", "CHW", "stride_pred_b")
        fn = _mpl_forward_kernel
        specs.append(AotSpec(
            fn, _signature(fn, dict(pred_ptr=pt, images_ptr=it, mask_ptr=acc, partial_ptr=acc, stats_ptr=acc)),
            dict(common, SINGLE_TILE=channels * patch * patch <= cfg["BLOCK_E"]),
            variant=label, aligned=aligned + ("partial_ptr",), **launch))
        fn = _mpl_backward_kernel
        specs.append(AotSpec(
            fn, _signature(fn, dict(pred_ptr=pt, images_ptr=it, mask_ptr=acc, stats_ptr=acc, scale_ptr=acc,
                                    dpred_ptr=pt)),
            common, variant=label, aligned=aligned + ("scale_ptr", "dpred_ptr"), **launch))
    return specs


AOT_SPECS = _aot_specs()
