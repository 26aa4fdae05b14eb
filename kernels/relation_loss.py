"""Triton kernels for ``relation_loss``: RelViT's pair cross-entropy over C bilinear class scores, flash-style.

Math (q, k [B, N, C, d_h]; target t[b, i, j] from grid positions or given; y = (1 - eps) onehot(t) + eps / C):

    s[b, c, i, j] = <q[b, i, c], k[b, j, c]> / sqrt(d_h)
    loss          = sum over selected pairs of (lse_c s - sum_c y_c s_c) / (number of selected pairs)
    d s_c         = w * (softmax_c(s) - y_c),   w = grad / count on selected pairs, 0 elsewhere
    d q[b, i, c]  = sum_j d s_c[i, j] k[b, j, c] / sqrt(d_h),    d k[b, j, c] = sum_i d s_c[i, j] q[b, i, c] / sqrt(d_h)

Kernels (no [B, C, N, N] logits ever reach memory; 1-D grids, the batch folded into axis 0):

    _relation_fwd_kernel  program per (b, i-tile); loop over j-tiles; per class a tl.dot [BLOCK_I, DP] x [DP, BLOCK_J]
                          with an online log-sum-exp over classes; writes per-row sums (loss, correct, selected) and,
                          for the backward, each pair's log-sum-exp (fp32) and target (int16, -1 when not selected)
    _relation_bwd_kernel  one kernel for both gradients: program per (b, own tile, d chunk), own = query rows i for d q
                          (KEYS=False) or key rows j for d k (KEYS=True). Per class, a loop over the other side's tiles
                          recomputes the class's scores (transposed for d k), reads the saved lse and target, forms
                          d s_c and accumulates d s_c @ other_c into a register tile; then writes that tile once, in
                          the input layout [B, N, C, d_h] and dtype. No read-back of its own stores, no atomics:
                          deterministic.

Layout: the forward packs q and k once into a class-major, zero-padded [B, C, N, DP] copy (DP = d_h rounded up to
BLOCK_D = 64 for d_h <= 64 (ViT-S: 42 -> 64), else to 128 (ViT-B: 85 -> 128; d_h > 128 runs 128-wide d chunks).
In place, a d_h = 42 row is not 16-byte aligned and every element would need its own 64-bit address (the kernels
spilled); packed, every class slab [N, DP] is contiguous with aligned rows and tile loads need no mask on d.
The forward's outputs for the backward (packed q, k: O(B*N*C*d_h); lse and target: 6 bytes per pair, 15 MB at
B = 64, N = 196), against O(B*C*N^2*d_h) work, spare it the repacking, the positions / mask / targets and the
log-sum-exp: per gradient and pair tile, C score dots and C gradient dots.
Everything runs in the base-2 domain (exp2/log2, the 1/sqrt(d_h) scale pre-multiplied by log2(e)). Accumulation is fp32;
fp16/bf16 dots run on tensor cores, with the d s tile cast to the input dtype *before* the 1/count weight is applied
(applied to the fp32 accumulator instead), so that small weights never underflow in fp16. fp32 dots are IEEE when
``torch.get_float32_matmul_precision() == "highest"``, TF32 otherwise. float64 is not taken (the op's backend
declaration sends it elsewhere).
"""
import math

import torch
import triton
import triton.language as tl

from ._common import (aot_specs, direction_class, finish_row_stats, grid_offsets, input_precision, launch_device,
                      online_lse, pair_selection, row_stats, store_row_stats)

_LOG2E = 1.4426950408889634

# ---------------------------------------------------------------------------------------------------
# Launch parameters: one table per kernel, [BLOCK_D][dtype] (BLOCK_D comes from d_h: block_d()). The launchers and
# AOT_SPECS both read them; every entry compiles with 0 spills on sm_80 and sm_90a (python -m vitfast.compile_check).
# 32 x 32 pair tiles: the forward keeps 6 live pair tiles (max, sum, smoothed-target score, argmax, target, scores)
# in registers; 32 x 64 tiles spilled in fp32. fp32 (FMA or TF32 dots) needs more registers per pair: 16 x 32 tiles
# on 8 warps (32 x 32 spilled up to 48 B once the forward stored lse and target). The d loop has one iteration up to
# d_h = 128: no pipelining (2 stages cost 12-46 registers, or spilled). The backward keeps a [BLOCK_OWN, BLOCK_D] fp32
# accumulator: 128-wide heads need 8 warps in 16 bits too (44 B spilled on sm_80); num_stages > 1 spilled.
# Programs: B * ceil(N / 32) (N = 64, B = 64: 128, one wave on an H100; twice that in the fp32 forward).
BLOCK_D_CANDIDATES = (64, 128)
_FWD16 = dict(BLOCK_I=32, BLOCK_J=32, num_warps=4, num_stages=1)
_FWD32 = dict(_FWD16, BLOCK_I=16, num_warps=8, num_stages=1)
FORWARD_CONFIG = {bd: {torch.float32: dict(_FWD32, BLOCK_D=bd), torch.float16: dict(_FWD16, BLOCK_D=bd),
                       torch.bfloat16: dict(_FWD16, BLOCK_D=bd)} for bd in BLOCK_D_CANDIDATES}
_BWD4 = dict(BLOCK_OWN=32, BLOCK_OTHER=32, num_warps=4, num_stages=1)
_BWD8 = dict(_BWD4, num_warps=8)
_BWD16 = {64: _BWD4, 128: _BWD8}
BACKWARD_CONFIG = {bd: {torch.float32: dict(_BWD8, BLOCK_D=bd), torch.float16: dict(_BWD16[bd], BLOCK_D=bd),
                        torch.bfloat16: dict(_BWD16[bd], BLOCK_D=bd)} for bd in BLOCK_D_CANDIDATES}
del _FWD16, _FWD32, _BWD4, _BWD8, _BWD16


def block_d(d_h: int) -> int:
    """Width of one d chunk: the whole (padded) head for d_h <= 128, so the backward needs one program per tile."""
    return BLOCK_D_CANDIDATES[0] if d_h <= BLOCK_D_CANDIDATES[0] else BLOCK_D_CANDIDATES[1]


def padded_dim(d_h: int) -> int:
    return triton.cdiv(d_h, block_d(d_h)) * block_d(d_h)


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _pair_offsets(offs_a, offs_b, N, TRANSPOSED: tl.constexpr):
    """Offsets into a [N, N] pair array of the tile [a, b]: pair (i, j) = (a, b), or (b, a) when TRANSPOSED."""
    if TRANSPOSED:
        return offs_b[None, :] * N + offs_a[:, None]
    else:
        return offs_a[:, None] * N + offs_b[None, :]


@triton.jit
def _pair_tile(pos_ptr, tgt_ptr, mask_ptr, b, offs_i, offs_j, N, S, mask_batch_stride,
               HAS_TARGETS: tl.constexpr, HAS_MASK: tl.constexpr):
    """target [BI, BJ] int32 of a pair tile (given, or direction classes from the grid cells), -1 on pairs that are
    not selected (outside N or masked out): one int tile instead of a target tile and a mask tile."""
    chosen = pair_selection(mask_ptr, b, offs_i, offs_j, N, mask_batch_stride, HAS_MASK)
    if HAS_TARGETS:
        pairs = b.to(tl.int64) * N * N + _pair_offsets(offs_i, offs_j, N, False)
        target = tl.load(tgt_ptr + pairs, mask=chosen, other=0).to(tl.int32)
    else:
        d_row, d_col = grid_offsets(pos_ptr, b, offs_i, offs_j, N, S)
        target = direction_class(d_row, d_col)
    return tl.where(chosen, target, -1)


@triton.jit
def _class_scores(a_base, b_base, offs_a, offs_b, N, DP, scale_log2,
                  INPUT_PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """log2(e) * s_c for a [BLOCK_A, BLOCK_B] tile of one class: sum over BLOCK_D chunks of a_c b_c^T.

    a_base / b_base point at the class's [N, DP] slabs of the packed layout (zero-padded d: no mask on d)."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, DP, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        a_c = tl.load(a_base + offs_a[:, None] * DP + offs_d[None, :], mask=(offs_a < N)[:, None], other=0.0)
        b_c = tl.load(b_base + offs_b[:, None] * DP + offs_d[None, :], mask=(offs_b < N)[:, None], other=0.0)
        acc = tl.dot(a_c, tl.trans(b_c), acc, input_precision=INPUT_PRECISION)
    return acc * scale_log2


@triton.jit
def _relation_fwd_kernel(
    q_ptr, k_ptr, pos_ptr, tgt_ptr, mask_ptr, lse_ptr, saved_tgt_ptr, row_loss_ptr, row_hits_ptr,
    N, C, DP, S, mask_batch_stride, scale_log2, keep, spread,
    HAS_TARGETS: tl.constexpr, HAS_MASK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # q_ptr, k_ptr: packed [B, C, N, DP]; for the backward: lse_ptr fp32 [B, N, N] (log2 units) and saved_tgt_ptr
    # int16 [B, N, N] (the target, -1 on pairs that are not selected); row stats: see store_row_stats.
    n_tiles = tl.cdiv(N, BLOCK_I)
    pid = tl.program_id(0)
    b = pid // n_tiles
    offs_i = (pid % n_tiles) * BLOCK_I + tl.arange(0, BLOCK_I)
    loss = tl.zeros((BLOCK_I,), dtype=tl.float32)
    correct = tl.zeros((BLOCK_I,), dtype=tl.int32)
    selected = tl.zeros((BLOCK_I,), dtype=tl.int32)
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        target = _pair_tile(pos_ptr, tgt_ptr, mask_ptr, b, offs_i, offs_j, N, S, mask_batch_stride,
                            HAS_TARGETS, HAS_MASK)
        m = tl.full((BLOCK_I, BLOCK_J), float("-inf"), dtype=tl.float32)
        l = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        s_smoothed = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)  # sum_c y_c s_c, y the smoothed one-hot
        argmax = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.int32)
        for c in range(0, C):
            slab = (b * C + c).to(tl.int64) * N * DP
            s = _class_scores(q_ptr + slab, k_ptr + slab, offs_i, offs_j, N, DP, scale_log2,
                              INPUT_PRECISION, BLOCK_I, BLOCK_J, BLOCK_D)
            argmax = tl.where(s > m, c, argmax)  # strict: the first maximum wins, as torch.argmax
            m, l = online_lse(m, l, s)
            s_smoothed += tl.where(target == c, keep + spread, spread) * s
        lse = m + tl.log2(l)
        pairs = b.to(tl.int64) * N * N + _pair_offsets(offs_i, offs_j, N, False)
        in_range = (offs_i < N)[:, None] & (offs_j < N)[None, :]
        tl.store(lse_ptr + pairs, lse, mask=in_range)
        tl.store(saved_tgt_ptr + pairs, target.to(tl.int16), mask=in_range)
        # Smoothed cross-entropy in nats: (lse - sum_c y_c s_c) * ln 2 (the scores are in log2 units).
        pair_loss = (lse - s_smoothed) * 0.6931471805599453
        loss += tl.sum(tl.where(target >= 0, pair_loss, 0.0), axis=1)
        correct += tl.sum((argmax == target).to(tl.int32), axis=1)
        selected += tl.sum((target >= 0).to(tl.int32), axis=1)
    store_row_stats(row_loss_ptr, row_hits_ptr, b, offs_i, N, loss, correct, selected)


@triton.jit
def _relation_bwd_kernel(
    own_ptr, other_ptr, lse_ptr, saved_tgt_ptr, weight_ptr, grad_ptr,
    N, C, D, DP, scale_log2, keep, spread,
    KEYS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_OWN: tl.constexpr, BLOCK_OTHER: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # own_ptr / other_ptr: packed [B, C, N, DP] of q / k (d q) or k / q (d k, KEYS); lse_ptr, saved_tgt_ptr: the
    # forward's per-pair lse and target (-1 off the selection); weight_ptr: fp32 [1] = grad / count / sqrt(d_h);
    # grad_ptr: [B, N, C, D] in the input dtype, this program's rows and d chunk only.
    n_chunks = DP // BLOCK_D
    n_tiles = tl.cdiv(N, BLOCK_OWN)
    pid = tl.program_id(0)
    chunk = pid % n_chunks
    b = pid // n_chunks // n_tiles
    offs_own = (pid // n_chunks % n_tiles) * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
    offs_d = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    weight = tl.load(weight_ptr)
    pair_base = b.to(tl.int64) * N * N
    for c in range(0, C):
        slab = (b * C + c).to(tl.int64) * N * DP
        acc = tl.zeros((BLOCK_OWN, BLOCK_D), dtype=tl.float32)
        for o0 in range(0, N, BLOCK_OTHER):
            offs_other = o0 + tl.arange(0, BLOCK_OTHER)
            in_other = offs_other < N
            # [own, other] tiles: s_c (d q) or its transpose (d k), with the matching lse and targets
            s = _class_scores(own_ptr + slab, other_ptr + slab, offs_own, offs_other, N, DP, scale_log2,
                              INPUT_PRECISION, BLOCK_OWN, BLOCK_OTHER, BLOCK_D)
            pairs = pair_base + _pair_offsets(offs_own, offs_other, N, KEYS)
            in_range = (offs_own < N)[:, None] & in_other[None, :]
            lse = tl.load(lse_ptr + pairs, mask=in_range, other=0.0)
            target = tl.load(saved_tgt_ptr + pairs, mask=in_range, other=-1)
            y = tl.where(target == c, keep, 0.0) + spread
            ds = tl.where(target >= 0, tl.exp2(s - lse) - y, 0.0)  # in [-1, 1]: safe to cast to fp16/bf16
            other_c = tl.load(other_ptr + slab + offs_other[:, None] * DP + offs_d[None, :], mask=in_other[:, None],
                              other=0.0)
            acc = tl.dot(ds.to(other_c.dtype), other_c, acc, input_precision=INPUT_PRECISION)
        rows = (b.to(tl.int64) * N + offs_own) * C + c
        out_mask = (offs_own < N)[:, None] & (offs_d < D)[None, :]
        tl.store(grad_ptr + rows[:, None] * D + offs_d[None, :], (acc * weight).to(grad_ptr.dtype.element_ty),
                 mask=out_mask)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------
def _pack(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """[B, N, C, d_h] -> class-major, zero-padded [B, C, N, DP]: every class's [N, DP] slab is contiguous with
    16-byte aligned rows, so tile loads vectorise and need no mask on d (d_h = 42 rows are not aligned in place)."""
    D = x.shape[-1]
    packed[..., :D].copy_(x.permute(0, 2, 1, 3))
    packed[..., D:].zero_()
    return packed


def _scalars(q, label_smoothing: float) -> dict:
    """Scalar arguments shared by both kernels."""
    B, N, C, D = q.shape
    return dict(N=N, C=C, DP=padded_dim(D), scale_log2=_LOG2E / math.sqrt(D), keep=1.0 - label_smoothing,
                spread=label_smoothing / C, INPUT_PRECISION=input_precision(q.dtype))


def saved_like(q: torch.Tensor) -> list:
    """Empty (lse, target, q_packed, k_packed) shaped as relation_loss_forward returns them (for fake tensors)."""
    B, N, C, D = q.shape
    packed = (B, C, N, padded_dim(D))
    return [q.new_empty((B, N, N), dtype=torch.float32), q.new_empty((B, N, N), dtype=torch.int16),
            q.new_empty(packed), q.new_empty(packed)]


def relation_loss_forward(q, k, positions, targets, pair_mask, grid_size: int, label_smoothing: float):
    """(loss [] fp32, accuracy [] fp32, count [] int64, *saved) for q, k [B, N, C, d_h] fp32/fp16/bf16 (validated,
    contiguous). saved = (lse [B, N, N] fp32, target [B, N, N] int16 (-1: not selected), q_packed, k_packed
    [B, C, N, DP]): what relation_loss_backward reads instead of the inputs."""
    B, N, C, D = q.shape
    cfg = FORWARD_CONFIG[block_d(D)][q.dtype]
    if targets is None and positions is None:
        positions = torch.arange(N, device=q.device).expand(B, N).contiguous()
    with launch_device(q):
        scalars = _scalars(q, label_smoothing)
        lse, saved_target, q_packed, k_packed = saved_like(q)  # all fully written
        q_packed, k_packed = _pack(q, q_packed), _pack(k, k_packed)
        row_loss, row_hits = row_stats(B, N, q.device)
        _relation_fwd_kernel[(B * triton.cdiv(N, cfg["BLOCK_I"]),)](
            q_ptr=q_packed, k_ptr=k_packed, lse_ptr=lse, saved_tgt_ptr=saved_target, row_loss_ptr=row_loss,
            row_hits_ptr=row_hits,
            pos_ptr=positions if positions is not None else targets,  # never read with HAS_TARGETS
            tgt_ptr=targets if targets is not None else positions,    # never read without HAS_TARGETS
            mask_ptr=pair_mask.view(torch.uint8) if pair_mask is not None else lse,  # never read without HAS_MASK
            S=max(int(grid_size), 1), mask_batch_stride=N * N if pair_mask is not None and pair_mask.dim() == 3 else 0,
            HAS_TARGETS=targets is not None, HAS_MASK=pair_mask is not None, **scalars, **cfg)
    return (*finish_row_stats(row_loss, row_hits), lse, saved_target, q_packed, k_packed)


def relation_loss_backward(grad_loss, count, q, k, positions, targets, pair_mask, grid_size: int,
                           label_smoothing: float, output_mask, lse, saved_target, q_packed, k_packed) -> tuple:
    """(d_q, d_k) in q's layout and dtype, None where output_mask is False. lse ... k_packed: the forward's saved
    outputs (positions, targets, pair_mask and grid_size are in them, and are not read)."""
    B, N, C, D = q.shape
    # grad / count / sqrt(d_h) as a device scalar: no host sync.
    weight = (grad_loss.float() / count.clamp_min(1)).reshape(1) / math.sqrt(D)
    cfg = BACKWARD_CONFIG[block_d(D)][q.dtype]
    grads = []
    with launch_device(q):
        scalars = _scalars(q, label_smoothing)
        programs = B * triton.cdiv(N, cfg["BLOCK_OWN"]) * (scalars["DP"] // cfg["BLOCK_D"])
        for keys, own, other in ((False, q_packed, k_packed), (True, k_packed, q_packed)):
            if not output_mask[keys]:
                grads.append(None)
                continue
            grad = torch.empty_like(q)  # fully written
            _relation_bwd_kernel[(programs,)](own_ptr=own, other_ptr=other, lse_ptr=lse, saved_tgt_ptr=saved_target,
                                              weight_ptr=weight, grad_ptr=grad, D=D, KEYS=keys, **scalars, **cfg)
            grads.append(grad)
    return tuple(grads)


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (walked by vitfast.compile_check): every kernel x dtype x BLOCK_D candidate, on the
# training path (direction targets from positions, with a pair mask). d_h and N are runtime sizes.
# ---------------------------------------------------------------------------------------------------
_INTS = ("N", "C", "D", "DP", "S", "mask_batch_stride")
_FLOATS = ("scale_log2", "keep", "spread")


def _aot_specs() -> list:
    specs = []
    for bd in BLOCK_D_CANDIDATES:
        specs += aot_specs(
            _relation_fwd_kernel, FORWARD_CONFIG[bd].get,
            lambda ty: dict(q_ptr=ty, k_ptr=ty, pos_ptr="i64", tgt_ptr="i64", mask_ptr="u8", lse_ptr="fp32",
                            saved_tgt_ptr="i16", row_loss_ptr="fp32", row_hits_ptr="i32"),
            dict(HAS_TARGETS=False, HAS_MASK=True), ints=_INTS, floats=_FLOATS, variant=f"d{bd}", aligned=("DP",))
        for keys in (False, True):
            specs += aot_specs(
                _relation_bwd_kernel, BACKWARD_CONFIG[bd].get,
                lambda ty: dict(own_ptr=ty, other_ptr=ty, lse_ptr="fp32", saved_tgt_ptr="i16", weight_ptr="fp32",
                                grad_ptr=ty),
                dict(KEYS=keys), ints=_INTS, floats=_FLOATS,
                variant=f"{'dk' if keys else 'dq'} d{bd}", aligned=("DP",))
    return specs


AOT_SPECS = _aot_specs()
