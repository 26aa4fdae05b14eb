"""Triton kernels for ``contrastive_loss``: NT-Xent, InfoNCE and SupCon without the [A, M] logits.

Kernel-level form (vitfast/ops/contrastive_loss.py is the contract): anchors [A, D], pool [M, D] (one dtype),
anchor_labels [A], pool_labels [M], anchor_self [A] int64 (the anchor's own pool row, -1 if none):

    s_aj  = inv_temperature * <anchors[a], pool[j]>;  allowed(a, j) = j != anchor_self[a]
    lse_a = log sum_{allowed j} exp(s_aj);  n_a = #positives (allowed, same label);  S_a = sum_{positive j} s_aj
    loss  = loss_scale * sum_{a: n_a > 0} (lse_a - S_a / n_a)
    d s   = grad * loss_scale * [n_a > 0] * (allowed * exp(s - lse_a) - positive / n_a)

Kernels (1-D grids, the long dimension on axis 0; offsets that scale with A, M or D in int64):

    _contrastive_fwd_kernel  program per anchor tile; loop over pool tiles: s tile by tl.dot (fp32 accumulation),
                             online log-sum-exp (base 2, online_lse_rows) over the allowed columns, running positive
                             sum and count. Writes lse [A] (natural log, 0 where n_a = 0), n [A] int32 and the
                             anchor's loss term [A] fp32, summed on the host in a fixed order (deterministic).
    _contrastive_bwd_kernel  one kernel for both gradients: program per (own tile, d chunk), own = anchor rows for
                             d anchors (POOL=False) or pool rows for d pool (POOL=True); a loop over the other side's
                             tiles recomputes s (transposed for d pool) from the saved lse and n, forms d s and
                             accumulates d s @ other in registers; one store in the input dtype. No atomics, no
                             read-back of its own stores: deterministic.

D: in fp16 / bf16 up to D = 256 the whole (zero-padded) row is one BLOCK_D chunk, loaded once per program for its own
tile, and the backward's other-side tile serves both of its dots; wider rows, and fp32 (whose dots need twice the
registers), sum the scores over BLOCK_D chunks, and the backward writes BLOCK_OUT-wide output chunks, one program each
(recomputing the scores per chunk). D need not be a power of two. Memory beyond the outputs: one fp32 [A] buffer.
Dots take the input dtype: fp16/bf16 on tensor cores, fp32 as TF32 unless
``torch.get_float32_matmul_precision() == "highest"`` (IEEE). float64 is not taken (the op's declaration).
"""
import dataclasses

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, aot_specs, input_precision, launch_device, online_lse_rows

_LOG2E = 1.4426950408889634
# Constants read inside the kernels must be constexpr globals.
_LOG2E_C = tl.constexpr(_LOG2E)
_LN2_C = tl.constexpr(0.6931471805599453)
# d s lies in [-1, 1] and its softmax part is about 1 / M: scaled by 2^12 before the cast to the input dtype it
# stays clear of fp16's subnormals (below 6.1e-5); the fp32 accumulator takes the factor back (exact: a power of 2).
_DS_SCALE = 4096.0
_DS_SCALE_C = tl.constexpr(_DS_SCALE)

# ---------------------------------------------------------------------------------------------------
# Launch parameters: [D class][dtype] per kernel, read by the launchers and by AOT_SPECS (python -m
# vitfast.compile_check compiles every entry for sm_80 and sm_90a: 0 spills, mma / wgmma).
# D classes: the widest row of the class (d64, d128, d256), "chunked" above 256. ONE_CHUNK: the row is one zero-padded
# BLOCK_D chunk, held in registers by the program for its own tile (fp16 / bf16 up to D = 256); otherwise the scores
# are summed over BLOCK_D chunks and the backward writes BLOCK_OUT-wide output chunks, one program each (it
# recomputes the scores per chunk). fp32 dots (IEEE FMA, or TF32) take twice the registers per element: small tiles,
# score chunks of 64 (forward) and 32 (backward; 64 spilled 8-16 B in the IEEE d pool kernel on sm_90a).
# 16-bit anchor tiles of 32 rows up to D = 128: the 2 x 2048-view NT-Xent benchmark (A = M = 4096) gets 128 programs
# per kernel, about one wave of a 132-SM GPU.
# ---------------------------------------------------------------------------------------------------
CLASSES = {"d64": 64, "d128": 128, "d256": 256, "chunked": None}


def _per_dtype(half: dict, fp32: dict) -> dict:
    return {torch.float16: half, torch.bfloat16: half, torch.float32: fp32}


_FWD32 = dict(BLOCK_A=16, BLOCK_M=32, BLOCK_D=64, ONE_CHUNK=False, num_warps=8, num_stages=1)
FORWARD_CONFIG = {
    "d64": _per_dtype(dict(BLOCK_A=32, BLOCK_M=64, BLOCK_D=64, ONE_CHUNK=True, num_warps=4, num_stages=2), _FWD32),
    "d128": _per_dtype(dict(BLOCK_A=32, BLOCK_M=64, BLOCK_D=128, ONE_CHUNK=True, num_warps=4, num_stages=2), _FWD32),
    "d256": _per_dtype(dict(BLOCK_A=64, BLOCK_M=64, BLOCK_D=256, ONE_CHUNK=True, num_warps=8, num_stages=2), _FWD32),
    "chunked": _per_dtype(dict(BLOCK_A=64, BLOCK_M=64, BLOCK_D=64, ONE_CHUNK=False, num_warps=8, num_stages=1),
                          _FWD32),
}
_BWD32 = dict(BLOCK_OWN=32, BLOCK_OTHER=32, BLOCK_D=32, BLOCK_OUT=64, ONE_CHUNK=False, num_warps=8, num_stages=1)
BACKWARD_CONFIG = {
    "d64": _per_dtype(dict(BLOCK_OWN=32, BLOCK_OTHER=64, BLOCK_D=64, BLOCK_OUT=64, ONE_CHUNK=True, num_warps=4,
                           num_stages=2), _BWD32),
    "d128": _per_dtype(dict(BLOCK_OWN=32, BLOCK_OTHER=32, BLOCK_D=128, BLOCK_OUT=128, ONE_CHUNK=True, num_warps=4,
                            num_stages=2), dict(_BWD32, BLOCK_OUT=128)),
    "d256": _per_dtype(dict(BLOCK_OWN=32, BLOCK_OTHER=32, BLOCK_D=256, BLOCK_OUT=256, ONE_CHUNK=True, num_warps=8,
                            num_stages=1), dict(_BWD32, BLOCK_OUT=128)),
    "chunked": _per_dtype(dict(BLOCK_OWN=32, BLOCK_OTHER=32, BLOCK_D=64, BLOCK_OUT=128, ONE_CHUNK=False,
                               num_warps=8, num_stages=1), dict(_BWD32, BLOCK_OUT=128)),
}
del _FWD32, _BWD32


def d_class(D: int) -> str:
    """The launch-table class of a row width D."""
    return next((name for name, widest in CLASSES.items() if widest is not None and D <= widest), "chunked")


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(ptr, offs, n_rows, offs_d, D):
    """Tile [len(offs), len(offs_d)] of a row-major [n_rows, D] matrix; 0 outside (rows past n_rows, d past D)."""
    mask = (offs < n_rows)[:, None] & (offs_d < D)[None, :]
    return tl.load(ptr + offs.to(tl.int64)[:, None] * D + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _chunked_scores(own_ptr, other_ptr, offs_own, offs_other, N_OWN, N_OTHER, D,
                    INPUT_PRECISION: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_OTHER: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """<own row, other row> for a [BLOCK_OWN, BLOCK_OTHER] tile, summed over BLOCK_D chunks of D (fp32)."""
    acc = tl.zeros((BLOCK_OWN, BLOCK_OTHER), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        own = _load_rows(own_ptr, offs_own, N_OWN, offs_d, D)
        other = _load_rows(other_ptr, offs_other, N_OTHER, offs_d, D)
        acc = tl.dot(own, tl.trans(other), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _contrastive_fwd_kernel(
    anchors_ptr, pool_ptr, anchor_labels_ptr, pool_labels_ptr, anchor_self_ptr, lse_ptr, count_ptr, row_loss_ptr,
    A, M, D, scale_log2, loss_scale,
    INPUT_PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    # scale_log2 = inv_temperature * log2(e): scores in log2 units. Writes lse fp32 [A] (natural log, 0 where no
    # positive), count int32 [A] and row_loss fp32 [A] = loss_scale * (lse - S / n) (0 where no positive).
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    in_a = offs_a < A
    label_a = tl.load(anchor_labels_ptr + offs_a, mask=in_a, other=0)
    self_a = tl.load(anchor_self_ptr + offs_a, mask=in_a, other=-1)
    if ONE_CHUNK:
        anchors = _load_rows(anchors_ptr, offs_a, A, tl.arange(0, BLOCK_D), D)  # held for the whole loop
    m = tl.full((BLOCK_A,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_A,), dtype=tl.float32)
    positive_sum = tl.zeros((BLOCK_A,), dtype=tl.float32)
    count = tl.zeros((BLOCK_A,), dtype=tl.int32)
    for j0 in range(0, M, BLOCK_M):
        offs_j = j0 + tl.arange(0, BLOCK_M)
        in_j = offs_j < M
        if ONE_CHUNK:
            pool = _load_rows(pool_ptr, offs_j, M, tl.arange(0, BLOCK_D), D)
            s = tl.dot(anchors, tl.trans(pool), input_precision=INPUT_PRECISION)
        else:
            s = _chunked_scores(anchors_ptr, pool_ptr, offs_a, offs_j, A, M, D, INPUT_PRECISION, BLOCK_A, BLOCK_M,
                                BLOCK_D)
        s = s * scale_log2
        label_j = tl.load(pool_labels_ptr + offs_j, mask=in_j, other=0)
        allowed = in_j[None, :] & (offs_j[None, :] != self_a[:, None])
        positive = allowed & (label_j[None, :] == label_a[:, None])
        m, l = online_lse_rows(m, l, tl.where(allowed, s, float("-inf")))
        positive_sum += tl.sum(tl.where(positive, s, 0.0), axis=1)
        count += tl.sum(positive.to(tl.int32), axis=1)
    has = count > 0
    # where n = 0 the row may have no allowed column at all (m = -inf, l = 0): both results are 0, never NaN
    lse = tl.where(has, (m + tl.log2(tl.where(has, l, 1.0))) * _LN2_C, 0.0)
    row = tl.where(has, lse - positive_sum * _LN2_C / tl.maximum(count, 1).to(tl.float32), 0.0)
    tl.store(lse_ptr + offs_a, lse, mask=in_a)
    tl.store(count_ptr + offs_a, count, mask=in_a)
    tl.store(row_loss_ptr + offs_a, row * loss_scale, mask=in_a)


@triton.jit
def _anchor_stats(anchor_labels_ptr, anchor_self_ptr, lse_ptr, count_ptr, offs, A):
    """(label, own pool row, lse in log2 units, 1 / n or 0 where n = 0 or a >= A) of the anchors ``offs``."""
    in_a = offs < A
    label = tl.load(anchor_labels_ptr + offs, mask=in_a, other=0)
    own_row = tl.load(anchor_self_ptr + offs, mask=in_a, other=-1)
    lse2 = tl.load(lse_ptr + offs, mask=in_a, other=0.0) * _LOG2E_C
    count = tl.load(count_ptr + offs, mask=in_a, other=0)
    return label, own_row, lse2, tl.where(count > 0, 1.0 / tl.maximum(count, 1).to(tl.float32), 0.0)


@triton.jit
def _contrastive_bwd_kernel(
    own_ptr, other_ptr, anchor_labels_ptr, pool_labels_ptr, anchor_self_ptr, lse_ptr, count_ptr, grad_loss_ptr,
    grad_ptr, N_OWN, N_OTHER, D, scale_log2, weight,
    POOL: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_OTHER: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_OUT: tl.constexpr, ONE_CHUNK: tl.constexpr,
):
    # own / other: anchors / pool (d anchors) or pool / anchors (d pool, POOL); tiles are [own, other], so for d pool
    # the anchor statistics run along axis 1. weight = loss_scale * inv_temperature / _DS_SCALE; grad_loss_ptr: the
    # upstream gradient ([] fp32, read on the device: no host sync). grad_ptr: [N_OWN, D] in the input dtype.
    # ONE_CHUNK: the whole row is one BLOCK_D = BLOCK_OUT chunk, and the other side's tile serves both dots.
    n_chunks = tl.cdiv(D, BLOCK_OUT)
    pid = tl.program_id(0)
    offs_own = (pid // n_chunks) * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
    offs_dc = (pid % n_chunks) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)  # this program's output chunk
    in_own = offs_own < N_OWN
    if POOL:
        label_own = tl.load(pool_labels_ptr + offs_own, mask=in_own, other=0)
    else:
        label_own, self_own, lse_own, inv_n_own = _anchor_stats(anchor_labels_ptr, anchor_self_ptr, lse_ptr,
                                                                count_ptr, offs_own, N_OWN)
    if ONE_CHUNK:
        own = _load_rows(own_ptr, offs_own, N_OWN, offs_dc, D)  # held for the whole loop
    acc = tl.zeros((BLOCK_OWN, BLOCK_OUT), dtype=tl.float32)
    for o0 in range(0, N_OTHER, BLOCK_OTHER):
        offs_other = o0 + tl.arange(0, BLOCK_OTHER)
        other = _load_rows(other_ptr, offs_other, N_OTHER, offs_dc, D)
        if ONE_CHUNK:
            s = tl.dot(own, tl.trans(other), input_precision=INPUT_PRECISION)
        else:
            s = _chunked_scores(own_ptr, other_ptr, offs_own, offs_other, N_OWN, N_OTHER, D, INPUT_PRECISION,
                                BLOCK_OWN, BLOCK_OTHER, BLOCK_D)
        s = s * scale_log2
        in_other = offs_other < N_OTHER
        if POOL:  # rows j (pool), columns a (anchors)
            label_a, self_a, lse_a, inv_n = _anchor_stats(anchor_labels_ptr, anchor_self_ptr, lse_ptr, count_ptr,
                                                          offs_other, N_OTHER)
            allowed = in_own[:, None] & (offs_own[:, None] != self_a[None, :])
            positive = allowed & (label_own[:, None] == label_a[None, :])
            softmax = tl.where(allowed & (inv_n > 0)[None, :], tl.exp2(s - lse_a[None, :]), 0.0)
            ds = softmax - tl.where(positive, inv_n[None, :], 0.0)
        else:  # rows a (anchors), columns j (pool)
            label_j = tl.load(pool_labels_ptr + offs_other, mask=in_other, other=0)
            allowed = in_other[None, :] & (offs_other[None, :] != self_own[:, None])
            positive = allowed & (label_j[None, :] == label_own[:, None])
            softmax = tl.where(allowed & (inv_n_own > 0)[:, None], tl.exp2(s - lse_own[:, None]), 0.0)
            ds = softmax - tl.where(positive, inv_n_own[:, None], 0.0)
        acc = tl.dot((ds * _DS_SCALE_C).to(other.dtype), other, acc, input_precision=INPUT_PRECISION)
    scale = tl.load(grad_loss_ptr).to(tl.float32) * weight
    out_mask = in_own[:, None] & (offs_dc < D)[None, :]
    tl.store(grad_ptr + offs_own.to(tl.int64)[:, None] * D + offs_dc[None, :],
             (acc * scale).to(grad_ptr.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------
def _check_dtype(anchors: torch.Tensor) -> None:
    if anchors.dtype not in TRITON_DTYPE:
        raise TypeError(f"contrastive_loss (triton) takes float32/float16/bfloat16, got {anchors.dtype}")


def contrastive_loss_forward(anchors, pool, anchor_labels, pool_labels, anchor_self, inv_temperature: float,
                             loss_scale: float):
    """(loss [] fp32, lse [A] fp32, count [A] int32) for anchors [A, D], pool [M, D] (contiguous, one dtype)."""
    _check_dtype(anchors)
    A, D = anchors.shape
    M = pool.shape[0]
    cfg = FORWARD_CONFIG[d_class(D)][anchors.dtype]
    lse = torch.empty(A, device=anchors.device, dtype=torch.float32)  # all three fully written
    count = torch.empty(A, device=anchors.device, dtype=torch.int32)
    row_loss = torch.empty(A, device=anchors.device, dtype=torch.float32)
    with launch_device(anchors):
        _contrastive_fwd_kernel[(triton.cdiv(A, cfg["BLOCK_A"]),)](
            anchors, pool, anchor_labels, pool_labels, anchor_self, lse, count, row_loss, A, M, D,
            float(inv_temperature) * _LOG2E, float(loss_scale), INPUT_PRECISION=input_precision(anchors.dtype), **cfg)
        # fixed-order sum in fp64 (deterministic, independent of the GPU's SM count)
        loss = row_loss.sum(dtype=torch.float64).to(torch.float32)
    return loss, lse, count


def contrastive_loss_backward(grad_loss, anchors, pool, anchor_labels, pool_labels, anchor_self, lse, count,
                              inv_temperature: float, loss_scale: float, output_mask):
    """(d_anchors [A, D], d_pool [M, D]) in the inputs' dtype, None where output_mask is False; lse and count are
    the forward's saved statistics."""
    _check_dtype(anchors)
    D = anchors.shape[1]
    cfg = BACKWARD_CONFIG[d_class(D)][anchors.dtype]
    n_chunks = triton.cdiv(D, cfg["BLOCK_OUT"])
    grad_loss = grad_loss.reshape(()) if grad_loss.dtype == torch.float32 else grad_loss.float().reshape(())
    grads = []
    with launch_device(anchors):
        for is_pool, own, other in ((False, anchors, pool), (True, pool, anchors)):
            if not output_mask[is_pool]:
                grads.append(None)
                continue
            grad = torch.empty_like(own)  # fully written
            _contrastive_bwd_kernel[(triton.cdiv(own.shape[0], cfg["BLOCK_OWN"]) * n_chunks,)](
                own, other, anchor_labels, pool_labels, anchor_self, lse, count, grad_loss, grad, own.shape[0],
                other.shape[0], D, float(inv_temperature) * _LOG2E,
                float(loss_scale) * float(inv_temperature) / _DS_SCALE, POOL=is_pool,
                INPUT_PRECISION=input_precision(anchors.dtype), **cfg)
            grads.append(grad)
    return tuple(grads)


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (walked by vitfast.compile_check): every kernel x dtype x precision x D class.
# A, M, D are runtime sizes; pointers from the caching allocator are 16-byte aligned.
# ---------------------------------------------------------------------------------------------------
_INTS = ("A", "M", "D", "N_OWN", "N_OTHER")
_FLOATS = ("scale_log2", "loss_scale", "weight")


def _aot_specs() -> list:
    specs = []
    for name in CLASSES:
        specs += aot_specs(
            _contrastive_fwd_kernel, FORWARD_CONFIG[name].get,
            lambda ty: dict(anchors_ptr=ty, pool_ptr=ty, anchor_labels_ptr="i64", pool_labels_ptr="i64",
                            anchor_self_ptr="i64", lse_ptr="fp32", count_ptr="i32", row_loss_ptr="fp32"),
            {}, ints=_INTS, floats=_FLOATS, variant=name)
        for is_pool in (False, True):
            specs += aot_specs(
                _contrastive_bwd_kernel, BACKWARD_CONFIG[name].get,
                lambda ty: dict(own_ptr=ty, other_ptr=ty, anchor_labels_ptr="i64", pool_labels_ptr="i64",
                                anchor_self_ptr="i64", lse_ptr="fp32", count_ptr="i32", grad_loss_ptr="fp32",
                                grad_ptr=ty),
                dict(POOL=is_pool), ints=_INTS, floats=_FLOATS,
                variant=f"{'d_pool' if is_pool else 'd_anchors'} {name}")
    # fp32 shares its entries between D classes: each distinct build once, labelled with its classes ("d128/d256")
    merged = {}
    for spec in specs:
        key = (spec.name, tuple(sorted(spec.constexprs.items())), spec.num_warps, spec.num_stages, spec.signature[
            "grad_ptr" if "grad_ptr" in spec.signature else "anchors_ptr"])
        if key in merged:
            merged[key] = dataclasses.replace(merged[key], variant=f"{merged[key].variant}/{spec.variant.split()[-1]}")
        else:
            merged[key] = spec
    return list(merged.values())


AOT_SPECS = _aot_specs()
