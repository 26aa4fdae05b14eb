"""Triton kernels for ``relation_loss``: RelViT's pair cross-entropy over C bilinear class scores, flash-style.

Math (q, k [B, N, C, d_h]; target t[b, i, j] from grid positions or given; y = (1 - eps) onehot(t) + eps / C):

    s[b, c, i, j] = <q[b, i, c], k[b, j, c]> / sqrt(d_h)
    loss          = sum over selected pairs of (lse_c s - sum_c y_c s_c) / (number of selected pairs)
    d s_c         = w * (softmax_c(s) - y_c),   w = grad / count on selected pairs, 0 elsewhere
    d q[b, i, c]  = sum_j d s_c[i, j] k[b, j, c] / sqrt(d_h),    d k[b, j, c] = sum_i d s_c[i, j] q[b, i, c] / sqrt(d_h)

Kernels (no [B, C, N, N] logits and no per-pair statistics ever reach memory):

    _relation_fwd_kernel     program per (i-tile, b); loop over j-tiles; per class a tl.dot [BLOCK_I, d] x [d, BLOCK_J]
                             with an online log-sum-exp over classes (C is small: no class tile is kept); writes per-row
                             sums (loss, correct, selected) only
    _relation_bwd_dq_kernel  program per (i-tile, b); loop over j-tiles: pass 1 recomputes the log-sum-exp over classes,
                             pass 2 recomputes each class's scores, forms d s_c and adds d s_c @ k_c into this program's
                             own dq rows (read-modify-write by one program: no atomics, deterministic)
    _relation_bwd_dk_kernel  the same per (j-tile, b) with a loop over i-tiles, adding d s_c^T @ q_c into dk

Layout: the launchers repack q and k once per call into a class-major, zero-padded [B, C, N, DP] copy
(DP = d_h rounded up to BLOCK_D = 64: d_h = 42 (ViT-S) -> 64, 85 (ViT-B) -> 128, covered by DP / 64 chunks). In place,
a d_h = 42 row is not 16-byte aligned and every element would need its own 64-bit address (the kernels spilled);
packed, every class slab [N, DP] is contiguous with aligned rows and tile loads need no mask on d. The copy is
O(B*N*C*d_h), against O(B*C*N^2*d_h) work. Gradients come out packed in fp32 and are unpacked into q's layout and dtype.
Everything runs in the base-2 domain (exp2/log2, the 1/sqrt(d_h) scale pre-multiplied by log2(e)). Accumulation is fp32;
fp16/bf16 dots run on tensor cores, with the d s tile cast to the input dtype *before* the 1/count weight is applied
(applied to the fp32 dot result instead), so that small weights never underflow in fp16. fp32 dots are IEEE when
``torch.get_float32_matmul_precision() == "highest"``, TF32 otherwise. float64 is not taken (the op's backend
declaration sends it elsewhere).
"""
import math

import torch
import triton
import triton.language as tl

from . import AotSpec

_LOG2E = 1.4426950408889634

# ---------------------------------------------------------------------------------------------------
# Launch parameters: one table per kernel, keyed by dtype. The launchers and AOT_SPECS both read them.
# Chosen so that every variant compiles with 0 spills on sm_80 and sm_90 (python -m vitfast.compile_check).
# 32 x 32 pair tiles: the forward keeps 6 live pair tiles (max, sum, smoothed-target score, argmax, target, scores)
# in registers; 32 x 64 tiles spilled in fp32, and num_stages > 1 made ptxas spill the backward kernels.
# Programs: B * ceil(N / 32) (N = 64, B = 64: 128, one wave on an H100).
BLOCK_D = 64
_FWD = dict(BLOCK_I=32, BLOCK_J=32, BLOCK_D=BLOCK_D, num_warps=4, num_stages=2)
_FWD32 = dict(_FWD, num_warps=8)  # fp32 (FMA or TF32 dots) needs more registers per pair tile
FORWARD_CONFIG = {torch.float32: _FWD32, torch.float16: _FWD, torch.bfloat16: _FWD}
_BWD = dict(BLOCK_I=32, BLOCK_J=32, BLOCK_D=BLOCK_D, num_warps=4, num_stages=1)
_BWD32 = dict(_BWD, num_warps=8)
BWD_DQ_CONFIG = {torch.float32: _BWD32, torch.float16: _BWD, torch.bfloat16: _BWD}
BWD_DK_CONFIG = {torch.float32: _BWD, torch.float16: _BWD, torch.bfloat16: _BWD}  # 8 warps spilled (tf32, sm_90a)
del _FWD, _FWD32, _BWD, _BWD32


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _pair_tile(pos_ptr, tgt_ptr, mask_ptr, b, offs_i, offs_j, N, S, mask_batch_stride,
               HAS_TARGETS: tl.constexpr, HAS_MASK: tl.constexpr):
    """target [BI, BJ] int32 of a pair tile (direction targets from positions, or the given ones), -1 on pairs that
    are not selected (outside N or masked out): one int tile instead of a target tile and a mask tile."""
    in_i = offs_i < N
    in_j = offs_j < N
    valid = in_i[:, None] & in_j[None, :]
    pair = offs_i[:, None] * N + offs_j[None, :]
    if HAS_MASK:
        selected = tl.load(mask_ptr + b.to(tl.int64) * mask_batch_stride + pair, mask=valid, other=0)
        valid = valid & (selected != 0)
    if HAS_TARGETS:
        target = tl.load(tgt_ptr + b.to(tl.int64) * N * N + pair, mask=valid, other=0).to(tl.int32)
    else:
        cell_i = tl.load(pos_ptr + b * N + offs_i, mask=in_i, other=0).to(tl.int32)
        cell_j = tl.load(pos_ptr + b * N + offs_j, mask=in_j, other=0).to(tl.int32)
        row_i = cell_i // S
        row_j = cell_j // S
        col_i = cell_i - row_i * S
        col_j = cell_j - row_j * S
        d_row = (row_i[:, None] > row_j[None, :]).to(tl.int32) - (row_i[:, None] < row_j[None, :]).to(tl.int32)
        d_col = (col_i[:, None] > col_j[None, :]).to(tl.int32) - (col_i[:, None] < col_j[None, :]).to(tl.int32)
        target = 3 * (d_row + 1) + (d_col + 1)
    return tl.where(valid, target, -1)


@triton.jit
def _class_scores(q_base, k_base, offs_i, offs_j, N, DP, scale_log2,
                  INPUT_PRECISION: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """log2(e) * s_c for a [BLOCK_I, BLOCK_J] tile of one class: sum over BLOCK_D chunks of q_c k_c^T.

    q_base / k_base point at the class's [N, DP] slab of the packed layout (zero-padded d: no mask on d)."""
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for d0 in range(0, DP, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        q_c = tl.load(q_base + offs_i[:, None] * DP + offs_d[None, :], mask=(offs_i < N)[:, None], other=0.0)
        k_c = tl.load(k_base + offs_j[:, None] * DP + offs_d[None, :], mask=(offs_j < N)[:, None], other=0.0)
        acc = tl.dot(q_c, tl.trans(k_c), acc, input_precision=INPUT_PRECISION)
    return acc * scale_log2


@triton.jit
def _log2_sum_exp2(q_ptr, k_ptr, b, offs_i, offs_j, N, C, DP, scale_log2,
                   INPUT_PRECISION: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """log2 sum_c exp2(s2_c) per pair, online over classes."""
    m = tl.full((BLOCK_I, BLOCK_J), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for c in range(0, C):
        slab = (b * C + c).to(tl.int64) * N * DP
        s = _class_scores(q_ptr + slab, k_ptr + slab, offs_i, offs_j, N, DP, scale_log2,
                          INPUT_PRECISION, BLOCK_I, BLOCK_J, BLOCK_D)
        m_new = tl.maximum(m, s)
        l = l * tl.exp2(m - m_new) + tl.exp2(s - m_new)
        m = m_new
    return m + tl.log2(l)


@triton.jit
def _relation_fwd_kernel(
    q_ptr, k_ptr, pos_ptr, tgt_ptr, mask_ptr, row_loss_ptr, row_hits_ptr,
    N, C, DP, S, mask_batch_stride, scale_log2, keep, spread,
    HAS_TARGETS: tl.constexpr, HAS_MASK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # q_ptr, k_ptr: packed [B, C, N, DP]; row_loss_ptr: fp32 [B, N] sums of pair losses per query row;
    # row_hits_ptr: int32 [2, B, N] (correct, selected) per query row.
    pid_i = tl.program_id(0)
    b = tl.program_id(1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
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
            m_new = tl.maximum(m, s)
            l = l * tl.exp2(m - m_new) + tl.exp2(s - m_new)
            m = m_new
            s_smoothed += tl.where(target == c, keep + spread, spread) * s
        # Smoothed cross-entropy in nats: (lse - sum_c y_c s_c) * ln 2 (the scores are in log2 units).
        pair_loss = (m + tl.log2(l) - s_smoothed) * 0.6931471805599453
        loss += tl.sum(tl.where(target >= 0, pair_loss, 0.0), axis=1)
        correct += tl.sum((argmax == target).to(tl.int32), axis=1)
        selected += tl.sum((target >= 0).to(tl.int32), axis=1)
    in_i = offs_i < N
    rows = b * N + offs_i
    tl.store(row_loss_ptr + rows, loss, mask=in_i)
    tl.store(row_hits_ptr + rows, correct, mask=in_i)
    tl.store(row_hits_ptr + tl.num_programs(1) * N + rows, selected, mask=in_i)


@triton.jit
def _relation_bwd_dq_kernel(
    q_ptr, k_ptr, pos_ptr, tgt_ptr, mask_ptr, weight_ptr, dq_ptr,
    N, C, DP, S, mask_batch_stride, scale_log2, keep, spread,
    HAS_TARGETS: tl.constexpr, HAS_MASK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # weight_ptr: fp32 [1] = grad / count / sqrt(d_h); dq_ptr: fp32 packed [B, C, N, DP], this program's rows only.
    pid_i = tl.program_id(0)
    b = tl.program_id(1)
    weight = tl.load(weight_ptr)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    in_i = offs_i < N
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        in_j = offs_j < N
        target = _pair_tile(pos_ptr, tgt_ptr, mask_ptr, b, offs_i, offs_j, N, S, mask_batch_stride,
                                   HAS_TARGETS, HAS_MASK)
        lse = _log2_sum_exp2(q_ptr, k_ptr, b, offs_i, offs_j, N, C, DP, scale_log2,
                             INPUT_PRECISION, BLOCK_I, BLOCK_J, BLOCK_D)
        for c in range(0, C):
            slab = (b * C + c).to(tl.int64) * N * DP
            s = _class_scores(q_ptr + slab, k_ptr + slab, offs_i, offs_j, N, DP, scale_log2,
                              INPUT_PRECISION, BLOCK_I, BLOCK_J, BLOCK_D)
            y = tl.where(target == c, keep, 0.0) + spread
            ds = tl.where(target >= 0, tl.exp2(s - lse) - y, 0.0)  # in [-1, 1]: safe to cast to fp16/bf16
            for d0 in range(0, DP, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                k_c = tl.load(k_ptr + slab + offs_j[:, None] * DP + offs_d[None, :], mask=in_j[:, None], other=0.0)
                part = tl.dot(ds.to(k_c.dtype), k_c, input_precision=INPUT_PRECISION) * weight
                out = dq_ptr + slab + offs_i[:, None] * DP + offs_d[None, :]
                if j0 > 0:  # read-modify-write of rows no other program touches
                    part += tl.load(out, mask=in_i[:, None], other=0.0)
                tl.store(out, part, mask=in_i[:, None])


@triton.jit
def _relation_bwd_dk_kernel(
    q_ptr, k_ptr, pos_ptr, tgt_ptr, mask_ptr, weight_ptr, dk_ptr,
    N, C, DP, S, mask_batch_stride, scale_log2, keep, spread,
    HAS_TARGETS: tl.constexpr, HAS_MASK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # dk_ptr: fp32 packed [B, C, N, DP], written only by this program's key rows j.
    pid_j = tl.program_id(0)
    b = tl.program_id(1)
    weight = tl.load(weight_ptr)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    in_j = offs_j < N
    for i0 in range(0, N, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        in_i = offs_i < N
        target = _pair_tile(pos_ptr, tgt_ptr, mask_ptr, b, offs_i, offs_j, N, S, mask_batch_stride,
                                   HAS_TARGETS, HAS_MASK)
        lse = _log2_sum_exp2(q_ptr, k_ptr, b, offs_i, offs_j, N, C, DP, scale_log2,
                             INPUT_PRECISION, BLOCK_I, BLOCK_J, BLOCK_D)
        for c in range(0, C):
            slab = (b * C + c).to(tl.int64) * N * DP
            s = _class_scores(q_ptr + slab, k_ptr + slab, offs_i, offs_j, N, DP, scale_log2,
                              INPUT_PRECISION, BLOCK_I, BLOCK_J, BLOCK_D)
            y = tl.where(target == c, keep, 0.0) + spread
            ds = tl.where(target >= 0, tl.exp2(s - lse) - y, 0.0)
            for d0 in range(0, DP, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                q_c = tl.load(q_ptr + slab + offs_i[:, None] * DP + offs_d[None, :], mask=in_i[:, None], other=0.0)
                part = tl.dot(tl.trans(ds.to(q_c.dtype)), q_c, input_precision=INPUT_PRECISION) * weight
                out = dk_ptr + slab + offs_j[:, None] * DP + offs_d[None, :]
                if i0 > 0:
                    part += tl.load(out, mask=in_j[:, None], other=0.0)
                tl.store(out, part, mask=in_j[:, None])


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------
def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # fp32 at "high"/"medium"; ignored for fp16/bf16, which always use tensor cores


def _padded_dim(d_h: int) -> int:
    return triton.cdiv(d_h, BLOCK_D) * BLOCK_D


def _pack(x: torch.Tensor) -> torch.Tensor:
    """[B, N, C, d_h] -> class-major, zero-padded [B, C, N, DP]: every class's [N, DP] slab is contiguous with
    16-byte aligned rows, so tile loads vectorise and need no mask on d (d_h = 42 rows are not aligned in place)."""
    B, N, C, D = x.shape
    packed = x.new_zeros((B, C, N, _padded_dim(D)))
    packed[..., :D] = x.permute(0, 2, 1, 3)
    return packed


def _unpack(packed: torch.Tensor, d_h: int, dtype: torch.dtype) -> torch.Tensor:
    return packed[..., :d_h].permute(0, 2, 1, 3).to(dtype=dtype, memory_format=torch.contiguous_format)


def _common(q, positions, targets, pair_mask, grid_size: int, label_smoothing: float) -> dict:
    """Kernel arguments shared by the three kernels (everything but the data pointers of q, k and the outputs)."""
    B, N, C, D = q.shape
    if targets is None and positions is None:
        positions = torch.arange(N, device=q.device).expand(B, N).contiguous()
    dummy = q  # never read: the matching HAS_* flag is off
    return dict(
        pos_ptr=positions if positions is not None else dummy,
        tgt_ptr=targets if targets is not None else dummy,
        mask_ptr=pair_mask.view(torch.uint8) if pair_mask is not None else dummy,
        N=N, C=C, DP=_padded_dim(D), S=max(int(grid_size), 1),
        mask_batch_stride=N * N if pair_mask is not None and pair_mask.dim() == 3 else 0,
        scale_log2=_LOG2E / math.sqrt(D), keep=1.0 - label_smoothing, spread=label_smoothing / C,
        HAS_TARGETS=targets is not None, HAS_MASK=pair_mask is not None,
        INPUT_PRECISION=_input_precision(q.dtype),
    )


def relation_loss_forward(q, k, positions, targets, pair_mask, grid_size: int, label_smoothing: float):
    """(loss [] fp32, accuracy [] fp32, count [] int64) for q, k [B, N, C, d_h]; inputs validated and contiguous."""
    B, N = q.shape[:2]
    row_loss = torch.empty((B, N), device=q.device, dtype=torch.float32)
    row_hits = torch.empty((2, B, N), device=q.device, dtype=torch.int32)
    cfg = FORWARD_CONFIG[q.dtype]
    grid = (triton.cdiv(N, cfg["BLOCK_I"]), B)
    _relation_fwd_kernel[grid](q_ptr=_pack(q), k_ptr=_pack(k), row_loss_ptr=row_loss, row_hits_ptr=row_hits,
                               **_common(q, positions, targets, pair_mask, grid_size, label_smoothing), **cfg)
    # Fixed-order reductions of the per-row statistics (deterministic): fp64 for the loss, int64 for the counts.
    count = row_hits[1].sum(dtype=torch.int64)
    denominator = count.clamp_min(1)
    loss = (row_loss.sum(dtype=torch.float64) / denominator).float()
    accuracy = (row_hits[0].sum(dtype=torch.int64) / denominator).float()
    return loss, accuracy, count


def relation_loss_backward(grad_loss, count, q, k, positions, targets, pair_mask, grid_size: int,
                           label_smoothing: float, output_mask) -> tuple:
    """(d_q, d_k) in q's dtype, None where output_mask is False."""
    want_q, want_k = (bool(x) for x in output_mask)
    B, N, C, D = q.shape
    # grad / count / sqrt(d_h) as a device scalar: no host sync.
    weight = (grad_loss.float() / count.clamp_min(1)).reshape(1) / math.sqrt(D)
    common = _common(q, positions, targets, pair_mask, grid_size, label_smoothing)
    packed = dict(q_ptr=_pack(q), k_ptr=_pack(k), weight_ptr=weight)
    grads = []
    for want, kernel, table, own_block, out_name in (
            (want_q, _relation_bwd_dq_kernel, BWD_DQ_CONFIG, "BLOCK_I", "dq_ptr"),
            (want_k, _relation_bwd_dk_kernel, BWD_DK_CONFIG, "BLOCK_J", "dk_ptr")):
        if not want:
            grads.append(None)
            continue
        out = torch.empty((B, C, N, common["DP"]), device=q.device, dtype=torch.float32)  # fully written
        cfg = table[q.dtype]
        grid = (triton.cdiv(N, cfg[own_block]), B)
        kernel[grid](**packed, **{out_name: out}, **common, **cfg)
        grads.append(_unpack(out, D, q.dtype))
    return tuple(grads)


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (walked by vitfast.compile_check)
# ---------------------------------------------------------------------------------------------------
_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_INTS = ("N", "C", "DP", "S", "mask_batch_stride")
_FLOATS = ("scale_log2", "keep", "spread")


def _signature(kernel, pointers: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in pointers:
            sig[name] = "*" + pointers[name]
        elif name in _INTS:
            sig[name] = "i32"
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
    return sig


def _launch(cfg: dict) -> tuple:
    blocks = {key: value for key, value in cfg.items() if key.startswith("BLOCK_")}
    return blocks, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _aot_specs() -> list:
    specs = []
    # Direction targets from positions with a pair mask (the training path); d_h is a runtime size, so one variant
    # per dtype covers d_h = 42 and 85 alike. fp32 runs IEEE (precision "highest") or TF32 ("high").
    variants = [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float16, "tf32"), (torch.bfloat16, "tf32")]
    kernels = ((_relation_fwd_kernel, FORWARD_CONFIG, dict(row_loss_ptr="fp32", row_hits_ptr="i32")),
               (_relation_bwd_dq_kernel, BWD_DQ_CONFIG, dict(weight_ptr="fp32", dq_ptr="fp32")),
               (_relation_bwd_dk_kernel, BWD_DK_CONFIG, dict(weight_ptr="fp32", dk_ptr="fp32")))
    for dtype, precision in variants:
        ty = _TRITON_DTYPE[dtype]
        half = precision == "tf32"  # tensor cores: fp16/bf16 always, fp32 only as TF32
        label = f"{ty}{'-tf32' if dtype == torch.float32 and half else ''}"
        for fn, table, outputs in kernels:
            blocks, launch = _launch(table[dtype])
            pointers = dict(q_ptr=ty, k_ptr=ty, pos_ptr="i64", tgt_ptr="i64", mask_ptr="u8", **outputs)
            specs.append(AotSpec(
                fn, _signature(fn, pointers),
                dict(HAS_TARGETS=False, HAS_MASK=True, INPUT_PRECISION=precision, **blocks),
                variant=label, tensor_cores=half, **launch,
                aligned=tuple(pointers) + ("DP",)))
    return specs


AOT_SPECS = _aot_specs()
