"""Triton kernels for ``masked_patch_embed``: patchify + linear embed of the kept patches only + pos-embed.

Math (``M = B*K`` token rows, ``E = C*p*p``, patch ``n`` at grid row ``n // S_w``, column ``n % S_w``):

    tokens[b, k, :] = weight @ patch(b, keep_idx[b, k]) + bias + pos_embed[pos_idx[b, k]]     [B, K, D]
    patch(b, n)[c*p*p + i*p + j] = images[b, c, (n // S_w)*p + i, (n % S_w)*p + j]

Kernels (flash-style: the gathered-patch matrix [M, E] is never written; every kernel gathers the
pixels of its tile straight from ``images`` through ``keep_idx``):

    _mpe_forward_kernel        tokens = gather(images) @ weight^T (+ bias + pos_embed[pos_idx])
    _mpe_bwd_weight_kernel     d_weight = grad^T @ gather(images), split over M into fp32 partials
                               (summed afterwards: deterministic), d_bias fused into the same pass
    _mpe_bwd_images_kernel     d_images[kept pixels] += grad @ weight (atomic scatter into an fp32 buffer:
                               exact and deterministic unless a row repeats a keep_idx)
    _mpe_segment_sum_kernel    d_pos_embed[l] = sum of grad rows with pos_idx == l over a stable sort of
                               pos_idx (CSR segments): deterministic, no atomics; also d_bias alone

Accumulation is fp32 everywhere. fp16/bf16 dots run on tensor cores; fp32 dots are IEEE when
``torch.get_float32_matmul_precision() == "highest"``, TF32 otherwise.
"""
import torch
import triton
import triton.language as tl

from . import AotSpec

# ---------------------------------------------------------------------------------------------------
# Launch parameters: one table per kernel, keyed by dtype. The launchers and AOT_SPECS both read them.
# Chosen so that every variant compiles with 0 spills on sm_80 and sm_90 (python -m vitfast.compile_check).
# ---------------------------------------------------------------------------------------------------
_HALF = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)
FORWARD_CONFIG = {
    torch.float32: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2),
    torch.float16: _HALF,
    torch.bfloat16: _HALF,
}
_HALF = dict(BLOCK_D=128, BLOCK_E=64, BLOCK_M=32, num_warps=8, num_stages=3)
BWD_WEIGHT_CONFIG = {
    torch.float32: dict(BLOCK_D=64, BLOCK_E=64, BLOCK_M=32, num_warps=4, num_stages=1),
    torch.float16: _HALF,
    torch.bfloat16: _HALF,
}
_HALF = dict(BLOCK_M=64, BLOCK_E=64, BLOCK_D=32, num_warps=4, num_stages=3)
BWD_IMAGES_CONFIG = {
    torch.float32: dict(BLOCK_M=64, BLOCK_E=64, BLOCK_D=32, num_warps=8, num_stages=2),
    torch.float16: _HALF,
    torch.bfloat16: _HALF,
}
_HALF = dict(BLOCK_R=32, BLOCK_D=128, num_warps=4, num_stages=1)
SEGMENT_SUM_CONFIG = {
    torch.float32: _HALF,
    torch.float16: _HALF,
    torch.bfloat16: _HALF,
}
del _HALF


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
    # Axis 0 walks D so that neighbouring programs share one gathered [BLOCK_M, E] strip through L2.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
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
def _mpe_bwd_weight_kernel(
    grad_ptr, images_ptr, keep_idx_ptr, dweight_ptr, dbias_ptr,
    M, K, D, E, W, HW, CHW, S_w, ROWS_PER_SPLIT,
    PATCH: tl.constexpr, HAS_DBIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # dweight_ptr: fp32 [SPLIT, D, E] partials; dbias_ptr: fp32 [SPLIT, D] partials.
    pid_e = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e < E
    col_off = _patch_col_offsets(e, W, HW, PATCH)

    acc = tl.zeros((BLOCK_D, BLOCK_E), dtype=tl.float32)
    db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    m_start = split * ROWS_PER_SPLIT
    m_end = tl.minimum(M, m_start + ROWS_PER_SPLIT)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < m_end
        g = tl.load(grad_ptr + rows.to(tl.int64)[None, :] * D + d[:, None],
                    mask=d_mask[:, None] & row_mask[None, :], other=0.0)
        row_off = _patch_row_offsets(keep_idx_ptr, rows, row_mask, K, W, CHW, S_w, PATCH)
        a = tl.load(images_ptr + row_off[:, None] + col_off[None, :],
                    mask=row_mask[:, None] & e_mask[None, :], other=0.0)
        acc = tl.dot(g, a, acc, input_precision=INPUT_PRECISION)
        if HAS_DBIAS:
            # Costs 1/(2*BLOCK_E) of the dot; only the pid_e == 0 column of programs stores it.
            db += tl.sum(g.to(tl.float32), axis=1)

    ws = dweight_ptr + split.to(tl.int64) * D * E
    tl.store(ws + d[:, None] * E + e[None, :], acc, mask=d_mask[:, None] & e_mask[None, :])
    if HAS_DBIAS:
        if pid_e == 0:
            tl.store(dbias_ptr + split * D + d, db, mask=d_mask)


@triton.jit
def _mpe_bwd_images_kernel(
    grad_ptr, weight_ptr, keep_idx_ptr, dimages_ptr,
    M, K, D, E, W, HW, CHW, S_w,
    PATCH: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # dimages_ptr: fp32 [B, C, H, W], zero-filled; only kept pixels are touched.
    pid_e = tl.program_id(0)
    pid_m = tl.program_id(1)
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


@triton.jit
def _mpe_segment_sum_kernel(
    grad_ptr, order_ptr, seg_start_ptr, out_ptr, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # out[l, :] = sum_{r in [seg_start[l], seg_start[l+1])} grad[order[r], :], summed in a fixed order.
    seg = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_mask = r < end
        src = tl.load(order_ptr + r, mask=r_mask, other=0)
        acc += tl.load(grad_ptr + src[:, None] * D + d[None, :],
                       mask=r_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr + seg.to(tl.int64) * D + d, total.to(out_ptr.dtype.element_ty), mask=d_mask)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------
def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # fp32 at "high"/"medium"; ignored for fp16/bf16, which always use tensor cores


def _num_programs_target(device: torch.device) -> int:
    """About two waves of programs: enough to fill the GPU without large split workspaces."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs keep it fast


def _geometry(images: torch.Tensor, keep_idx: torch.Tensor, patch_size: int) -> dict:
    _, C, H, W = images.shape
    return dict(K=keep_idx.shape[1], W=W, HW=H * W, CHW=C * H * W, S_w=W // patch_size)


def masked_patch_embed_forward(images, weight, bias, pos_embed, keep_idx, pos_idx, patch_size: int) -> torch.Tensor:
    """tokens [B, K, D] from images [B, C, H, W], weight [D, C*p*p], bias [D]?, pos_embed [L, D]?,
    keep_idx / pos_idx [B, K] int64. Inputs are validated and contiguous; output dtype = images dtype."""
    B, K = keep_idx.shape
    D, E = weight.shape
    M = B * K
    out = torch.empty((B, K, D), device=images.device, dtype=images.dtype)
    if M == 0 or D == 0:
        return out
    cfg = FORWARD_CONFIG[images.dtype]
    grid = (triton.cdiv(D, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]))
    _mpe_forward_kernel[grid](
        images, weight, bias if bias is not None else weight, pos_embed if pos_embed is not None else weight,
        keep_idx, pos_idx, out,
        M, D=D, E=E, **_geometry(images, keep_idx, patch_size),
        PATCH=patch_size, HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None,
        INPUT_PRECISION=_input_precision(images.dtype), **cfg,
    )
    return out


def masked_patch_embed_backward(grad_tokens, images, weight, keep_idx, pos_idx, patch_size: int, num_positions: int,
                                output_mask) -> tuple:
    """(d_images [B,C,H,W], d_weight [D,E], d_bias [D], d_pos_embed [num_positions, D]); None where
    output_mask is False. Gradients come in the dtype of the input they belong to."""
    want_images, want_weight, want_bias, want_pos = (bool(x) for x in output_mask)
    B, K = keep_idx.shape
    D, E = weight.shape
    M = B * K
    device, dtype = images.device, images.dtype
    geometry = _geometry(images, keep_idx, patch_size)
    precision = _input_precision(dtype)
    grad_tokens = grad_tokens.contiguous()
    d_images = d_weight = d_bias = d_pos = None

    if want_images:
        # fp32 buffer so that duplicates in keep_idx accumulate in fp32 (and atomics exist for every dtype).
        buf = torch.zeros(images.shape, device=device, dtype=torch.float32)
        if M > 0:
            cfg = BWD_IMAGES_CONFIG[dtype]
            grid = (triton.cdiv(E, cfg["BLOCK_E"]), triton.cdiv(M, cfg["BLOCK_M"]))
            _mpe_bwd_images_kernel[grid](
                grad_tokens, weight, keep_idx, buf, M, D=D, E=E, **geometry,
                PATCH=patch_size, INPUT_PRECISION=precision, **cfg,
            )
        d_images = buf if dtype == torch.float32 else buf.to(dtype)

    if want_weight:
        cfg = BWD_WEIGHT_CONFIG[dtype]
        tiles = triton.cdiv(D, cfg["BLOCK_D"]) * triton.cdiv(E, cfg["BLOCK_E"])
        m_blocks = max(1, triton.cdiv(M, cfg["BLOCK_M"]))
        # Split the rows so that about two waves of programs run; each split writes its own fp32 partial.
        wanted = max(1, min(m_blocks, triton.cdiv(_num_programs_target(device), tiles)))
        blocks_per_split = triton.cdiv(m_blocks, wanted)
        split = triton.cdiv(m_blocks, blocks_per_split)
        dw_ws = torch.empty((split, D, E), device=device, dtype=torch.float32)
        db_ws = torch.empty((split, D), device=device, dtype=torch.float32) if want_bias else dw_ws
        grid = (triton.cdiv(E, cfg["BLOCK_E"]), triton.cdiv(D, cfg["BLOCK_D"]), split)
        _mpe_bwd_weight_kernel[grid](
            grad_tokens, images, keep_idx, dw_ws, db_ws, M, D=D, E=E, **geometry,
            ROWS_PER_SPLIT=blocks_per_split * cfg["BLOCK_M"],
            PATCH=patch_size, HAS_DBIAS=want_bias, INPUT_PRECISION=precision, **cfg,
        )
        d_weight = (dw_ws[0] if split == 1 else dw_ws.sum(0)).to(weight.dtype)
        if want_bias:
            d_bias = (db_ws[0] if split == 1 else db_ws.sum(0)).to(weight.dtype)

    if want_bias and d_bias is None:
        # d_weight not wanted (rare): d_bias is one segment holding every row, in order.
        order = torch.arange(M, device=device, dtype=torch.int64)
        seg_start = torch.full((2,), M, device=device, dtype=torch.int64)
        seg_start[0] = 0
        d_bias = _segment_sum(grad_tokens, order, seg_start, 1, D, weight.dtype).view(D)

    if want_pos:
        flat = pos_idx.reshape(-1)
        # Stable sort -> CSR segments per position: a fixed summation order, no float atomics.
        sorted_pos, order = torch.sort(flat, stable=True)
        seg_start = torch.searchsorted(sorted_pos, torch.arange(num_positions + 1, device=device, dtype=torch.int64))
        d_pos = _segment_sum(grad_tokens, order, seg_start, num_positions, D, weight.dtype)

    return d_images, d_weight, d_bias, d_pos


def _segment_sum(grad_tokens, order, seg_start, num_segments: int, D: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty((num_segments, D), device=grad_tokens.device, dtype=dtype)
    if num_segments == 0 or D == 0:
        return out
    cfg = SEGMENT_SUM_CONFIG[grad_tokens.dtype]
    grid = (num_segments, triton.cdiv(D, cfg["BLOCK_D"]))
    _mpe_segment_sum_kernel[grid](grad_tokens, order, seg_start, out, D, **cfg)
    return out


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (walked by vitfast.compile_check)
# ---------------------------------------------------------------------------------------------------
_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_GEOMETRY_ARGS = ("M", "K", "D", "E", "W", "HW", "CHW", "S_w")


def _signature(kernel, pointers: dict, ints=()) -> dict:
    """Signature in argument order: pointers by name, the listed i32 scalars, everything else constexpr."""
    sig = {}
    for name in kernel.arg_names:
        if name in pointers:
            sig[name] = "*" + pointers[name]
        elif name in ints:
            sig[name] = "i32"
        else:
            sig[name] = "constexpr"
    return sig


def _launch(cfg: dict) -> tuple:
    blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
    return blocks, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _aot_specs() -> list:
    specs = []
    # Pointers and the sizes that are multiples of 16 in every ViT (D, E for p >= 4, image sides 32/64/224).
    # fp32 runs IEEE (torch's default precision "highest") or TF32 ("high"); p=16 is ViT-B/16, p=4 the
    # small-data ViTs, where a patch row is only 4 pixels long and the gather is least vectorised.
    variants = [(torch.float32, "ieee", 16), (torch.float32, "tf32", 16), (torch.float16, "tf32", 4),
                (torch.float16, "tf32", 16), (torch.bfloat16, "tf32", 16)]
    for dtype, precision, patch in variants:
        ty = _TRITON_DTYPE[dtype]
        half = precision == "tf32"  # tensor cores: fp16/bf16 always, fp32 only as TF32
        label = f"{ty}{'-tf32' if dtype == torch.float32 and half else ''} p={patch}"
        blocks, launch = _launch(FORWARD_CONFIG[dtype])
        fn = _mpe_forward_kernel
        specs.append(AotSpec(
            fn, _signature(fn, dict(images_ptr=ty, weight_ptr=ty, bias_ptr=ty, pos_embed_ptr=ty,
                                    keep_idx_ptr="i64", pos_idx_ptr="i64", out_ptr=ty), _GEOMETRY_ARGS),
            dict(PATCH=patch, HAS_BIAS=True, HAS_POS=True, INPUT_PRECISION=precision, **blocks),
            variant=label, tensor_cores=half, **launch,
            aligned=("images_ptr", "weight_ptr", "bias_ptr", "pos_embed_ptr", "keep_idx_ptr", "pos_idx_ptr",
                     "out_ptr", "D", "E", "W", "HW", "CHW")))
        blocks, launch = _launch(BWD_WEIGHT_CONFIG[dtype])
        fn = _mpe_bwd_weight_kernel
        specs.append(AotSpec(
            fn, _signature(fn, dict(grad_ptr=ty, images_ptr=ty, keep_idx_ptr="i64", dweight_ptr="fp32",
                                    dbias_ptr="fp32"), _GEOMETRY_ARGS + ("ROWS_PER_SPLIT",)),
            dict(PATCH=patch, HAS_DBIAS=True, INPUT_PRECISION=precision, **blocks),
            variant=label, tensor_cores=half, **launch,
            aligned=("grad_ptr", "images_ptr", "keep_idx_ptr", "dweight_ptr", "dbias_ptr", "D", "E", "W", "HW",
                     "CHW", "ROWS_PER_SPLIT")))
        blocks, launch = _launch(BWD_IMAGES_CONFIG[dtype])
        fn = _mpe_bwd_images_kernel
        specs.append(AotSpec(
            fn, _signature(fn, dict(grad_ptr=ty, weight_ptr=ty, keep_idx_ptr="i64", dimages_ptr="fp32"),
                           _GEOMETRY_ARGS),
            dict(PATCH=patch, INPUT_PRECISION=precision, **blocks),
            variant=label, tensor_cores=half, **launch,
            aligned=("grad_ptr", "weight_ptr", "keep_idx_ptr", "dimages_ptr", "D", "E", "W", "HW", "CHW")))
    for dtype, ty in _TRITON_DTYPE.items():
        blocks, launch = _launch(SEGMENT_SUM_CONFIG[dtype])
        fn = _mpe_segment_sum_kernel
        specs.append(AotSpec(
            fn, _signature(fn, dict(grad_ptr=ty, order_ptr="i64", seg_start_ptr="i64", out_ptr=ty), ("D",)),
            dict(**blocks), variant=ty, **launch,
            aligned=("grad_ptr", "order_ptr", "seg_start_ptr", "out_ptr", "D")))
    return specs


AOT_SPECS = _aot_specs()
