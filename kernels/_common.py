"""Pieces shared by the Triton kernels of vitfast (one home for each; never imported from ``vitfast.ops``).

Host side:
    aot_specs(...)              the AotSpecs (kernels/__init__.py) of one kernel, one per (dtype, precision), built from
                                the launch table the launcher uses; read by ``python -m vitfast.compile_check``
    input_precision(dtype)      ``"ieee"`` for fp32 under ``torch.get_float32_matmul_precision() == "highest"``, else
                                ``"tf32"`` (ignored by fp16 / bf16 dots, which always run on tensor cores)
    launch_device(tensor)       launch under the input's CUDA device (a no-op for CPU tensors under the interpreter)
    row_stats(B, N, device) / finish_row_stats(...)   per-row (loss, correct, selected) buffers of the pair losses and
                                their fixed-order (deterministic) reduction to (loss, accuracy, count)

Device side (``@triton.jit``), for the pair kernels (relation losses now; contrastive and DINO next):
    grid_offsets        row_i - row_j, col_i - col_j of tokens placed on an S x S grid by their cells
    direction_class     RelViT's 3 x 3 direction class from those offsets
    pair_selection      in-range pairs, optionally restricted by a [N, N] / [B, N, N] pair mask
    online_lse          log2-sum-exp2 over a stream of score tiles, element by element (e.g. over classes)
    online_lse_rows     log2-sum-exp2 of each row over a stream of column tiles (softmax over keys)
    store_row_stats     the per-row sums of a pair tile loop
"""
import contextlib

import torch
import triton
import triton.language as tl

from . import AotSpec

TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# The dtype / dot-precision variants every kernel is compiled for: fp32 runs IEEE (precision "highest") or TF32.
PRECISION_VARIANTS = ((torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float16, "tf32"),
                      (torch.bfloat16, "tf32"))


def input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # fp32 at "high"/"medium"; ignored for fp16/bf16, which always use tensor cores


def launch_device(tensor: torch.Tensor):
    """Context to launch under: the tensor's CUDA device (it need not be the current one), else nothing."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def split_config(cfg: dict) -> tuple:
    """A launch-table entry -> (constexpr block sizes, launch options)."""
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return {key: value for key, value in cfg.items() if key not in launch}, launch


def signature(kernel, pointers: dict, ints=(), floats=()) -> dict:
    """AOT signature: pointer arguments get ``*<type>``, ``ints`` i32, ``floats`` fp32, the rest are constexpr."""
    sig = {}
    for name in kernel.arg_names:
        if name in pointers:
            sig[name] = "*" + pointers[name]
        elif name in ints:
            sig[name] = "i32"
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
    return sig


def aot_specs(kernel, cfg: dict, pointers, flags: dict, *, ints=(), floats=(), variant="", aligned=()) -> list:
    """The AotSpecs of one kernel for every entry of PRECISION_VARIANTS.

    cfg(dtype) -> the launch-table entry (BLOCK_* constexprs and launch options) the launcher uses for that dtype;
    pointers(ty) -> {pointer argument: Triton element type} for the input type name ``ty`` ("fp16", ...);
    flags: the other constexprs (e.g. HAS_MASK); variant: a label suffix (e.g. the tile candidate)."""
    specs = []
    for dtype, precision in PRECISION_VARIANTS:
        ty = TRITON_DTYPE[dtype]
        tensor_cores = precision == "tf32"  # fp16/bf16 always, fp32 only as TF32
        label = f"{ty}{'-tf32' if dtype == torch.float32 and tensor_cores else ''}{' ' + variant if variant else ''}"
        blocks, launch = split_config(cfg(dtype))
        ptrs = pointers(ty)
        specs.append(AotSpec(kernel, signature(kernel, ptrs, ints, floats),
                             dict(flags, INPUT_PRECISION=precision, **blocks), variant=label,
                             tensor_cores=tensor_cores, aligned=tuple(ptrs) + tuple(aligned), **launch))
    return specs


def row_stats(batch: int, n: int, device) -> tuple:
    """(row_loss fp32 [B, N], row_hits int32 [B, N, 2] = (correct, selected)): written by store_row_stats."""
    return (torch.empty((batch, n), device=device, dtype=torch.float32),
            torch.empty((batch, n, 2), device=device, dtype=torch.int32))


def finish_row_stats(row_loss: torch.Tensor, row_hits: torch.Tensor) -> tuple:
    """(loss [] fp32, accuracy [] fp32, count [] int64): fixed-order sums (deterministic), fp64 for the loss."""
    count = row_hits[..., 1].sum(dtype=torch.int64)
    denominator = count.clamp_min(1)
    loss = (row_loss.sum(dtype=torch.float64) / denominator).float()
    accuracy = (row_hits[..., 0].sum(dtype=torch.int64) / denominator).float()
    return loss, accuracy, count


# ---------------------------------------------------------------------------------------------------
# @triton.jit helpers
# ---------------------------------------------------------------------------------------------------
@triton.jit
def grid_offsets(pos_ptr, b, offs_i, offs_j, N, S):
    """(row_i - row_j, col_i - col_j) int32 [BI, BJ] of tokens i, j whose grid cells (row * S + col, int64 [B, N])
    are at pos_ptr; 0 outside N."""
    base = pos_ptr + b.to(tl.int64) * N
    cell_i = tl.load(base + offs_i, mask=offs_i < N, other=0).to(tl.int32)
    cell_j = tl.load(base + offs_j, mask=offs_j < N, other=0).to(tl.int32)
    row_i = cell_i // S
    row_j = cell_j // S
    col_i = cell_i - row_i * S
    col_j = cell_j - row_j * S
    return row_i[:, None] - row_j[None, :], col_i[:, None] - col_j[None, :]


@triton.jit
def direction_class(d_row, d_col):
    """3 * (sign(d_row) + 1) + (sign(d_col) + 1): where token i lies relative to token j (0 = left-up ... 8)."""
    sign_row = (d_row > 0).to(tl.int32) - (d_row < 0).to(tl.int32)
    sign_col = (d_col > 0).to(tl.int32) - (d_col < 0).to(tl.int32)
    return 3 * (sign_row + 1) + (sign_col + 1)


@triton.jit
def pair_selection(mask_ptr, b, offs_i, offs_j, N, mask_batch_stride, HAS_MASK: tl.constexpr):
    """bool [BI, BJ]: i, j < N and, with HAS_MASK, mask[b, i, j] (uint8 view of a bool [B or 1, N, N] mask;
    mask_batch_stride = N * N for a per-sample mask, 0 for a shared one)."""
    valid = (offs_i < N)[:, None] & (offs_j < N)[None, :]
    if HAS_MASK:
        pair = offs_i[:, None] * N + offs_j[None, :]
        picked = tl.load(mask_ptr + b.to(tl.int64) * mask_batch_stride + pair, mask=valid, other=0)
        valid = valid & (picked != 0)
    return valid


@triton.jit
def online_lse(m, l, s):
    """One step of a running log2-sum-exp2, element-wise: (m, l) -> (m', l') with m' + log2(l') = log2(2^(m + log2 l)
    + 2^s). Start from m = -inf, l = 0; the result is m + log2(l)."""
    m_new = tl.maximum(m, s)
    return m_new, l * tl.exp2(m - m_new) + tl.exp2(s - m_new)


@triton.jit
def online_lse_rows(m, l, s):
    """One column tile of a running per-row log2-sum-exp2: m, l [BI]; s [BI, BJ] (-inf where a column is absent).
    Rows whose columns so far are all -inf keep m = -inf, l = 0 (no NaN)."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)


@triton.jit
def store_row_stats(row_loss_ptr, row_hits_ptr, b, offs_i, N, loss, correct, selected):
    """Write per-row sums into the buffers of row_stats(): loss [B, N] fp32, hits [B, N, 2] int32."""
    rows = b.to(tl.int64) * N + offs_i
    in_i = offs_i < N
    tl.store(row_loss_ptr + rows, loss, mask=in_i)
    tl.store(row_hits_ptr + 2 * rows, correct, mask=in_i)
    tl.store(row_hits_ptr + 2 * rows + 1, selected, mask=in_i)
