"""Triton kernels for ``relation_mlp_loss``: the MLP pair head's loss without materialising [B, N, N, H].

Math (u, v [B, N, H]; weight W [C, H]; bias b [C]; see vitfast/ops/relation_mlp_loss.py):

    pre[b, i, j] = u[b, i] + v[b, j],   h = act(pre),   out[b, i, j] = W h + b            (C = 9 or 2)
    direction:  pair loss = lse(out) - sum_c y_c out_c,  y = (1 - eps) onehot(target) + eps / C
                d out     = softmax(out) - y
    offset:     pair loss = 0.5 * sum_c (out_c - t_c)^2,  d out = out - t
    loss = sum over selected pairs / count;  every gradient carries w = grad / count (applied in torch at the end)
    d pre = (d out @ W) * act'(pre);  d u_i = sum_j d pre;  d v_j = sum_i d pre;  d W = sum d out^T h;  d b = sum d out

Kernels (program per (i-tile, b), loop over j-tiles; the hidden tile [BLOCK_I * BLOCK_J, BLOCK_H] is the reshape of
the broadcast u_i + v_j and is recomputed chunk by chunk over H; no per-pair state reaches memory):

    _mlp_fwd_kernel   logits = sum over H chunks of tl.dot(h, W^T chunk) ([M, BLOCK_H] x [BLOCK_H, BLOCK_C = 16]),
                      then the per-pair loss / argmax; writes per-row sums (loss, correct, selected) only
    _mlp_bwd_kernel   recomputes the logits, forms d out, then per H chunk: d h = tl.dot(d out, W chunk), d pre;
                      d u rows (owned by the program: read-modify-write across j-tiles), d v as a per-program partial
                      [B, n_i_tiles, N, H] (each element written once), d W / d b as per-program partials
                      [B, n_i_tiles, BLOCK_C, H] / [B, n_i_tiles, BLOCK_C]; torch sums the partials in a fixed order.
                      No atomics: deterministic.

Accumulation is fp32; fp16 / bf16 inputs run their dots on tensor cores (h and d out cast to the input dtype; d out
is in [-1, 1] for direction and the 1/count weight is applied afterwards, so it never underflows). fp32 dots are IEEE
when ``torch.get_float32_matmul_precision() == "highest"``, TF32 otherwise. float64 is not taken (the op's backend
declaration sends it elsewhere).
"""
import math

import torch
import triton
import triton.language as tl

from . import AotSpec

BLOCK_C = 16  # classes padded to one tensor-core N / K tile (9 or 2 used)
# 8 x 8 pairs = 64 rows of the hidden tile, 32 hidden units per chunk: a [64, 32] fp32 tile is 16 registers per
# thread at 4 warps; the backward keeps pre, d h and d pre chunks plus the [64, 16] d out tile.
_FWD = dict(BLOCK_I=8, BLOCK_J=8, BLOCK_H=32, BLOCK_C=BLOCK_C, num_warps=4, num_stages=2)
_BWD = dict(BLOCK_I=8, BLOCK_J=8, BLOCK_H=32, BLOCK_C=BLOCK_C, num_warps=4, num_stages=1)
_FWD32 = dict(_FWD, num_stages=1)  # IEEE fp32 FMA dots with 2 stages spilled 8 B on sm_80
_BWD8 = dict(_BWD, num_warps=8)
FORWARD_CONFIG = {torch.float32: _FWD32, torch.float16: _FWD, torch.bfloat16: _FWD}
BACKWARD_CONFIG = {torch.float32: _BWD8, torch.float16: _BWD8, torch.bfloat16: _BWD8}
del _FWD, _BWD, _FWD32, _BWD8

_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _mlp_pairs(pos_ptr, mask_ptr, b, offs_i, offs_j, N, S, mask_batch_stride, HAS_MASK: tl.constexpr):
    """(selected [BI, BJ] bool, d_row, d_col [BI, BJ] int32): grid offsets of token i from token j."""
    in_i = offs_i < N
    in_j = offs_j < N
    valid = in_i[:, None] & in_j[None, :]
    if HAS_MASK:
        pair = offs_i[:, None] * N + offs_j[None, :]
        picked = tl.load(mask_ptr + b.to(tl.int64) * mask_batch_stride + pair, mask=valid, other=0)
        valid = valid & (picked != 0)
    cell_i = tl.load(pos_ptr + b * N + offs_i, mask=in_i, other=0).to(tl.int32)
    cell_j = tl.load(pos_ptr + b * N + offs_j, mask=in_j, other=0).to(tl.int32)
    row_i = cell_i // S
    row_j = cell_j // S
    col_i = cell_i - row_i * S
    col_j = cell_j - row_j * S
    return valid, row_i[:, None] - row_j[None, :], col_i[:, None] - col_j[None, :]


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
def _mlp_act_grad(pre, GELU: tl.constexpr):
    if GELU:
        return 0.5 * (1.0 + tl.math.erf(pre * _INV_SQRT2)) + pre * tl.exp(-0.5 * pre * pre) * _INV_SQRT_2PI
    else:
        return (pre > 0.0).to(tl.float32)


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
def _mlp_fwd_kernel(
    u_ptr, v_ptr, w_ptr, bias_ptr, pos_ptr, mask_ptr, row_loss_ptr, row_hits_ptr,
    N, H, C, S, mask_batch_stride, keep, spread, inv_span,
    DIRECTION: tl.constexpr, GELU: tl.constexpr, HAS_MASK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # row_loss_ptr: fp32 [B, N] sums of pair losses per query row; row_hits_ptr: int32 [2, B, N] (correct, selected).
    pid_i = tl.program_id(0)
    b = tl.program_id(1)
    M: tl.constexpr = BLOCK_I * BLOCK_J
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_c = tl.arange(0, BLOCK_C)
    in_c = (offs_c < C)[None, :]
    loss = tl.zeros((BLOCK_I,), dtype=tl.float32)
    correct = tl.zeros((BLOCK_I,), dtype=tl.int32)
    selected = tl.zeros((BLOCK_I,), dtype=tl.int32)
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        valid, d_row, d_col = _mlp_pairs(pos_ptr, mask_ptr, b, offs_i, offs_j, N, S, mask_batch_stride, HAS_MASK)
        valid = tl.reshape(valid, (M,))
        out = _mlp_logits(u_ptr, v_ptr, w_ptr, bias_ptr, b, offs_i, offs_j, N, H, C,
                          GELU, INPUT_PRECISION, BLOCK_I, BLOCK_J, BLOCK_H, BLOCK_C)
        if DIRECTION:
            sign_row = (d_row > 0).to(tl.int32) - (d_row < 0).to(tl.int32)
            sign_col = (d_col > 0).to(tl.int32) - (d_col < 0).to(tl.int32)
            target = tl.reshape(3 * (sign_row + 1) + (sign_col + 1), (M,))
            scores = tl.where(in_c, out, float("-inf"))
            m = tl.max(scores, axis=1)
            lse = m + tl.log(tl.sum(tl.exp(scores - m[:, None]), axis=1))
            y = tl.where(offs_c[None, :] == target[:, None], keep + spread, spread)
            pair_loss = lse - tl.sum(tl.where(in_c, y * out, 0.0), axis=1)
            hit = (tl.argmax(scores, axis=1).to(tl.int32) == target) & valid
        else:
            t_row = tl.reshape(d_row.to(tl.float32) * inv_span, (M,))
            t_col = tl.reshape(d_col.to(tl.float32) * inv_span, (M,))
            goal = tl.where(offs_c[None, :] == 0, t_row[:, None], t_col[:, None])
            diff = tl.where(in_c, out - goal, 0.0)
            pair_loss = 0.5 * tl.sum(diff * diff, axis=1)
            hit = tl.zeros((M,), dtype=tl.int32) != 0
        pair_loss = tl.where(valid, pair_loss, 0.0)
        loss += tl.sum(tl.reshape(pair_loss, (BLOCK_I, BLOCK_J)), axis=1)
        correct += tl.sum(tl.reshape(hit.to(tl.int32), (BLOCK_I, BLOCK_J)), axis=1)
        selected += tl.sum(tl.reshape(valid.to(tl.int32), (BLOCK_I, BLOCK_J)), axis=1)
    in_i = offs_i < N
    rows = b * N + offs_i
    tl.store(row_loss_ptr + rows, loss, mask=in_i)
    tl.store(row_hits_ptr + rows, correct, mask=in_i)
    tl.store(row_hits_ptr + tl.num_programs(1) * N + rows, selected, mask=in_i)


@triton.jit
def _mlp_bwd_kernel(
    u_ptr, v_ptr, w_ptr, bias_ptr, pos_ptr, mask_ptr, du_ptr, dv_part_ptr, dw_part_ptr, db_part_ptr,
    N, H, C, S, mask_batch_stride, n_i_tiles, keep, spread, inv_span,
    DIRECTION: tl.constexpr, GELU: tl.constexpr, HAS_MASK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Unweighted gradients (torch multiplies by grad / count): du_ptr fp32 [B, N, H] (this program's rows only);
    # dv_part_ptr fp32 [B, n_i_tiles, N, H]; dw_part_ptr fp32 [B, n_i_tiles, BLOCK_C, H]; db_part_ptr fp32
    # [B, n_i_tiles, BLOCK_C]. Every element is written by exactly one program.
    pid_i = tl.program_id(0)
    b = tl.program_id(1)
    M: tl.constexpr = BLOCK_I * BLOCK_J
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    in_i = offs_i < N
    offs_c = tl.arange(0, BLOCK_C)
    in_c = (offs_c < C)[None, :]
    part = b.to(tl.int64) * n_i_tiles + pid_i
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        in_j = offs_j < N
        valid, d_row, d_col = _mlp_pairs(pos_ptr, mask_ptr, b, offs_i, offs_j, N, S, mask_batch_stride, HAS_MASK)
        valid = tl.reshape(valid, (M,))
        out = _mlp_logits(u_ptr, v_ptr, w_ptr, bias_ptr, b, offs_i, offs_j, N, H, C,
                          GELU, INPUT_PRECISION, BLOCK_I, BLOCK_J, BLOCK_H, BLOCK_C)
        if DIRECTION:
            sign_row = (d_row > 0).to(tl.int32) - (d_row < 0).to(tl.int32)
            sign_col = (d_col > 0).to(tl.int32) - (d_col < 0).to(tl.int32)
            target = tl.reshape(3 * (sign_row + 1) + (sign_col + 1), (M,))
            scores = tl.where(in_c, out, float("-inf"))
            m = tl.max(scores, axis=1)
            p = tl.exp(scores - m[:, None])
            p = p / tl.sum(p, axis=1)[:, None]
            y = tl.where(offs_c[None, :] == target[:, None], keep + spread, spread)
            d_out = p - y
        else:
            t_row = tl.reshape(d_row.to(tl.float32) * inv_span, (M,))
            t_col = tl.reshape(d_col.to(tl.float32) * inv_span, (M,))
            d_out = out - tl.where(offs_c[None, :] == 0, t_row[:, None], t_col[:, None])
        d_out = tl.where(valid[:, None] & in_c, d_out, 0.0)  # [M, BLOCK_C] fp32
        db += tl.sum(d_out, axis=0)
        d_out_lp = d_out.to(u_ptr.dtype.element_ty)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            in_h = offs_h < H
            pre = _mlp_hidden_pre(u_ptr, v_ptr, b, offs_i, offs_j, offs_h, N, H, BLOCK_I, BLOCK_J, BLOCK_H)
            w = tl.load(w_ptr + offs_c[:, None] * H + offs_h[None, :], mask=(offs_c < C)[:, None] & in_h[None, :],
                        other=0.0)  # [BLOCK_C, BLOCK_H]
            d_h = tl.dot(d_out_lp, w, input_precision=INPUT_PRECISION)  # [M, BLOCK_H]
            d_pre = tl.reshape(d_h * _mlp_act_grad(pre, GELU), (BLOCK_I, BLOCK_J, BLOCK_H))
            # d v: this program's partial for key rows j (one write per element)
            dv_out = dv_part_ptr + (part * N + offs_j)[:, None] * H + offs_h[None, :]
            tl.store(dv_out, tl.sum(d_pre, axis=0), mask=in_j[:, None] & in_h[None, :])
            # d u: rows owned by this program, accumulated over j-tiles
            du = tl.sum(d_pre, axis=1)
            du_out = du_ptr + (b.to(tl.int64) * N + offs_i)[:, None] * H + offs_h[None, :]
            if j0 > 0:
                du += tl.load(du_out, mask=in_i[:, None] & in_h[None, :], other=0.0)
            tl.store(du_out, du, mask=in_i[:, None] & in_h[None, :])
            # d W: sum over pairs of d out^T h
            hid = _mlp_act(pre, GELU)
            dw = tl.dot(tl.trans(d_out_lp), hid.to(d_out_lp.dtype), input_precision=INPUT_PRECISION)
            dw_out = dw_part_ptr + (part * BLOCK_C + offs_c)[:, None] * H + offs_h[None, :]
            if j0 > 0:
                dw += tl.load(dw_out, mask=in_h[None, :], other=0.0)
            tl.store(dw_out, dw, mask=in_h[None, :])
    tl.store(db_part_ptr + part * BLOCK_C + offs_c, db)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------
def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # fp32 at "high"/"medium"; ignored for fp16/bf16, which always use tensor cores


def _common(u, positions, pair_mask, grid_size: int, task: str, activation: str, label_smoothing: float) -> dict:
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
        INPUT_PRECISION=_input_precision(u.dtype),
    )


def _check_task(task: str, activation: str) -> None:
    if task not in ("direction", "offset") or activation not in ("gelu", "relu"):
        raise ValueError(f"relation_mlp_loss triton: unsupported task {task!r} / activation {activation!r}")


def relation_mlp_loss_forward(u, v, weight, bias, positions, pair_mask, grid_size: int, task: str, activation: str,
                              label_smoothing: float):
    """(loss [] fp32, accuracy [] fp32, count [] int64); inputs validated and contiguous."""
    _check_task(task, activation)
    B, N, H = u.shape
    row_loss = torch.empty((B, N), device=u.device, dtype=torch.float32)
    row_hits = torch.empty((2, B, N), device=u.device, dtype=torch.int32)
    cfg = FORWARD_CONFIG[u.dtype]
    grid = (triton.cdiv(N, cfg["BLOCK_I"]), B)
    _mlp_fwd_kernel[grid](u_ptr=u, v_ptr=v, w_ptr=weight, bias_ptr=bias, row_loss_ptr=row_loss, row_hits_ptr=row_hits,
                          **_common(u, positions, pair_mask, grid_size, task, activation, label_smoothing), **cfg)
    # Fixed-order reductions of the per-row statistics (deterministic): fp64 for the loss, int64 for the counts.
    count = row_hits[1].sum(dtype=torch.int64)
    denominator = count.clamp_min(1)
    loss = (row_loss.sum(dtype=torch.float64) / denominator).float()
    accuracy = (row_hits[0].sum(dtype=torch.int64) / denominator).float()
    return loss, accuracy, count


def relation_mlp_loss_backward(grad_loss, count, u, v, weight, bias, positions, pair_mask, grid_size: int, task: str,
                               activation: str, label_smoothing: float, output_mask) -> tuple:
    """(d_u, d_v, d_weight, d_bias) in their inputs' dtypes, None where output_mask is False."""
    _check_task(task, activation)
    B, N, H = u.shape
    C = weight.shape[0]
    cfg = BACKWARD_CONFIG[u.dtype]
    n_i_tiles = triton.cdiv(N, cfg["BLOCK_I"])
    f32 = dict(device=u.device, dtype=torch.float32)
    d_u = torch.empty((B, N, H), **f32)  # all fully written by the kernel
    dv_part = torch.empty((B, n_i_tiles, N, H), **f32)
    dw_part = torch.empty((B, n_i_tiles, BLOCK_C, H), **f32)
    db_part = torch.empty((B, n_i_tiles, BLOCK_C), **f32)
    _mlp_bwd_kernel[(n_i_tiles, B)](
        u_ptr=u, v_ptr=v, w_ptr=weight, bias_ptr=bias, du_ptr=d_u, dv_part_ptr=dv_part, dw_part_ptr=dw_part,
        db_part_ptr=db_part, n_i_tiles=n_i_tiles,
        **_common(u, positions, pair_mask, grid_size, task, activation, label_smoothing), **cfg)
    scale = grad_loss.float() / count.clamp_min(1)  # device scalar: no host sync
    grads = (d_u * scale, dv_part.sum(1) * scale, dw_part.sum((0, 1))[:C] * scale, db_part.sum((0, 1))[:C] * scale)
    return tuple(g.to(t.dtype) if needed else None
                 for g, t, needed in zip(grads, (u, v, weight, bias), output_mask))


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (walked by vitfast.compile_check)
# ---------------------------------------------------------------------------------------------------
_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_INTS = ("N", "H", "C", "S", "mask_batch_stride", "n_i_tiles")
_FLOATS = ("keep", "spread", "inv_span")


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
    # The training path: direction targets from positions, GELU, with a pair mask; H is a runtime size.
    variants = [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float16, "tf32"), (torch.bfloat16, "tf32")]
    kernels = ((_mlp_fwd_kernel, FORWARD_CONFIG, dict(row_loss_ptr="fp32", row_hits_ptr="i32")),
               (_mlp_bwd_kernel, BACKWARD_CONFIG,
                dict(du_ptr="fp32", dv_part_ptr="fp32", dw_part_ptr="fp32", db_part_ptr="fp32")))
    for dtype, precision in variants:
        ty = _TRITON_DTYPE[dtype]
        half = precision == "tf32"
        label = f"{ty}{'-tf32' if dtype == torch.float32 and half else ''}"
        for fn, table, outputs in kernels:
            blocks, launch = _launch(table[dtype])
            pointers = dict(u_ptr=ty, v_ptr=ty, w_ptr=ty, bias_ptr=ty, pos_ptr="i64", mask_ptr="u8", **outputs)
            specs.append(AotSpec(
                fn, _signature(fn, pointers),
                dict(DIRECTION=True, GELU=True, HAS_MASK=True, INPUT_PRECISION=precision, **blocks),
                variant=label, tensor_cores=half, **launch, aligned=tuple(pointers)))
    return specs


AOT_SPECS = _aot_specs()
