"""Triton kernels for ``masked_patch_embed``: patchify + linear embed of the kept patches only + pos-embed.

Math (``M = B*K`` token rows, ``E = C*p*p``, patch ``n`` at grid row ``n // S_w``, column ``n % S_w``):

    tokens[b, k, :] = weight @ patch(b, keep_idx[b, k]) + bias + pos_embed[pos_idx[b, k]]     [B, K, D]
    patch(b, n)[c*p*p + i*p + j] = images[b, c, (n // S_w)*p + i, (n % S_w)*p + j]

Kernels (flash-style: the gathered-patch matrix [M, E] is never written; every kernel gathers the
pixels of its tile straight from ``images`` through ``keep_idx``):

    _mpe_forward_kernel        tokens = gather(images) @ weight^T (+ bias + pos_embed[pos_idx])
    _mpe_bwd_params_kernel     d_weight = grad^T @ gather(images), d_pos_embed = grad^T @ onehot(pos_idx)
                               (the one-hot matrix is built in registers: a fixed-order segment sum, no
                               sort, no atomics) and d_bias = row sums of grad, in one launch; the rows
                               are cut into a number of splits fixed by the shape (never by the GPU), each
                               writing fp32 partials that _mpe_reduce_splits_kernel sums in split order
    _mpe_reduce_splits_kernel  the fixed-order sum of the split partials into the three gradients
    _mpe_bwd_images_kernel     d_images[kept pixels] += grad @ weight (atomic scatter into an fp32 buffer:
                               exact and deterministic unless a row repeats a keep_idx)

Every grid is one-dimensional (axis 0 holds up to 2^31 - 1 programs; axes 1 and 2 stop at 65535), and
every launch runs under the input's device. Launches per call at the MAE benchmark shape (B256, 32 px,
p4, D192, ratio .75): forward 1; backward for weight, bias and pos_embed 2 (1 when one split suffices).
Tiles are chosen per shape from small candidate lists (``pick_tiles``); AOT_SPECS holds every candidate.

Accumulation is fp32 everywhere. fp16/bf16 dots run on tensor cores; fp32 dots are IEEE when
``torch.get_float32_matmul_precision() == "highest"``, TF32 otherwise; the one-hot dot of d_pos_embed
is exact in every precision (IEEE for fp32).
"""
import torch
import triton
import triton.language as tl

from . import AotSpec
from ._common import TRITON_DTYPE, input_precision, launch_device, signature, split_config

# ---------------------------------------------------------------------------------------------------
# Launch parameters: candidate tiles per kernel and dtype class ("half" = fp16/bf16); pick_tiles() chooses
# one per shape, AOT_SPECS compiles all of them (0 spills on sm_80 and sm_90a: python -m vitfast.compile_check).
# ---------------------------------------------------------------------------------------------------
FORWARD_TILES = {  # (rows M, columns D, reduction E)
    "half": [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),   # ViT-B/16: D, E = 768
             dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
             dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2)],    # D = 192, E = 48
    "fp32": [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2),
             dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2)],
}
BWD_PARAMS_TILES = {  # (rows D, columns E or positions L, reduction M)
    "half": [dict(BLOCK_D=128, BLOCK_E=64, BLOCK_M=32, num_warps=8, num_stages=3),
             dict(BLOCK_D=64, BLOCK_E=16, BLOCK_M=32, num_warps=4, num_stages=3)],
    "fp32": [dict(BLOCK_D=64, BLOCK_E=64, BLOCK_M=32, num_warps=8, num_stages=1),
             dict(BLOCK_D=64, BLOCK_E=16, BLOCK_M=32, num_warps=4, num_stages=1)],
}
BWD_IMAGES_TILES = {  # (rows M, columns E, reduction D)
    "half": [dict(BLOCK_M=64, BLOCK_E=64, BLOCK_D=32, num_warps=4, num_stages=3)],
    "fp32": [dict(BLOCK_M=64, BLOCK_E=64, BLOCK_D=32, num_warps=8, num_stages=2)],
}
REDUCE_BLOCK = 1024
# About two waves of programs on a 132-SM H100. A constant, not the device's SM count: the d_weight split
# (and so every bit of the result) depends on the shape only.
TARGET_PROGRAMS = 264
MIN_ROWS_PER_SPLIT = 256  # a split's fp32 partial (D*(E+L+1) floats) is amortised over at least this many rows
MAX_ROWS = 2 ** 31 - 2 ** 16  # token-row indices are int32 in the kernels; offsets that scale with them are int64


def _dtype_class(dtype: torch.dtype) -> str:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):  # the op's declaration routes float64 away
        raise TypeError(f"masked_patch_embed (triton) takes float32/float16/bfloat16, got {dtype}")
    return "fp32" if dtype == torch.float32 else "half"


def pick_tiles(candidates: list, rows: int, cols: int, depth: int, names=("BLOCK_M", "BLOCK_N", "BLOCK_K")) -> dict:
    """The candidate with the least padded work (idle lanes of partial tiles along rows, cols and the
    reduction depth), penalised when it makes fewer than TARGET_PROGRAMS programs; ties go to the first
    (largest) tile. Pure Python on sizes: the same shape always gets the same tiles."""
    def cost(cfg):
        br, bc, bd = (cfg[n] for n in names)
        padded = triton.cdiv(rows, br) * br * triton.cdiv(cols, bc) * bc * triton.cdiv(depth, bd) * bd
        programs = triton.cdiv(rows, br) * triton.cdiv(cols, bc)
        return padded / max(1, rows * cols * depth) * max(1.0, TARGET_PROGRAMS / programs)
    return min(candidates, key=cost)


def _check_rows(M: int) -> None:
    if M > MAX_ROWS:
        raise ValueError(f"masked_patch_embed (triton): B*K must be below {MAX_ROWS}, got {M}")


def forward_plan(M: int, D: int, E: int, dtype: torch.dtype) -> tuple:
    """(tile config, grid) of the forward: one axis, D tiles fastest so that neighbouring programs share
    one gathered [BLOCK_M, E] strip of pixels through L2."""
    _check_rows(M)
    cfg = pick_tiles(FORWARD_TILES[_dtype_class(dtype)], M, D, E)
    return cfg, (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(D, cfg["BLOCK_N"]),)


def bwd_images_plan(M: int, D: int, E: int, dtype: torch.dtype) -> tuple:
    _check_rows(M)
    cfg = pick_tiles(BWD_IMAGES_TILES[_dtype_class(dtype)], M, E, D, ("BLOCK_M", "BLOCK_E", "BLOCK_D"))
    return cfg, (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(E, cfg["BLOCK_E"]),)


def bwd_params_plan(M: int, D: int, E: int, L: int, dtype: torch.dtype, want_weight: bool, want_pos: bool) -> dict:
    """Tiles, column tiles (d_weight's E tiles, then d_pos's L tiles; one when only d_bias is wanted), the
    split of the rows and the grid of _mpe_bwd_params_kernel. Depends on the shape only."""
    _check_rows(M)
    cols = (E if want_weight else 0) + (L if want_pos else 0)
    cfg = pick_tiles(BWD_PARAMS_TILES[_dtype_class(dtype)], D, max(cols, 1), M, ("BLOCK_D", "BLOCK_E", "BLOCK_M"))
    e_tiles = triton.cdiv(E, cfg["BLOCK_E"]) if want_weight else 0
    col_tiles = max(1, e_tiles + (triton.cdiv(L, cfg["BLOCK_E"]) if want_pos else 0))
    tiles = triton.cdiv(D, cfg["BLOCK_D"]) * col_tiles
    m_blocks = max(1, triton.cdiv(M, cfg["BLOCK_M"]))
    wanted = max(1, min(m_blocks, triton.cdiv(TARGET_PROGRAMS, tiles), triton.cdiv(M, MIN_ROWS_PER_SPLIT)))
    blocks_per_split = triton.cdiv(m_blocks, wanted)
    split = triton.cdiv(m_blocks, blocks_per_split)
    return dict(cfg=cfg, e_tiles=e_tiles, col_tiles=col_tiles, split=split,
                rows_per_split=blocks_per_split * cfg["BLOCK_M"], grid=(tiles * split,))


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _patch_row_offsets(keep_idx_ptr, rows, row_mask, K, W, CHW, S_w, PATCH: tl.constexpr):
    """Offset (int64, elements) of the top-left pixel of channel 0 of the patch kept by each row."""
    n = tl.load(keep_idx_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    b = rows // K
    grid_row = n // S_w
    grid_col = n - grid_row * S_w
    return b.to(tl.int64) * CHW + (grid_row * (PATCH * W) + grid_col * PATCH).to(tl.int64)


@triton.jit
def _patch_col_offsets(e, W, HW, PATCH: tl.constexpr):
    """Offset inside a patch of patch-vector element e = c*p*p + i*p + j: c*H*W + i*W + j."""
    c = e // (PATCH * PATCH)
    rem = e - c * (PATCH * PATCH)
    i = rem // PATCH
    j = rem - i * PATCH
    return c * HW + i * W + j


@triton.jit
def _mpe_forward_kernel(
    images_ptr, weight_ptr, bias_ptr, pos_embed_ptr, keep_idx_ptr, pos_idx_ptr, out_ptr,
    M, K, D, E, W, HW, CHW, S_w,
    PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One axis (no 65535 cap); D tiles fastest so that neighbouring programs share one gathered strip in L2.
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(D, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid - pid_m * n_tiles
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < D
    row_off = _patch_row_offsets(keep_idx_ptr, rows, row_mask, K, W, CHW, S_w, PATCH)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, E, BLOCK_K):
        e = k0 + tl.arange(0, BLOCK_K)
        e_mask = e < E
        col_off = _patch_col_offsets(e, W, HW, PATCH)
        a = tl.load(images_ptr + row_off[:, None] + col_off[None, :],
                    mask=row_mask[:, None] & e_mask[None, :], other=0.0)
        w = tl.load(weight_ptr + cols[None, :] * E + e[:, None],
                    mask=e_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        pos = tl.load(pos_idx_ptr + rows, mask=row_mask, other=0)
        acc += tl.load(pos_embed_ptr + pos[:, None] * D + cols[None, :],
                       mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    out = out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _mpe_bwd_params_kernel(
    grad_ptr, images_ptr, keep_idx_ptr, pos_idx_ptr, dweight_ptr, dbias_ptr, dpos_ptr,
    M, K, D, E, W, HW, CHW, S_w, L, ROWS_PER_SPLIT, SPLIT_STRIDE, E_TILES, COL_TILES,
    PATCH: tl.constexpr, HAS_DBIAS: tl.constexpr, HAS_DPOS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Program = (split, D tile, column tile), column tiles fastest. Column tiles [0, E_TILES) are d_weight
    # tiles (B operand: gathered pixels); the others are d_pos tiles of BLOCK_E positions (B operand: the
    # one-hot [BLOCK_M, BLOCK_E] matrix of pos_idx, or nothing when only d_bias is wanted). Column tile 0
    # also sums d_bias. Outputs are offset by split * SPLIT_STRIDE (fp32 partials; 0 with one split).
    pid = tl.program_id(0)
    col = pid % COL_TILES
    rest = pid // COL_TILES
    d_tiles = tl.cdiv(D, BLOCK_D)
    pid_d = rest % d_tiles
    split = rest // d_tiles
    is_weight = col < E_TILES
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    c = tl.where(is_weight, col, col - E_TILES) * BLOCK_E + tl.arange(0, BLOCK_E)  # e, or a position
    c_mask = c < tl.where(is_weight, E, L)
    col_off = _patch_col_offsets(c, W, HW, PATCH)

    acc = tl.zeros((BLOCK_D, BLOCK_E), dtype=tl.float32)
    db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    m_start = split * ROWS_PER_SPLIT
    m_end = tl.minimum(M, m_start + ROWS_PER_SPLIT)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < m_end
        g = tl.load(grad_ptr + rows.to(tl.int64)[None, :] * D + d[:, None],
                    mask=d_mask[:, None] & row_mask[None, :], other=0.0)
        if is_weight:
            row_off = _patch_row_offsets(keep_idx_ptr, rows, row_mask, K, W, CHW, S_w, PATCH)
            a = tl.load(images_ptr + row_off[:, None] + col_off[None, :],
                        mask=row_mask[:, None] & c_mask[None, :], other=0.0)
            acc = tl.dot(g, a, acc, input_precision=INPUT_PRECISION)
        elif HAS_DPOS:
            pos = tl.load(pos_idx_ptr + rows, mask=row_mask, other=-1)
            onehot = tl.where(pos[:, None] == c[None, :], 1.0, 0.0).to(g.dtype)
            acc = tl.dot(g, onehot, acc, input_precision="ieee")  # exact products: a plain segment sum
        if HAS_DBIAS:
            # Costs 1/(2*BLOCK_E) of the dot; only column tile 0 stores it.
            db += tl.sum(g.to(tl.float32), axis=1)

    offset = split.to(tl.int64) * SPLIT_STRIDE
    if is_weight:
        tl.store(dweight_ptr + offset + d[:, None] * E + c[None, :], acc.to(dweight_ptr.dtype.element_ty),
                 mask=d_mask[:, None] & c_mask[None, :])
    elif HAS_DPOS:
        tl.store(dpos_ptr + offset + c[None, :].to(tl.int64) * D + d[:, None], acc.to(dpos_ptr.dtype.element_ty),
                 mask=d_mask[:, None] & c_mask[None, :])
    if HAS_DBIAS:
        if col == 0:
            tl.store(dbias_ptr + offset + d, db.to(dbias_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _mpe_reduce_splits_kernel(ws_ptr, dweight_ptr, dbias_ptr, dpos_ptr, SPLIT, SPLIT_STRIDE, DE, DB,
                              BLOCK: tl.constexpr):
    # ws: fp32 [SPLIT, SPLIT_STRIDE] = per split [d_weight (DE) | d_bias (DB) | d_pos (the rest)]; summed
    # over the splits in order (deterministic) and written in the gradients' dtype.
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = i < SPLIT_STRIDE
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    src = ws_ptr + i
    for _ in range(0, SPLIT):
        acc += tl.load(src, mask=inside, other=0.0)
        src += SPLIT_STRIDE
    tl.store(dweight_ptr + i, acc.to(dweight_ptr.dtype.element_ty), mask=i < DE)
    tl.store(dbias_ptr + (i - DE), acc.to(dbias_ptr.dtype.element_ty), mask=(i >= DE) & (i < DE + DB))
    tl.store(dpos_ptr + (i - DE - DB), acc.to(dpos_ptr.dtype.element_ty), mask=(i >= DE + DB) & inside)


@triton.jit
def _mpe_bwd_images_kernel(
    grad_ptr, weight_ptr, keep_idx_ptr, dimages_ptr,
    M, K, D, E, W, HW, CHW, S_w,
    PATCH: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # dimages_ptr: fp32 [B, C, H, W], zero-filled; only kept pixels are touched. One axis, E tiles fastest.
    pid = tl.program_id(0)
    e_tiles = tl.cdiv(E, BLOCK_E)
    pid_m = pid // e_tiles
    pid_e = pid - pid_m * e_tiles
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e < E

    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        g = tl.load(grad_ptr + rows.to(tl.int64)[:, None] * D + d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(weight_ptr + d[:, None] * E + e[None, :], mask=d_mask[:, None] & e_mask[None, :], other=0.0)
        acc = tl.dot(g, w, acc, input_precision=INPUT_PRECISION)

    row_off = _patch_row_offsets(keep_idx_ptr, rows, row_mask, K, W, CHW, S_w, PATCH)
    col_off = _patch_col_offsets(e, W, HW, PATCH)
    # Atomic so that a keep_idx repeated within a row accumulates; with distinct keep_idx every pixel
    # receives exactly one add onto zero, so the result is exact and deterministic.
    tl.atomic_add(dimages_ptr + row_off[:, None] + col_off[None, :], acc,
                  mask=row_mask[:, None] & e_mask[None, :], sem="relaxed")


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------
def _geometry(images: torch.Tensor, keep_idx: torch.Tensor, patch_size: int) -> dict:
    _, C, H, W = images.shape
    return dict(K=keep_idx.shape[1], W=W, HW=H * W, CHW=C * H * W, S_w=W // patch_size)


def masked_patch_embed_forward(images, weight, bias, pos_embed, keep_idx, pos_idx, patch_size: int) -> torch.Tensor:
    """tokens [B, K, D] from images [B, C, H, W], weight [D, C*p*p], bias [D]?, pos_embed [L, D]?,
    keep_idx / pos_idx [B, K] int64. Inputs are validated and contiguous; output dtype = images dtype.
    One launch."""
    B, K = keep_idx.shape
    D, E = weight.shape
    M = B * K
    out = torch.empty((B, K, D), device=images.device, dtype=images.dtype)
    if M == 0 or D == 0:
        return out
    cfg, grid = forward_plan(M, D, E, images.dtype)
    with launch_device(images):
        _mpe_forward_kernel[grid](
            images, weight, bias if bias is not None else weight, pos_embed if pos_embed is not None else weight,
            keep_idx, pos_idx, out,
            M, D=D, E=E, **_geometry(images, keep_idx, patch_size),
            PATCH=patch_size, HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None,
            INPUT_PRECISION=input_precision(images.dtype), **cfg,
        )
    return out


def masked_patch_embed_backward(grad_tokens, images, weight, keep_idx, pos_idx, patch_size: int, num_positions: int,
                                output_mask) -> tuple:
    """(d_images [B,C,H,W], d_weight [D,E], d_bias [D], d_pos_embed [num_positions, D]); None where
    output_mask is False. Gradients come in the dtype of the input they belong to. Launches: d_weight,
    d_bias and d_pos_embed together 1 (one split) or 2 (split partials + their reduction); d_images 1
    (+ a zero fill, + a cast for fp16/bf16)."""
    want_images, want_weight, want_bias, want_pos = (bool(x) for x in output_mask)
    B, K = keep_idx.shape
    D, E = weight.shape
    M = B * K
    dtype = images.dtype
    geometry = _geometry(images, keep_idx, patch_size)
    precision = input_precision(dtype)
    grad_tokens = grad_tokens.contiguous()
    d_images = d_weight = d_bias = d_pos = None

    with launch_device(images):
        if want_images:
            # fp32 buffer so that duplicates in keep_idx accumulate in fp32 (and atomics exist for every dtype).
            buf = torch.zeros(images.shape, device=images.device, dtype=torch.float32)
            if M > 0 and D > 0:
                cfg, grid = bwd_images_plan(M, D, E, dtype)
                _mpe_bwd_images_kernel[grid](
                    grad_tokens, weight, keep_idx, buf, M, D=D, E=E, **geometry,
                    PATCH=patch_size, INPUT_PRECISION=precision, **cfg,
                )
            d_images = buf if dtype == torch.float32 else buf.to(dtype)

        if want_weight or want_bias or want_pos:
            d_weight, d_bias, d_pos = _param_grads(grad_tokens, images, keep_idx, pos_idx, weight, num_positions,
                                                   geometry, patch_size, precision, want_weight, want_bias, want_pos)
    return d_images, d_weight, d_bias, d_pos


def _param_grads(grad_tokens, images, keep_idx, pos_idx, weight, L, geometry, patch_size, precision,
                 want_weight, want_bias, want_pos) -> tuple:
    """d_weight, d_bias, d_pos_embed (None where not wanted) by _mpe_bwd_params_kernel (+ the reduction)."""
    D, E = weight.shape
    M = keep_idx.numel()
    device, dtype = weight.device, weight.dtype
    d_weight = torch.empty((D, E), device=device, dtype=dtype) if want_weight else None
    d_bias = torch.empty((D,), device=device, dtype=dtype) if want_bias else None
    d_pos = torch.empty((L, D), device=device, dtype=dtype) if want_pos else None
    if D == 0:
        return d_weight, d_bias, d_pos
    if M == 0:  # no rows: every sum is empty
        return tuple(None if t is None else t.zero_() for t in (d_weight, d_bias, d_pos))
    plan = bwd_params_plan(M, D, E, L, dtype, want_weight, want_pos)
    sizes = (D * E if want_weight else 0, D if want_bias else 0, L * D if want_pos else 0)
    if plan["split"] == 1:  # the kernel writes the gradients themselves
        outputs, stride = (d_weight, d_bias, d_pos), 0
    else:  # fp32 partials [split, d_weight | d_bias | d_pos], reduced below
        stride = sum(sizes)
        ws = torch.empty((plan["split"], stride), device=device, dtype=torch.float32)
        outputs = (ws, ws[:, sizes[0]:], ws[:, sizes[0] + sizes[1]:])
    dummy = grad_tokens  # stands in for an output that is not wanted (never written)
    outputs = tuple(dummy if t is None else t for t in outputs)
    _mpe_bwd_params_kernel[plan["grid"]](
        grad_tokens, images, keep_idx, pos_idx, *outputs, M, D=D, E=E, L=L, **geometry,
        ROWS_PER_SPLIT=plan["rows_per_split"], SPLIT_STRIDE=stride, E_TILES=plan["e_tiles"],
        COL_TILES=plan["col_tiles"], PATCH=patch_size, HAS_DBIAS=want_bias, HAS_DPOS=want_pos,
        INPUT_PRECISION=precision, **plan["cfg"],
    )
    if plan["split"] > 1:
        finals = tuple(dummy if t is None else t for t in (d_weight, d_bias, d_pos))
        _mpe_reduce_splits_kernel[(triton.cdiv(stride, REDUCE_BLOCK),)](
            ws, *finals, plan["split"], stride, sizes[0], sizes[1], BLOCK=REDUCE_BLOCK)
    return d_weight, d_bias, d_pos


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (walked by vitfast.compile_check)
# ---------------------------------------------------------------------------------------------------
_GEOMETRY_ARGS = ("M", "K", "D", "E", "W", "HW", "CHW", "S_w")


def _aot_specs() -> list:
    specs = []
    # Pointers and the sizes that are multiples of 16 in every ViT (D, E for p >= 4, image sides 32/64/224).
    # fp32 runs IEEE (torch's default precision "highest") or TF32 ("high"); p=16 is ViT-B/16, p=4 the
    # small-data ViTs, where a patch row is only 4 pixels long and the gather is least vectorised.
    # Every tile candidate of every kernel is compiled for each variant.
    variants = [(torch.float32, "ieee", 16), (torch.float32, "tf32", 16), (torch.float16, "tf32", 4),
                (torch.float16, "tf32", 16), (torch.bfloat16, "tf32", 16)]
    for dtype, precision, patch in variants:
        ty = TRITON_DTYPE[dtype]
        half = precision == "tf32"  # tensor cores: fp16/bf16 always, fp32 only as TF32
        label = f"{ty}{'-tf32' if dtype == torch.float32 and half else ''} p={patch}"
        klass = _dtype_class(dtype)
        for cfg in FORWARD_TILES[klass]:
            blocks, launch = split_config(cfg)
            fn = _mpe_forward_kernel
            specs.append(AotSpec(
                fn, signature(fn, dict(images_ptr=ty, weight_ptr=ty, bias_ptr=ty, pos_embed_ptr=ty,
                                        keep_idx_ptr="i64", pos_idx_ptr="i64", out_ptr=ty), _GEOMETRY_ARGS),
                dict(PATCH=patch, HAS_BIAS=True, HAS_POS=True, INPUT_PRECISION=precision, **blocks),
                variant=f"{label} {_tile_label(blocks)}", tensor_cores=half, **launch,
                aligned=("images_ptr", "weight_ptr", "bias_ptr", "pos_embed_ptr", "keep_idx_ptr", "pos_idx_ptr",
                         "out_ptr", "D", "E", "W", "HW", "CHW")))
        for cfg in BWD_PARAMS_TILES[klass]:
            blocks, launch = split_config(cfg)
            fn = _mpe_bwd_params_kernel
            # The split path (fp32 partials): the one-split path differs only in the stores' dtype.
            specs.append(AotSpec(
                fn, signature(fn, dict(grad_ptr=ty, images_ptr=ty, keep_idx_ptr="i64", pos_idx_ptr="i64",
                                        dweight_ptr="fp32", dbias_ptr="fp32", dpos_ptr="fp32"),
                               _GEOMETRY_ARGS + ("L", "ROWS_PER_SPLIT", "SPLIT_STRIDE", "E_TILES", "COL_TILES")),
                dict(PATCH=patch, HAS_DBIAS=True, HAS_DPOS=True, INPUT_PRECISION=precision, **blocks),
                variant=f"{label} {_tile_label(blocks)}", tensor_cores=half, **launch,
                aligned=("grad_ptr", "images_ptr", "keep_idx_ptr", "pos_idx_ptr", "dweight_ptr", "D", "E", "W",
                         "HW", "CHW", "ROWS_PER_SPLIT")))
        for cfg in BWD_IMAGES_TILES[klass]:
            blocks, launch = split_config(cfg)
            fn = _mpe_bwd_images_kernel
            specs.append(AotSpec(
                fn, signature(fn, dict(grad_ptr=ty, weight_ptr=ty, keep_idx_ptr="i64", dimages_ptr="fp32"),
                               _GEOMETRY_ARGS),
                dict(PATCH=patch, INPUT_PRECISION=precision, **blocks),
                variant=f"{label} {_tile_label(blocks)}", tensor_cores=half, **launch,
                aligned=("grad_ptr", "weight_ptr", "keep_idx_ptr", "dimages_ptr", "D", "E", "W", "HW", "CHW")))
    for ty in TRITON_DTYPE.values():
        fn = _mpe_reduce_splits_kernel
        specs.append(AotSpec(
            fn, signature(fn, dict(ws_ptr="fp32", dweight_ptr=ty, dbias_ptr=ty, dpos_ptr=ty),
                           ("SPLIT", "SPLIT_STRIDE", "DE", "DB")),
            dict(BLOCK=REDUCE_BLOCK), variant=ty, num_warps=4, num_stages=1,
            aligned=("ws_ptr", "dweight_ptr", "dbias_ptr", "dpos_ptr", "SPLIT_STRIDE", "DE")))
    return specs


def _tile_label(blocks: dict) -> str:
    return "x".join(str(v) for v in blocks.values())


AOT_SPECS = _aot_specs()
