"""Triton kernels for ``masked_pixel_loss``: MAE's per-patch normalised MSE over masked patches.

Math (``M = B*N`` patch rows, ``E = p*p*C``, patch ``n`` at grid row ``n // S_w``, column ``n % S_w``,
element ``e = (i*p + j)*C + c`` of a row pairs with pixel ``images[b, c, (n // S_w)*p + i, (n % S_w)*p + j]``).
The forward walks a patch in image order ``t = c*p*p + i*p + j`` (runs of p contiguous pixels: coalesced,
vectorised image loads, read up to three times) and reads pred C-strided inside its contiguous row; the
backward walks it in pred order (contiguous pred loads and d_pred stores, C-interleaved pixels):

    target    = pixels of the patch, normalised by their mean and unbiased variance when NORM_PIX
    loss      = sum_m w_m * mean_e (pred[m, e] - target[m, e])^2 / sum_m w_m          (w = mask)
    d_pred    = 2 w_m (pred - target) / (E * sum_m w_m) * grad

Kernels (one program per block of BLOCK_P patch rows; the [M, E] target is never written):

    _mpl_forward_kernel    a [BLOCK_P, BLOCK_E] tile of pred and of the gathered pixels per program; mean and
                           variance two-pass in registers (or in three passes over BLOCK_E chunks when a patch
                           is wider than one tile); writes one partial (weighted loss, weight) pair per program
                           and (mean, 1/std) per row
    _mpl_finalize_kernel   one program: loss = sum of partial losses / sum of partial weights, both summed in a
                           fixed order (deterministic), in the loss dtype
    _mpl_backward_kernel   d_pred from pred, the pixels and the saved (mean, 1/std), chunk by chunk; the scale
                           2 * grad / (E * sum(mask)) is formed in the kernel from two device scalars

Launches per call (B256, 32 px, p4): forward 2 (kernel + finalize), backward 2 (mask.sum() + kernel).

Rows whose mask weight is 0 are masked out of every load: an unmasked patch costs no memory traffic in the
forward and only its zero store in the backward. Accumulation is fp32 (fp64 for fp64 pred).
"""
import torch
import triton
import triton.language as tl

from . import AotSpec
from ._common import TRITON_DTYPE, launch_device, signature

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
    origin = b.to(tl.int64) * CHW + (grid_row * (PATCH * W) + grid_col * PATCH).to(tl.int64)
    return tl.multiple_of(origin, PATCH)  # C*H*W and W are multiples of p


@triton.jit
def _tile_offsets(t, W, HW, PATCH: tl.constexpr, CHANNELS: tl.constexpr, IMAGE_ORDER: tl.constexpr):
    """Tile column t -> (offset c*H*W + i*W + j of its pixel inside the patch, index e = (i*p + j)*C + c of MAE's
    patchify order inside the pred row). IMAGE_ORDER: t = c*p*p + i*p + j, runs of p contiguous pixels (coalesced
    image loads, pred read C-strided); else t = e (contiguous pred, pixels C-interleaved). Equal when C == 1."""
    if IMAGE_ORDER or CHANNELS == 1:
        c = t // (PATCH * PATCH)
        pixel = t - c * (PATCH * PATCH)  # i*p + j
        i = pixel // PATCH
        # Runs of p contiguous pixels starting at multiples of p (W and H*W are multiples of p): vector loads.
        pix_off = tl.max_contiguous(tl.multiple_of(c * HW + i * W + (pixel - i * PATCH), PATCH), PATCH)
        e = t if CHANNELS == 1 else pixel * CHANNELS + c
    else:
        pixel = t // CHANNELS
        c = t - pixel * CHANNELS
        i = pixel // PATCH
        pix_off = c * HW + i * W + (pixel - i * PATCH)
        e = t
    return pix_off, e


@triton.jit
def _load_tile(images_ptr, pred_row, origin, t, inside, W, HW,
               PATCH: tl.constexpr, CHANNELS: tl.constexpr, ACC: tl.constexpr, IMAGE_ORDER: tl.constexpr):
    """([BLOCK_P, BLOCK_E] pixels, pred values, pred indices e) of tile columns t; 0 outside `inside`."""
    pix_off, e = _tile_offsets(t, W, HW, PATCH, CHANNELS, IMAGE_ORDER)
    pix = tl.load(images_ptr + origin[:, None] + pix_off[None, :], mask=inside, other=0.0).to(ACC)
    x = tl.load(pred_row[:, None] + e[None, :], mask=inside, other=0.0).to(ACC)
    return pix, x, e


@triton.jit
def _load_pixels(images_ptr, origin, t, inside, W, HW,
                 PATCH: tl.constexpr, CHANNELS: tl.constexpr, ACC: tl.constexpr):
    """[BLOCK_P, BLOCK_E] pixels of tile columns t (image order) of the patches at `origin`; 0 outside `inside`."""
    pix_off, _ = _tile_offsets(t, W, HW, PATCH, CHANNELS, True)
    return tl.load(images_ptr + origin[:, None] + pix_off[None, :], mask=inside, other=0.0).to(ACC)


@triton.jit
def _mpl_forward_kernel(
    pred_ptr, images_ptr, mask_ptr, partial_ptr, stats_ptr,
    M, N, E, W, HW, CHW, S_w, stride_pred_b, NUM_PROGRAMS,
    PATCH: tl.constexpr, CHANNELS: tl.constexpr, NORM_PIX: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    # partial_ptr: [2, NUM_PROGRAMS] (weighted loss, weight) per program, in the accumulation dtype.
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
        t = tl.arange(0, BLOCK_E)
        inside = active[:, None] & (t < E)[None, :]
        pix, x, _ = _load_tile(images_ptr, pred_row, origin, t, inside, W, HW, PATCH, CHANNELS, ACC, True)
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
            for t0 in range(0, E, BLOCK_E):
                t = t0 + tl.arange(0, BLOCK_E)
                inside = active[:, None] & (t < E)[None, :]
                total += tl.sum(_load_pixels(images_ptr, origin, t, inside, W, HW, PATCH, CHANNELS, ACC), axis=1)
            mean = total / E
            m2 = tl.zeros((BLOCK_P,), dtype=ACC)
            for t0 in range(0, E, BLOCK_E):
                t = t0 + tl.arange(0, BLOCK_E)
                inside = active[:, None] & (t < E)[None, :]
                pix = _load_pixels(images_ptr, origin, t, inside, W, HW, PATCH, CHANNELS, ACC)
                centred = tl.where(inside, pix - mean[:, None], 0.0)
                m2 += tl.sum(centred * centred, axis=1)
            rstd = 1.0 / tl.sqrt(m2 / (E - 1) + NORM_PIX_EPS)
        squared = tl.zeros((BLOCK_P,), dtype=ACC)
        for t0 in range(0, E, BLOCK_E):
            t = t0 + tl.arange(0, BLOCK_E)
            inside = active[:, None] & (t < E)[None, :]
            pix, x, _ = _load_tile(images_ptr, pred_row, origin, t, inside, W, HW, PATCH, CHANNELS, ACC, True)
            d = tl.where(inside, x - (pix - mean[:, None]) * rstd[:, None], 0.0)
            squared += tl.sum(d * d, axis=1)

    row_loss = tl.where(active, w.to(ACC) * (squared / E), 0.0)
    tl.store(partial_ptr + pid, tl.sum(row_loss, axis=0))
    tl.store(partial_ptr + NUM_PROGRAMS + pid, tl.sum(w.to(ACC), axis=0))  # 0 outside M
    if NORM_PIX:
        tl.store(stats_ptr + rows.to(tl.int64) * 2, tl.where(active, mean, 0.0), mask=row_in)
        tl.store(stats_ptr + rows.to(tl.int64) * 2 + 1, tl.where(active, rstd, 0.0), mask=row_in)


@triton.jit
def _mpl_finalize_kernel(partial_ptr, loss_ptr, NUM_PARTIALS, BLOCK: tl.constexpr):
    """loss = sum(partial[0]) / sum(partial[1]): one program, a fixed summation order."""
    acc_loss = tl.zeros((BLOCK,), dtype=partial_ptr.dtype.element_ty)
    acc_weight = tl.zeros((BLOCK,), dtype=partial_ptr.dtype.element_ty)
    for i0 in range(0, NUM_PARTIALS, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        acc_loss += tl.load(partial_ptr + i, mask=i < NUM_PARTIALS, other=0.0)
        acc_weight += tl.load(partial_ptr + NUM_PARTIALS + i, mask=i < NUM_PARTIALS, other=0.0)
    loss = tl.sum(acc_loss, axis=0) / tl.sum(acc_weight, axis=0)
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))


@triton.jit
def _mpl_backward_kernel(
    pred_ptr, images_ptr, mask_ptr, stats_ptr, grad_ptr, mask_sum_ptr, dpred_ptr,
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
    pred_row = pred_ptr + b.to(tl.int64) * stride_pred_b + n.to(tl.int64) * E
    if NORM_PIX:
        mean = tl.load(stats_ptr + rows.to(tl.int64) * 2, mask=active, other=0.0).to(ACC)
        rstd = tl.load(stats_ptr + rows.to(tl.int64) * 2 + 1, mask=active, other=0.0).to(ACC)
    else:
        mean = tl.zeros((BLOCK_P,), dtype=ACC)
        rstd = tl.full((BLOCK_P,), 1.0, dtype=ACC)
    # d loss / d pred = 2 * grad / (E * sum(mask)) * w * (pred - target), the reference's formula.
    scale = tl.load(grad_ptr).to(ACC) * 2 / (E * tl.load(mask_sum_ptr).to(ACC))
    coef = scale * w
    out_row = dpred_ptr + rows.to(tl.int64) * E  # d_pred is contiguous
    for t0 in range(0, E, BLOCK_E):
        t = t0 + tl.arange(0, BLOCK_E)
        t_in = (t < E)[None, :]
        inside = active[:, None] & t_in
        # Pred order: contiguous pred loads and d_pred stores (the pixels are C-interleaved here).
        pix, x, e = _load_tile(images_ptr, pred_row, origin, t, inside, W, HW, PATCH, CHANNELS, ACC, False)
        grad = coef[:, None] * (x - (pix - mean[:, None]) * rstd[:, None])
        grad = tl.where(inside, grad, 0.0)  # unmasked rows get exact zeros whatever the scale
        tl.store(out_row[:, None] + e[None, :], grad.to(dpred_ptr.dtype.element_ty), mask=row_in[:, None] & t_in)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------
FINALIZE_BLOCK = 1024
_MAX_ROWS = 2 ** 31 - 2 ** 16  # row indices are int32 in the kernels (offsets that scale with them are int64)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _geometry(images: torch.Tensor, patch_size: int) -> dict:
    _, C, H, W = images.shape
    return dict(N=(H // patch_size) * (W // patch_size), W=W, HW=H * W, CHW=C * H * W, S_w=W // patch_size)


def forward_grid(num_rows: int, cfg: dict) -> tuple:
    """Programs of the forward and backward kernels: one per BLOCK_P rows, all on axis 0 (up to 2^31 - 1)."""
    if num_rows > _MAX_ROWS:
        raise ValueError(f"masked_pixel_loss (triton): B*N must be below {_MAX_ROWS}, got {num_rows}")
    return (triton.cdiv(num_rows, cfg["BLOCK_P"]),)


def masked_pixel_loss_forward(pred, images, mask, patch_size: int, norm_pix: bool) -> tuple:
    """(loss [] in the promoted dtype of pred and images, stats [B, N, 2] or [0] in mask's dtype) from pred
    [B, N, E] (contiguous rows, any batch stride), images [B, C, H, W], mask [B, N] (fp32, fp64 for fp64 pred).
    Inputs are validated; all but pred are contiguous. Two launches: the kernel and the finalize."""
    B, N, E = pred.shape
    M = B * N
    stats = torch.empty((B, N, 2) if norm_pix else (0,), device=pred.device, dtype=mask.dtype)
    loss = torch.empty((), device=pred.device, dtype=torch.promote_types(pred.dtype, images.dtype))
    cfg = launch_config(E, pred.dtype)
    grid = forward_grid(M, cfg)
    partial = torch.empty((2, grid[0]), device=pred.device, dtype=mask.dtype)  # every program writes its pair
    with launch_device(pred):
        if M > 0:
            _mpl_forward_kernel[grid](
                pred, images, mask, partial, stats if norm_pix else partial, M, E=E, stride_pred_b=pred.stride(0),
                NUM_PROGRAMS=grid[0], **_geometry(images, patch_size),
                PATCH=patch_size, CHANNELS=images.shape[1], NORM_PIX=norm_pix, ACC=_acc(pred.dtype),
                SINGLE_TILE=E <= cfg["BLOCK_E"], **cfg,
            )
        _mpl_finalize_kernel[(1,)](partial, loss, grid[0], BLOCK=FINALIZE_BLOCK)
    return loss, stats


def masked_pixel_loss_backward(grad_loss, pred, images, mask, stats, patch_size: int, norm_pix: bool) -> torch.Tensor:
    """d_pred [B, N, E] in pred's dtype; the target is recomputed from images and the forward's stats.
    Two launches: mask.sum() and the kernel."""
    B, N, E = pred.shape
    M = B * N
    d_pred = torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)  # contiguous
    if M == 0 or E == 0:
        return d_pred
    cfg = launch_config(E, pred.dtype)
    grid = forward_grid(M, cfg)
    with launch_device(pred):
        _mpl_backward_kernel[grid](
            pred, images, mask, stats if norm_pix else mask, grad_loss, mask.sum(), d_pred, M, E=E,
            stride_pred_b=pred.stride(0), **_geometry(images, patch_size),
            PATCH=patch_size, CHANNELS=images.shape[1], NORM_PIX=norm_pix, ACC=_acc(pred.dtype), **cfg,
        )
    return d_pred


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (walked by vitfast.compile_check)
# ---------------------------------------------------------------------------------------------------
_TRITON_DTYPE = {**TRITON_DTYPE, torch.float64: "fp64"}  # this op's Triton backend also takes float64
_INTS = ("M", "N", "E", "W", "HW", "CHW", "S_w", "stride_pred_b", "NUM_PROGRAMS", "NUM_PARTIALS")


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
            fn, signature(fn, dict(pred_ptr=pt, images_ptr=it, mask_ptr=acc, partial_ptr=acc, stats_ptr=acc), _INTS),
            dict(common, SINGLE_TILE=channels * patch * patch <= cfg["BLOCK_E"]),
            variant=label, aligned=aligned + ("partial_ptr",), **launch))
        fn = _mpl_backward_kernel
        loss_ty = _TRITON_DTYPE[torch.promote_types(pred_dtype, images_dtype)]
        specs.append(AotSpec(
            fn, signature(fn, dict(pred_ptr=pt, images_ptr=it, mask_ptr=acc, stats_ptr=acc, grad_ptr=loss_ty,
                                   mask_sum_ptr=acc, dpred_ptr=pt), _INTS),
            common, variant=label, aligned=aligned + ("grad_ptr", "mask_sum_ptr", "dpred_ptr"), **launch))
    for acc, loss_types in (("fp32", ("fp32", "fp16", "bf16")), ("fp64", ("fp64",))):
        for loss_ty in loss_types:
            fn = _mpl_finalize_kernel
            specs.append(AotSpec(fn, signature(fn, dict(partial_ptr=acc, loss_ptr=loss_ty), _INTS),
                                 dict(BLOCK=FINALIZE_BLOCK), variant=f"{acc}->{loss_ty}", num_warps=4, num_stages=1,
                                 aligned=("partial_ptr", "loss_ptr")))
    return specs


AOT_SPECS = _aot_specs()
