"""Triton kernels for ``relation_mlp_loss``: the MLP pair head's loss without materialising [B, N, N, H].

Math (u, v [B, N, H]; weight W [C, H]; bias b [C]; see vitfast/ops/relation_mlp_loss.py):

    pre[b, i, j] = u[b, i] + v[b, j],   h = act(pre),   out[b, i, j] = W h + b            (C = 9 or 2)
    direction:  pair loss = lse(out) - sum_c y_c out_c,  y = (1 - eps) onehot(target) + eps / C
                d out     = softmax(out) - y
    offset:     pair loss = 0.5 * sum_c (out_c - t_c)^2,  d out = out - t
    loss = sum over selected pairs / count;  every gradient carries w = grad / count (applied in torch at the end)
    d pre = (d out @ W) * act'(pre);  d u_i = sum_j d pre;  d v_j = sum_i d pre;  d W = sum d out^T h;  d b = sum d out

Kernels (1-D grids, the batch folded into axis 0; the hidden tile [BLOCK_I * BLOCK_J, BLOCK_H] is the reshape of the
broadcast u_i + v_j and is recomputed chunk by chunk over H; no per-pair state reaches memory):

    _mlp_fwd_kernel   program per (b, i-tile), loop over j-tiles: logits = sum over H chunks of tl.dot(h, W^T chunk)
                      ([M, BLOCK_H] x [BLOCK_H, BLOCK_C = 16]), then the per-pair loss / argmax; writes per-row sums
    _mlp_bwd_kernel   program per (b, split): a split is a run of consecutive i-tiles (backward_split). Per (i, j)
                      tile it recomputes the logits, forms d out, then per H chunk: d h = tl.dot(d out, W chunk), d pre
                      (the GELU's normal CDF computed once for h and act'). d u rows are owned by the program; d v goes
                      to the split's partial [B, splits, N, H] and d W / d b to [B, splits, BLOCK_C, H] / [.., BLOCK_C];
                      torch sums the partials in a fixed order. Scratch is O(B * N * H): at most MAX_SPLITS partials
                      of d v (4 at B = 64: 77 MB at N = 196, H = 384, where one partial per i-tile took 482 MB), none
                      beyond one at B >= TARGET_PROGRAMS. No atomics: deterministic, and independent of the GPU.
                      Each program re-reads its own earlier partial sums (d u across j-tiles, d v across its i-tiles,
                      d W across both): a barrier at the top of each tile orders those stores before the re-reads.

Accumulation is fp32; fp16 / bf16 inputs run their dots on tensor cores (h and d out cast to the input dtype; d out
is in [-1, 1] for direction and the 1/count weight is applied afterwards, so it never underflows). fp32 dots are IEEE
when ``torch.get_float32_matmul_precision() == "highest"``, TF32 otherwise. float64 is not taken (the op's backend
declaration sends it elsewhere).
"""
import torch
import triton
import triton.language as tl

from ._common import (aot_specs, direction_class, finish_row_stats, grid_offsets, input_precision, launch_device,
                      pair_selection, row_stats, store_row_stats)

BLOCK_C = 16  # classes padded to one tensor-core N / K tile (9 or 2 used)
# 8 x 8 pairs = 64 rows of the hidden tile, 32 hidden units per chunk: a [64, 32] fp32 tile is 16 registers per
# thread at 4 warps; the backward keeps pre, d h and d pre chunks plus the [64, 16] d out tile.
_FWD = dict(BLOCK_I=8, BLOCK_J=8, BLOCK_H=32, BLOCK_C=BLOCK_C, num_warps=4, num_stages=2)
_BWD = dict(BLOCK_I=8, BLOCK_J=8, BLOCK_H=32, BLOCK_C=BLOCK_C, num_warps=8, num_stages=1)
FORWARD_CONFIG = {torch.float32: dict(_FWD, num_stages=1),  # IEEE fp32 FMA dots with 2 stages spilled 8 B on sm_80
                  torch.float16: _FWD, torch.bfloat16: _FWD}
BACKWARD_CONFIG = {torch.float32: _BWD, torch.float16: _BWD, torch.bfloat16: _BWD}
del _FWD, _BWD
# Backward work split: enough programs to fill a GPU (a constant, not the SM count, so that results are bitwise equal
# across GPU models), at most MAX_SPLITS d v partials.
TARGET_PROGRAMS = 256
MAX_SPLITS = 4

_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _mlp_hidden_pre(u_ptr, v_ptr, b, offs_i, offs_j, offs_h, N, H,
                    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr):
    """pre = u_i + v_j as a [BLOCK_I * BLOCK_J, BLOCK_H] fp32 tile (0 outside N and H)."""
    in_h = offs_h < H
    base = b.to(tl.int64) * N * H
    u = tl.load(u_ptr + base + offs_i[:, None] * H + offs_h[None, :], mask=(offs_i < N)[:, None] & in_h[None, :],
                other=0.0).to(tl.float32)
    v = tl.load(v_ptr + base + offs_j[:, None] * H + offs_h[None, :], mask=(offs_j < N)[:, None] & in_h[None, :],
                other=0.0).to(tl.float32)
    pre = u[:, None, :] + v[None, :, :]
    return tl.reshape(pre, (BLOCK_I * BLOCK_J, BLOCK_H))


@triton.jit
def _mlp_act(pre, GELU: tl.constexpr):
    if GELU:
        return 0.5 * pre * (1.0 + tl.math.erf(pre * _INV_SQRT2))
    else:
        return tl.maximum(pre, 0.0)


@triton.jit
def _mlp_act_and_grad(pre, GELU: tl.constexpr):
    """(act(pre), act'(pre)); for GELU the normal CDF Phi is computed once: pre * Phi and Phi + pre * phi."""
    if GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(pre * _INV_SQRT2))
        return pre * cdf, cdf + pre * tl.exp(-0.5 * pre * pre) * _INV_SQRT_2PI
    else:
        return tl.maximum(pre, 0.0), (pre > 0.0).to(tl.float32)


@triton.jit
def _mlp_logits(u_ptr, v_ptr, w_ptr, bias_ptr, b, offs_i, offs_j, N, H, C,
                GELU: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = act(u_i + v_j) @ W^T + bias as a [BLOCK_I * BLOCK_J, BLOCK_C] fp32 tile (classes >= C hold 0)."""
    offs_c = tl.arange(0, BLOCK_C)
    in_c = offs_c < C
    acc = tl.zeros((BLOCK_I * BLOCK_J, BLOCK_C), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        hid = _mlp_act(_mlp_hidden_pre(u_ptr, v_ptr, b, offs_i, offs_j, offs_h, N, H, BLOCK_I, BLOCK_J, BLOCK_H),
                       GELU)
        w_t = tl.load(w_ptr + offs_c[None, :] * H + offs_h[:, None], mask=in_c[None, :] & (offs_h < H)[:, None],
                      other=0.0)  # [BLOCK_H, BLOCK_C]
        acc = tl.dot(hid.to(w_t.dtype), w_t, acc, input_precision=INPUT_PRECISION)
    bias = tl.load(bias_ptr + offs_c, mask=in_c, other=0.0).to(tl.float32)
    return acc + bias[None, :]


@triton.jit
def _mlp_pair_tile(u_ptr, v_ptr, w_ptr, bias_ptr, pos_ptr, mask_ptr, b, offs_i, offs_j, N, H, C, S, mask_batch_stride,
                   keep, spread, inv_span, DIRECTION: tl.constexpr, GELU: tl.constexpr, HAS_MASK: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    """One BLOCK_I x BLOCK_J tile of pairs as M = BLOCK_I * BLOCK_J rows: (selected [M] bool, out [M, BLOCK_C] fp32
    logits, target [M] int32 direction class, goal [M, BLOCK_C]: the smoothed one-hot y (direction) or the normalised
    grid offsets in columns 0, 1 (offset))."""
    M: tl.constexpr = BLOCK_I * BLOCK_J
    offs_c = tl.arange(0, BLOCK_C)
    d_row, d_col = grid_offsets(pos_ptr, b, offs_i, offs_j, N, S)
    selected = tl.reshape(pair_selection(mask_ptr, b, offs_i, offs_j, N, mask_batch_stride, HAS_MASK), (M,))
    out = _mlp_logits(u_ptr, v_ptr, w_ptr, bias_ptr, b, offs_i, offs_j, N, H, C,
                      GELU, INPUT_PRECISION, BLOCK_I, BLOCK_J, BLOCK_H, BLOCK_C)
    target = tl.reshape(direction_class(d_row, d_col), (M,))
    if DIRECTION:
        goal = tl.where(offs_c[None, :] == target[:, None], keep + spread, spread)
    else:
        t_row = tl.reshape(d_row.to(tl.float32) * inv_span, (M,))
        t_col = tl.reshape(d_col.to(tl.float32) * inv_span, (M,))
        goal = tl.where(offs_c[None, :] == 0, t_row[:, None], t_col[:, None])
    return selected, out, target, goal


@triton.jit
def _mlp_fwd_kernel(
    u_ptr, v_ptr, w_ptr, bias_ptr, pos_ptr, mask_ptr, row_loss_ptr, row_hits_ptr,
    N, H, C, S, mask_batch_stride, keep, spread, inv_span,
    DIRECTION: tl.constexpr, GELU: tl.constexpr, HAS_MASK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # row stats: see store_row_stats (per query row: loss sum, correct, selected).
    n_tiles = tl.cdiv(N, BLOCK_I)
    pid = tl.program_id(0)
    b = pid // n_tiles
    M: tl.constexpr = BLOCK_I * BLOCK_J
    offs_i = (pid % n_tiles) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_c = tl.arange(0, BLOCK_C)
    in_c = (offs_c < C)[None, :]
    loss = tl.zeros((BLOCK_I,), dtype=tl.float32)
    correct = tl.zeros((BLOCK_I,), dtype=tl.int32)
    selected = tl.zeros((BLOCK_I,), dtype=tl.int32)
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        valid, out, target, goal = _mlp_pair_tile(
            u_ptr, v_ptr, w_ptr, bias_ptr, pos_ptr, mask_ptr, b, offs_i, offs_j, N, H, C, S, mask_batch_stride,
            keep, spread, inv_span, DIRECTION, GELU, HAS_MASK, INPUT_PRECISION, BLOCK_I, BLOCK_J, BLOCK_H, BLOCK_C)
        if DIRECTION:
            scores = tl.where(in_c, out, float("-inf"))
            m = tl.max(scores, axis=1)
            lse = m + tl.log(tl.sum(tl.exp(scores - m[:, None]), axis=1))
            pair_loss = lse - tl.sum(tl.where(in_c, goal * out, 0.0), axis=1)
            hit = (tl.argmax(scores, axis=1).to(tl.int32) == target) & valid
        else:
            diff = tl.where(in_c, out - goal, 0.0)
            pair_loss = 0.5 * tl.sum(diff * diff, axis=1)
            hit = tl.zeros((M,), dtype=tl.int32) != 0
        pair_loss = tl.where(valid, pair_loss, 0.0)
        loss += tl.sum(tl.reshape(pair_loss, (BLOCK_I, BLOCK_J)), axis=1)
        correct += tl.sum(tl.reshape(hit.to(tl.int32), (BLOCK_I, BLOCK_J)), axis=1)
        selected += tl.sum(tl.reshape(valid.to(tl.int32), (BLOCK_I, BLOCK_J)), axis=1)
    store_row_stats(row_loss_ptr, row_hits_ptr, b, offs_i, N, loss, correct, selected)


@triton.jit
def _mlp_bwd_kernel(
    u_ptr, v_ptr, w_ptr, bias_ptr, pos_ptr, mask_ptr, du_ptr, dv_part_ptr, dw_part_ptr, db_part_ptr,
    N, H, C, S, mask_batch_stride, splits, tiles_per_split, keep, spread, inv_span,
    DIRECTION: tl.constexpr, GELU: tl.constexpr, HAS_MASK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Unweighted gradients (torch multiplies by grad / count): du_ptr fp32 [B, N, H] (this program's rows only);
    # dv_part_ptr fp32 [B, splits, N, H]; dw_part_ptr fp32 [B, splits, BLOCK_C, H]; db_part_ptr fp32
    # [B, splits, BLOCK_C]. Program pid = b * splits + split owns i-tiles [split, split + 1) * tiles_per_split.
    pid = tl.program_id(0)
    b = pid // splits
    part = pid.to(tl.int64)  # index of this program's partials: (b, split)
    first_tile = (pid % splits) * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(N, BLOCK_I))
    offs_c = tl.arange(0, BLOCK_C)
    in_c = (offs_c < C)[None, :]
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for tile in range(first_tile, last_tile):
        offs_i = tile * BLOCK_I + tl.arange(0, BLOCK_I)
        in_i = offs_i < N
        for j0 in range(0, N, BLOCK_J):
            # The partial sums stored for the previous tile are re-read below by other threads of this program.
            tl.debug_barrier()
            offs_j = j0 + tl.arange(0, BLOCK_J)
            in_j = offs_j < N
            valid, out, target, goal = _mlp_pair_tile(
                u_ptr, v_ptr, w_ptr, bias_ptr, pos_ptr, mask_ptr, b, offs_i, offs_j, N, H, C, S, mask_batch_stride,
                keep, spread, inv_span, DIRECTION, GELU, HAS_MASK, INPUT_PRECISION, BLOCK_I, BLOCK_J, BLOCK_H, BLOCK_C)
            if DIRECTION:
                scores = tl.where(in_c, out, float("-inf"))
                p = tl.exp(scores - tl.max(scores, axis=1)[:, None])
                d_out = p / tl.sum(p, axis=1)[:, None] - goal
            else:
                d_out = out - goal
            d_out = tl.where(valid[:, None] & in_c, d_out, 0.0)  # [M, BLOCK_C] fp32
            db += tl.sum(d_out, axis=0)
            d_out_lp = d_out.to(u_ptr.dtype.element_ty)
            for h0 in range(0, H, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                in_h = offs_h < H
                pre = _mlp_hidden_pre(u_ptr, v_ptr, b, offs_i, offs_j, offs_h, N, H, BLOCK_I, BLOCK_J, BLOCK_H)
                hid, act_grad = _mlp_act_and_grad(pre, GELU)
                w = tl.load(w_ptr + offs_c[:, None] * H + offs_h[None, :],
                            mask=(offs_c < C)[:, None] & in_h[None, :], other=0.0)  # [BLOCK_C, BLOCK_H]
                d_h = tl.dot(d_out_lp, w, input_precision=INPUT_PRECISION)  # [M, BLOCK_H]
                d_pre = tl.reshape(d_h * act_grad, (BLOCK_I, BLOCK_J, BLOCK_H))
                # d v: this split's partial for key rows j, summed over its i-tiles
                dv = tl.sum(d_pre, axis=0)
                dv_out = dv_part_ptr + (part * N + offs_j)[:, None] * H + offs_h[None, :]
                if tile > first_tile:
                    dv += tl.load(dv_out, mask=in_j[:, None] & in_h[None, :], other=0.0)
                tl.store(dv_out, dv, mask=in_j[:, None] & in_h[None, :])
                # d u: rows owned by this program, summed over j-tiles
                du = tl.sum(d_pre, axis=1)
                du_out = du_ptr + (b.to(tl.int64) * N + offs_i)[:, None] * H + offs_h[None, :]
                if j0 > 0:
                    du += tl.load(du_out, mask=in_i[:, None] & in_h[None, :], other=0.0)
                tl.store(du_out, du, mask=in_i[:, None] & in_h[None, :])
                # d W: sum over this split's pairs of d out^T h
                dw = tl.dot(tl.trans(d_out_lp), hid.to(d_out_lp.dtype), input_precision=INPUT_PRECISION)
                dw_out = dw_part_ptr + (part * BLOCK_C + offs_c)[:, None] * H + offs_h[None, :]
                if (tile > first_tile) | (j0 > 0):
                    dw += tl.load(dw_out, mask=in_h[None, :], other=0.0)
                tl.store(dw_out, dw, mask=in_h[None, :])
    tl.store(db_part_ptr + part * BLOCK_C + offs_c, db)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------
def _scalars(u, positions, pair_mask, grid_size: int, task: str, activation: str, label_smoothing: float) -> dict:
    B, N, H = u.shape
    C = 9 if task == "direction" else 2
    if positions is None:
        positions = torch.arange(N, device=u.device).expand(B, N).contiguous()
    S = max(int(grid_size), 1)
    return dict(
        pos_ptr=positions,
        mask_ptr=pair_mask.view(torch.uint8) if pair_mask is not None else positions,  # never read without a mask
        N=N, H=H, C=C, S=S,
        mask_batch_stride=N * N if pair_mask is not None and pair_mask.dim() == 3 else 0,
        keep=1.0 - label_smoothing, spread=label_smoothing / C, inv_span=1.0 / max(S - 1, 1),
        DIRECTION=task == "direction", GELU=activation == "gelu", HAS_MASK=pair_mask is not None,
        INPUT_PRECISION=input_precision(u.dtype),
    )


def _check_task(task: str, activation: str) -> None:
    if task not in ("direction", "offset") or activation not in ("gelu", "relu"):
        raise ValueError(f"relation_mlp_loss triton: unsupported task {task!r} / activation {activation!r}")


def backward_split(batch: int, n: int, dtype: torch.dtype) -> tuple:
    """(splits, tiles_per_split) of the backward: each of the batch * splits programs takes tiles_per_split
    consecutive i-tiles (the last may take fewer; none takes zero)."""
    tiles = triton.cdiv(n, BACKWARD_CONFIG[dtype]["BLOCK_I"])
    splits = max(1, min(tiles, MAX_SPLITS, triton.cdiv(TARGET_PROGRAMS, batch)))
    per_split = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, per_split), per_split


def backward_scratch(batch: int, n: int, hidden: int, dtype: torch.dtype) -> dict:
    """Shapes of the fp32 buffers the backward allocates: O(B * N * H) (at most 1 + MAX_SPLITS copies of u)."""
    splits, _ = backward_split(batch, n, dtype)
    return dict(du=(batch, n, hidden), dv_part=(batch, splits, n, hidden), dw_part=(batch, splits, BLOCK_C, hidden),
                db_part=(batch, splits, BLOCK_C))


def relation_mlp_loss_forward(u, v, weight, bias, positions, pair_mask, grid_size: int, task: str, activation: str,
                              label_smoothing: float):
    """(loss [] fp32, accuracy [] fp32, count [] int64); inputs fp32/fp16/bf16, validated and contiguous."""
    _check_task(task, activation)
    B, N, H = u.shape
    cfg = FORWARD_CONFIG[u.dtype]
    with launch_device(u):
        row_loss, row_hits = row_stats(B, N, u.device)
        _mlp_fwd_kernel[(B * triton.cdiv(N, cfg["BLOCK_I"]),)](
            u_ptr=u, v_ptr=v, w_ptr=weight, bias_ptr=bias, row_loss_ptr=row_loss, row_hits_ptr=row_hits,
            **_scalars(u, positions, pair_mask, grid_size, task, activation, label_smoothing), **cfg)
    return finish_row_stats(row_loss, row_hits)


def relation_mlp_loss_backward(grad_loss, count, u, v, weight, bias, positions, pair_mask, grid_size: int, task: str,
                               activation: str, label_smoothing: float, output_mask) -> tuple:
    """(d_u, d_v, d_weight, d_bias) in their inputs' dtypes, None where output_mask is False."""
    _check_task(task, activation)
    B, N, H = u.shape
    C = weight.shape[0]
    splits, per_split = backward_split(B, N, u.dtype)
    with launch_device(u):
        # every element fully written by the kernel
        scratch = {name: torch.empty(shape, device=u.device, dtype=torch.float32)
                   for name, shape in backward_scratch(B, N, H, u.dtype).items()}
        _mlp_bwd_kernel[(B * splits,)](
            u_ptr=u, v_ptr=v, w_ptr=weight, bias_ptr=bias, du_ptr=scratch["du"], dv_part_ptr=scratch["dv_part"],
            dw_part_ptr=scratch["dw_part"], db_part_ptr=scratch["db_part"], splits=splits, tiles_per_split=per_split,
            **_scalars(u, positions, pair_mask, grid_size, task, activation, label_smoothing),
            **BACKWARD_CONFIG[u.dtype])
        scale = grad_loss.float() / count.clamp_min(1)  # device scalar: no host sync
        grads = (scratch["du"] * scale, scratch["dv_part"].sum(1) * scale,
                 scratch["dw_part"].sum((0, 1))[:C] * scale, scratch["db_part"].sum((0, 1))[:C] * scale)
    return tuple(g.to(t.dtype) if needed else None
                 for g, t, needed in zip(grads, (u, v, weight, bias), output_mask))


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (walked by vitfast.compile_check): both kernels x dtype on the training path (direction
# targets from positions, GELU, with a pair mask); N and H are runtime sizes.
# ---------------------------------------------------------------------------------------------------
_INTS = ("N", "H", "C", "S", "mask_batch_stride", "splits", "tiles_per_split")
_FLOATS = ("keep", "spread", "inv_span")


def _aot_specs() -> list:
    flags = dict(DIRECTION=True, GELU=True, HAS_MASK=True)
    inputs = lambda ty: dict(u_ptr=ty, v_ptr=ty, w_ptr=ty, bias_ptr=ty, pos_ptr="i64", mask_ptr="u8")
    return (aot_specs(_mlp_fwd_kernel, FORWARD_CONFIG.get,
                      lambda ty: dict(inputs(ty), row_loss_ptr="fp32", row_hits_ptr="i32"),
                      flags, ints=_INTS, floats=_FLOATS)
            + aot_specs(_mlp_bwd_kernel, BACKWARD_CONFIG.get,
                        lambda ty: dict(inputs(ty), du_ptr="fp32", dv_part_ptr="fp32", dw_part_ptr="fp32",
                                        db_part_ptr="fp32"),
                        flags, ints=_INTS, floats=_FLOATS))


AOT_SPECS = _aot_specs()
