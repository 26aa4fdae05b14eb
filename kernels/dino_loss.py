"""Triton kernels for ``dino_loss``: the two streaming softmax primitives over the K prototypes (one head of attention).

Kernel-level form (vitfast/ops/dino_loss.py is the contract): x [R, d], keys [K, d], values [K, e] in one dtype,
key_scale, value_scale, bias [K] fp32 (the scales: the fused weight norm, 1 / ||v_k||),
z_rk = scale * key_scale_k * <x_r, keys_k> + bias_k:

    softmax_rows(x, keys, key_scale, values, value_scale, bias, scale) -> (lse [R], out [R, e])    flash-attention fwd
        lse_r = log sum_k exp(z_rk),  out_r = sum_k exp(z_rk - lse_r) value_scale_k values_k
    softmax_columns(x, keys, key_scale, bias, scale, lse, y [R, e] fp32, out [K, e] fp32) -> None    (dV), in place:
        out_k += sum_r exp(z_rk - lse_r) y_r

Kernels (1-D grids, the long dimension on axis 0; offsets that scale with R, K, d or e in int64; outputs fp32):

    _rows_kernel      program per (row tile, e chunk, K split); a loop over the split's K tiles: z by tl.dot (fp32
                      accumulation) times key_scale per column, online base-2 softmax (running max m, sum l),
                      acc += (p * value_scale per column) @ values by tl.dot. One
                      split: writes lse and out. Several (SPLIT): writes the split's (m, l) and unnormalised acc.
    _combine_kernel   SPLIT only: merges the splits' (m, l, acc) in split order into lse and out.
    _columns_kernel   program per (K tile, e chunk); a loop over the row tiles recomputes z (transposed: [K, R])
                      from the saved lse and accumulates exp(z - lse) @ y in registers; then loads its own tile of
                      out, adds and stores it (each tile has one owner: no atomics, no [K, e] buffer).

Splits: the rows are few (DINO: R = 10 * 64 student rows) and K is long (65536), so a row tile alone gives ~10
programs. The K axis is cut into splits of whole tiles until about TARGET_PROGRAMS programs run (a constant, not the
GPU's SM count: results are the same on every GPU and bitwise repeatable). Scratch: (m, l) [S, 2, R] and acc
[S, R, e] fp32 with S <= ceil(TARGET_PROGRAMS / row tiles) + 1, i.e. O(R * e) plus a constant; never [R, K].

d, e: in fp16 / bf16 up to max(d, e) = 256 the whole (zero-padded) row is one BLOCK_D = BLOCK_E chunk: the row tile
is loaded once per program and e is one chunk. Wider rows, and fp32 (whose dots take twice the registers), sum z over
BLOCK_D chunks and cut e into BLOCK_E chunks, one program each (recomputing z per chunk). d, e, R, K need not be
powers of two. Dots take the input dtype: fp16 / bf16 on tensor cores, fp32 as TF32 unless
``torch.get_float32_matmul_precision() == "highest"`` (IEEE). The probabilities (and, in softmax_columns, y) enter the
second dot in the input dtype, as in flash attention: p (rows: p * value_scale) is scaled by 2^8 first (p <= 1; this
keeps fp16's subnormals away from p down to 2^-22) and the fp32 accumulator takes the factor back exactly. In fp16
this needs value_scale < 255 (prototype norms above 1/255; DINO's are near 1). float64 is not taken (the op's
declaration sends it to the reference).
"""
import dataclasses

import torch
import triton
import triton.language as tl

from . import AotSpec
from ._common import TRITON_DTYPE, aot_specs, input_precision, launch_device, signature

_LOG2E = 1.4426950408889634
# Constants read inside the kernels must be constexpr globals.
_LOG2E_C = tl.constexpr(_LOG2E)
_LN2_C = tl.constexpr(0.6931471805599453)
_P_SCALE_C = tl.constexpr(256.0)
_INV_P_SCALE_C = tl.constexpr(1.0 / 256.0)

# ---------------------------------------------------------------------------------------------------
# Launch parameters: [width class][dtype] per kernel, read by the launchers and by AOT_SPECS (python -m
# vitfast.compile_check compiles every entry for sm_80 and sm_90a: 0 spills, mma / wgmma).
# Width classes by max(d, e): d64, d128, d256; "chunked" above 256. ONE_CHUNK: BLOCK_D = BLOCK_E = the class width,
# the row tile held in registers for the whole loop (fp16 / bf16). fp32: small tiles, z summed over 32-wide d chunks,
# 64-wide e chunks, 8 warps (columns: 16 and 32; d 32 / e 64 and d 16 / e 64 spilled 4-32 B on sm_80; with the key /
# value scales the rows' IEEE entry spilled 4 B on sm_80 at 4 warps: 8 warps, 80 registers). DINO's benchmark
# (R = 640 student / 128 teacher rows, K = 65536, d = e = 256): 16-bit row tiles of 64 rows (no idle rows), K tiles
# of 32 (rows) / 64 (columns: 1024 programs).
# ---------------------------------------------------------------------------------------------------
CLASSES = {"d64": 64, "d128": 128, "d256": 256, "chunked": None}
TARGET_PROGRAMS = 264         # rows kernel: cut K into splits until about this many programs (2 per SM of an H100)
MIN_K_TILES_PER_SPLIT = 2     # a split streams at least this many K tiles (else the merge costs more than it saves)


def _per_dtype(half: dict, fp32: dict) -> dict:
    return {torch.float16: half, torch.bfloat16: half, torch.float32: fp32}


def _half(block_d, **cfg):
    return dict(cfg, BLOCK_D=block_d, BLOCK_E=block_d, ONE_CHUNK=True)


_ROWS32 = dict(BLOCK_R=32, BLOCK_K=32, BLOCK_D=32, BLOCK_E=64, ONE_CHUNK=False, num_warps=8, num_stages=1)
ROWS_CONFIG = {
    "d64": _per_dtype(_half(64, BLOCK_R=64, BLOCK_K=64, num_warps=4, num_stages=2), _ROWS32),
    "d128": _per_dtype(_half(128, BLOCK_R=64, BLOCK_K=64, num_warps=8, num_stages=2), _ROWS32),
    "d256": _per_dtype(_half(256, BLOCK_R=64, BLOCK_K=32, num_warps=8, num_stages=2), _ROWS32),
    "chunked": _per_dtype(dict(BLOCK_R=32, BLOCK_K=32, BLOCK_D=64, BLOCK_E=128, ONE_CHUNK=False, num_warps=8,
                               num_stages=1), _ROWS32),
}
_COLS32 = dict(BLOCK_K=32, BLOCK_R=32, BLOCK_D=16, BLOCK_E=32, ONE_CHUNK=False, num_warps=4, num_stages=1)
COLUMNS_CONFIG = {
    "d64": _per_dtype(_half(64, BLOCK_K=64, BLOCK_R=64, num_warps=4, num_stages=2), _COLS32),
    "d128": _per_dtype(_half(128, BLOCK_K=64, BLOCK_R=32, num_warps=8, num_stages=2), _COLS32),
    "d256": _per_dtype(_half(256, BLOCK_K=64, BLOCK_R=32, num_warps=8, num_stages=2), _COLS32),
    "chunked": _per_dtype(dict(BLOCK_K=64, BLOCK_R=32, BLOCK_D=64, BLOCK_E=128, ONE_CHUNK=False, num_warps=8,
                               num_stages=1), _COLS32),
}
COMBINE_CONFIG = dict(BLOCK_R=32, BLOCK_E=64, num_warps=4, num_stages=1)
del _ROWS32, _COLS32


def width_class(d: int, e: int) -> str:
    """The launch-table class of rows of width d (keys) and e (values / y)."""
    widest = max(d, e)
    return next((name for name, w in CLASSES.items() if w is not None and widest <= w), "chunked")


def split_plan(R: int, K: int, E: int, cfg: dict) -> tuple:
    """(splits, K tiles per split) of the rows kernel: whole K tiles, enough splits for about TARGET_PROGRAMS
    programs, at least MIN_K_TILES_PER_SPLIT tiles each; depends on the shapes only."""
    k_tiles = triton.cdiv(K, cfg["BLOCK_K"])
    programs = triton.cdiv(R, cfg["BLOCK_R"]) * triton.cdiv(E, cfg["BLOCK_E"])
    wanted = min(k_tiles, triton.cdiv(TARGET_PROGRAMS, programs))
    per_split = max(MIN_K_TILES_PER_SPLIT, triton.cdiv(k_tiles, max(wanted, 1)))
    return triton.cdiv(k_tiles, per_split), per_split


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _tile_pointers(ptr, row0, n_rows, offs_cols, n_cols, BLOCK_ROWS: tl.constexpr):
    """(pointers, mask) of rows row0 + [0, BLOCK_ROWS) and columns offs_cols of a row-major [n_rows, n_cols] matrix.
    The offset that scales with the row count is one int64 scalar; the tile's own offsets stay int32 (fewer
    registers, and loads vectorise where n_cols is a multiple of 16)."""
    rows = tl.arange(0, BLOCK_ROWS)
    mask = (row0 + rows < n_rows)[:, None] & (offs_cols < n_cols)[None, :]
    return ptr + tl.cast(row0, tl.int64) * n_cols + (rows[:, None] * n_cols + offs_cols[None, :]), mask


@triton.jit
def _tile(ptr, row0, n_rows, offs_cols, n_cols, BLOCK_ROWS: tl.constexpr):
    """Tile [BLOCK_ROWS, len(offs_cols)] of a row-major [n_rows, n_cols] matrix from row row0; 0 outside it."""
    pointers, mask = _tile_pointers(ptr, row0, n_rows, offs_cols, n_cols, BLOCK_ROWS)
    return tl.load(pointers, mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, row0, n_rows, offs_cols, n_cols, value, BLOCK_ROWS: tl.constexpr):
    pointers, mask = _tile_pointers(ptr, row0, n_rows, offs_cols, n_cols, BLOCK_ROWS)
    tl.store(pointers, value, mask=mask)


@triton.jit
def _dots(a_ptr, b_ptr, a0, b0, n_a, n_b, D, INPUT_PRECISION: tl.constexpr, BLOCK_A: tl.constexpr,
          BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """<a row, b row> fp32 [BLOCK_A, BLOCK_B] of rows a0.. and b0.. of two row-major [n, D] matrices, summed over
    BLOCK_D chunks of D."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        acc = tl.dot(_tile(a_ptr, a0, n_a, offs_d, D, BLOCK_A), tl.trans(_tile(b_ptr, b0, n_b, offs_d, D, BLOCK_B)),
                     acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _rows_kernel(
    x_ptr, keys_ptr, key_scale_ptr, values_ptr, value_scale_ptr, bias_ptr, stats_ptr, out_ptr, R, K, D, E,
    k_tiles_per_split, scale_log2,
    SPLIT: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, ONE_CHUNK: tl.constexpr,
):
    # scale_log2 = scale * log2(e): z in log2 units. Not SPLIT: stats = lse [R] (natural log), out = [R, E].
    # SPLIT: stats = (m, l) [S, 2, R] (log2 units), out = the unnormalised acc [S, R, E] of this program's split.
    pid = tl.program_id(0)
    n_r = tl.cdiv(R, BLOCK_R)
    n_e = tl.cdiv(E, BLOCK_E)
    row0 = (pid % n_r) * BLOCK_R  # row tiles vary fastest: neighbours share keys
    offs_r = row0 + tl.arange(0, BLOCK_R)
    e0 = ((pid // n_r) % n_e) * BLOCK_E
    split = pid // (n_r * n_e)
    offs_e = e0 + tl.arange(0, BLOCK_E)
    in_r = offs_r < R
    if ONE_CHUNK:
        x = _tile(x_ptr, row0, R, tl.arange(0, BLOCK_D), D, BLOCK_R)  # held for the whole loop
    m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_E), dtype=tl.float32)
    k_begin = split * k_tiles_per_split * BLOCK_K
    k_end = tl.minimum(K, k_begin + k_tiles_per_split * BLOCK_K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < K
        if ONE_CHUNK:
            z = tl.dot(x, tl.trans(_tile(keys_ptr, k0, K, tl.arange(0, BLOCK_D), D, BLOCK_K)),
                       input_precision=INPUT_PRECISION)
        else:
            z = _dots(x_ptr, keys_ptr, row0, k0, R, K, D, INPUT_PRECISION, BLOCK_R, BLOCK_K, BLOCK_D)
        column_scale = tl.load(key_scale_ptr + offs_k, mask=in_k, other=0.0) * scale_log2
        bias = tl.load(bias_ptr + offs_k, mask=in_k, other=0.0)
        s = tl.where(in_k[None, :], z * column_scale[None, :] + bias[None, :] * _LOG2E_C, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row whose z are all -inf so far: no NaN
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        values = _tile(values_ptr, k0, K, offs_e, E, BLOCK_K)
        # value_scale (1 / ||v_k||) per column of p: the dot then sums p_k * W_k without a [K, e] W
        value_scale = tl.load(value_scale_ptr + offs_k, mask=in_k, other=0.0) * _P_SCALE_C
        acc = tl.dot((p * value_scale[None, :]).to(values.dtype), values, acc * alpha[:, None],
                     input_precision=INPUT_PRECISION)
        m = m_new
    acc = acc * _INV_P_SCALE_C
    first_chunk = in_r & (e0 == 0)  # every e chunk holds the same (m, l): one stores them
    if SPLIT:
        stats = stats_ptr + 2 * split.to(tl.int64) * R + offs_r
        tl.store(stats, m, mask=first_chunk)
        tl.store(stats + R, l, mask=first_chunk)
        _store_tile(out_ptr + split.to(tl.int64) * R * E, row0, R, offs_e, E, acc, BLOCK_R)
    else:
        tl.store(stats_ptr + offs_r, (m + tl.log2(l)) * _LN2_C, mask=first_chunk)
        _store_tile(out_ptr, row0, R, offs_e, E, acc / l[:, None], BLOCK_R)


@triton.jit
def _combine_kernel(stats_ptr, partial_ptr, lse_ptr, out_ptr, R, E, S, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    # stats (m, l) [S, 2, R] and partial [S, R, E] of _rows_kernel (SPLIT) -> lse [R], out [R, E], in split order.
    pid = tl.program_id(0)
    n_r = tl.cdiv(R, BLOCK_R)
    row0 = (pid % n_r) * BLOCK_R
    offs_r = row0 + tl.arange(0, BLOCK_R)
    offs_e = (pid // n_r) * BLOCK_E + tl.arange(0, BLOCK_E)
    in_r = offs_r < R
    m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_E), dtype=tl.float32)
    rows = tl.cast(R, tl.int64)
    for s in range(0, S):
        stats = stats_ptr + 2 * s * rows + offs_r
        m_s = tl.load(stats, mask=in_r, other=0.0)
        l_s = tl.load(stats + R, mask=in_r, other=1.0)  # rows past R: finite, never stored
        part = _tile(partial_ptr + s * rows * E, row0, R, offs_e, E, BLOCK_R)
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        beta = tl.exp2(m_s - m_safe)
        l = l * alpha + l_s * beta
        acc = acc * alpha[:, None] + part * beta[:, None]
        m = m_new
    tl.store(lse_ptr + offs_r, (m + tl.log2(l)) * _LN2_C, mask=in_r & (pid < n_r))
    _store_tile(out_ptr, row0, R, offs_e, E, acc / l[:, None], BLOCK_R)


@triton.jit
def _columns_kernel(
    x_ptr, keys_ptr, key_scale_ptr, bias_ptr, lse_ptr, y_ptr, out_ptr, R, K, D, E, scale_log2,
    INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr, ONE_CHUNK: tl.constexpr,
):
    # out [K, E] fp32 += sum_r exp(z_rk - lse_r) y_r; tiles are [keys, rows]. y (fp32) enters the dot in the input
    # dtype. This program alone owns its tile of out: it loads it once after the loop, adds and stores it.
    pid = tl.program_id(0)
    n_e = tl.cdiv(E, BLOCK_E)
    k0 = (pid // n_e) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_e = (pid % n_e) * BLOCK_E + tl.arange(0, BLOCK_E)
    in_k = offs_k < K
    if ONE_CHUNK:
        keys = _tile(keys_ptr, k0, K, tl.arange(0, BLOCK_D), D, BLOCK_K)  # held for the whole loop
    row_scale = tl.load(key_scale_ptr + offs_k, mask=in_k, other=0.0) * scale_log2  # key_scale per row of [K, R]
    bias = tl.load(bias_ptr + offs_k, mask=in_k, other=0.0) * _LOG2E_C
    acc = tl.zeros((BLOCK_K, BLOCK_E), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        in_r = offs_r < R
        if ONE_CHUNK:
            z = tl.dot(keys, tl.trans(_tile(x_ptr, r0, R, tl.arange(0, BLOCK_D), D, BLOCK_R)),
                       input_precision=INPUT_PRECISION)
        else:
            z = _dots(keys_ptr, x_ptr, k0, r0, K, R, D, INPUT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_D)
        lse2 = tl.load(lse_ptr + offs_r, mask=in_r, other=0.0) * _LOG2E_C
        p = tl.where(in_r[None, :], tl.exp2(z * row_scale[:, None] + bias[:, None] - lse2[None, :]), 0.0)
        y = _tile(y_ptr, r0, R, offs_e, E, BLOCK_R).to(x_ptr.dtype.element_ty)
        acc = tl.dot((p * _P_SCALE_C).to(y.dtype), y, acc, input_precision=INPUT_PRECISION)
    pointers, mask = _tile_pointers(out_ptr, k0, K, offs_e, E, BLOCK_K)
    tl.store(pointers, tl.load(pointers, mask=mask, other=0.0) + acc * _INV_P_SCALE_C, mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------
def _check(x: torch.Tensor, same: dict, fp32: dict) -> None:
    if x.dtype not in TRITON_DTYPE:
        raise TypeError(f"dino_loss (triton) takes float32/float16/bfloat16, got {x.dtype}")
    for name, t in same.items():
        if t.dtype != x.dtype:
            raise TypeError(f"dino_loss (triton): {name} must be {x.dtype} like x, got {t.dtype}")
    for name, t in fp32.items():
        if t.dtype != torch.float32:
            raise TypeError(f"dino_loss (triton): {name} must be float32, got {t.dtype}")


def softmax_rows(x, keys, key_scale, values, value_scale, bias, scale: float):
    """(lse [R] fp32, out [R, e] fp32) for x [R, d], keys [K, d], values [K, e] (one dtype), key_scale, value_scale,
    bias [K] fp32."""
    _check(x, dict(keys=keys, values=values), dict(key_scale=key_scale, value_scale=value_scale, bias=bias))
    x, keys, values = x.contiguous(), keys.contiguous(), values.contiguous()
    key_scale, value_scale, bias = key_scale.contiguous(), value_scale.contiguous(), bias.contiguous()
    (R, D), K, E = x.shape, keys.shape[0], values.shape[1]
    cfg = ROWS_CONFIG[width_class(D, E)][x.dtype]
    lse = torch.empty(R, device=x.device, dtype=torch.float32)  # both fully written
    out = torch.empty((R, E), device=x.device, dtype=torch.float32)
    if R == 0 or E == 0 or K == 0:
        return lse.fill_(float("-inf") if K == 0 else 0.0), out.zero_()
    splits, per_split = split_plan(R, K, E, cfg)
    programs = triton.cdiv(R, cfg["BLOCK_R"]) * triton.cdiv(E, cfg["BLOCK_E"]) * splits
    inputs = (x, keys, key_scale, values, value_scale, bias)
    sizes = (R, K, D, E, per_split, float(scale) * _LOG2E)
    with launch_device(x):
        if splits == 1:
            _rows_kernel[(programs,)](*inputs, lse, out, *sizes, SPLIT=False,
                                      INPUT_PRECISION=input_precision(x.dtype), **cfg)
            return lse, out
        stats = torch.empty((splits, 2, R), device=x.device, dtype=torch.float32)  # fully written
        partial = torch.empty((splits, R, E), device=x.device, dtype=torch.float32)
        _rows_kernel[(programs,)](*inputs, stats, partial, *sizes, SPLIT=True,
                                  INPUT_PRECISION=input_precision(x.dtype), **cfg)
        combine = dict(COMBINE_CONFIG)
        _combine_kernel[(triton.cdiv(R, combine["BLOCK_R"]) * triton.cdiv(E, combine["BLOCK_E"]),)](
            stats, partial, lse, out, R, E, splits, **combine)
    return lse, out


def softmax_columns(x, keys, key_scale, bias, scale: float, lse, y, out) -> None:
    """out [K, e] fp32 (contiguous) += the transpose product, in place, for x [R, d], keys [K, d] (one dtype),
    key_scale, bias [K] fp32, lse [R] fp32 (from softmax_rows), y [R, e] fp32. In fp16 / bf16, y is rounded to the
    input dtype for the tensor-core dot (fp16: |y| < 65504)."""
    _check(x, dict(keys=keys), dict(key_scale=key_scale, bias=bias, lse=lse, y=y, out=out))
    (R, D), K, E = x.shape, keys.shape[0], y.shape[1]
    if out.shape != (K, E) or not out.is_contiguous():
        raise ValueError(f"dino_loss (triton): out must be a contiguous [{K}, {E}] tensor (added to in place), got "
                         f"{'' if out.is_contiguous() else 'non-contiguous '}{list(out.shape)}")
    x, keys, key_scale, bias = x.contiguous(), keys.contiguous(), key_scale.contiguous(), bias.contiguous()
    lse, y = lse.contiguous(), y.contiguous()
    if R == 0 or K == 0 or E == 0:
        return  # nothing to add
    cfg = COLUMNS_CONFIG[width_class(D, E)][x.dtype]
    with launch_device(x):
        _columns_kernel[(triton.cdiv(K, cfg["BLOCK_K"]) * triton.cdiv(E, cfg["BLOCK_E"]),)](
            x, keys, key_scale, bias, lse, y, out, R, K, D, E, float(scale) * _LOG2E,
            INPUT_PRECISION=input_precision(x.dtype), **cfg)


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (walked by vitfast.compile_check): every kernel x dtype x precision x width class
# (x SPLIT for the rows kernel); fp32 shares one entry between the classes: built once, labelled "fp32 ... all".
# R, K, D, E are runtime sizes; pointers from the caching allocator are 16-byte aligned.
# ---------------------------------------------------------------------------------------------------
_INTS = ("R", "K", "D", "E", "S", "k_tiles_per_split")
_FLOATS = ("scale_log2",)
_ALIGNED = ("D", "E")  # row widths: the JIT specialises multiples of 16 (DINO's d = e = 256), as built here


def _aot_specs() -> list:
    specs = []
    for name in CLASSES:
        for split in (False, True):
            specs += aot_specs(
                _rows_kernel, ROWS_CONFIG[name].get,
                lambda ty: dict(x_ptr=ty, keys_ptr=ty, key_scale_ptr="fp32", values_ptr=ty, value_scale_ptr="fp32",
                                bias_ptr="fp32", stats_ptr="fp32", out_ptr="fp32"),
                dict(SPLIT=split), ints=_INTS, floats=_FLOATS, aligned=_ALIGNED,
                variant=f"{'split' if split else 'whole'} {name}")
        specs += aot_specs(
            _columns_kernel, COLUMNS_CONFIG[name].get,
            lambda ty: dict(x_ptr=ty, keys_ptr=ty, key_scale_ptr="fp32", bias_ptr="fp32", lse_ptr="fp32",
                            y_ptr="fp32", out_ptr="fp32"),
            {}, ints=_INTS, floats=_FLOATS, aligned=_ALIGNED, variant=name)
    unique = {}
    for spec in specs:  # fp32 entries are the same in every class: keep one, labelled "all"
        if spec.variant.startswith("fp32"):
            spec = dataclasses.replace(spec, variant=spec.variant.rsplit(" ", 1)[0] + " all")
        unique.setdefault((spec.name, spec.variant), spec)
    blocks = {k: v for k, v in COMBINE_CONFIG.items() if k.startswith("BLOCK_")}
    pointers = dict(stats_ptr="fp32", partial_ptr="fp32", lse_ptr="fp32", out_ptr="fp32")
    combine = AotSpec(_combine_kernel, signature(_combine_kernel, pointers, _INTS), blocks,
                      COMBINE_CONFIG["num_warps"], COMBINE_CONFIG["num_stages"], variant="fp32",
                      aligned=tuple(pointers) + ("E",), tensor_cores=False)  # no dots: plain loads, exp2 and FMAs
    return list(unique.values()) + [combine]


AOT_SPECS = _aot_specs()
