"""Every split and partial path of the CPU kernels (csrc/cpu/*.cpp) that the per-op test files do not reach: one
small test per path, CPU backend against the float64 reference. Each test names the branch it covers and, where the
path depends on a size rule of the kernel (tile rows, blocks), asserts that its shape lands on that path.

Paths covered elsewhere (not repeated here): relation_loss single tile, fp32 multi-tile with a ragged last tile,
(b, tile) dK partials vs whole batch elements at 1 and 2 threads, the at::addmm_out GEMM in fp32, explicit targets
in one tile, q-only / k-only gradients in one tile, empty pair mask (test_relation_loss.py); relation_mlp_loss both
tasks x activations in fp32/fp16/bf16/fp64, shared and batched masks, 8-lane dot with a tail
(test_relation_mlp_loss.py);
masked_pixel_loss two blocks with a tail, unmasked-patch skip, norm_pix on/off, mixed dtypes, batch-strided pred
(test_masked_pixel_loss.py); masked_patch_embed several image tiles with a tail, weight-only gradient
(test_masked_patch_embed.py).
Not coverable here: of the per-target clones of the fp32 passes (VITFAST_SIMD_CLONES: x86-64-v4 / v3 / baseline) only
the one this CPU selects at load time runs.

Cost: a few seconds on 2 cores.
"""
import pytest
import torch

from vitfast.ops import (masked_patch_embed, masked_patch_embed_reference, masked_pixel_loss,
                         masked_pixel_loss_reference, relation_loss, relation_loss_reference, relation_mlp_loss,
                         relation_mlp_loss_reference)
from vitfast.ops.relation_loss import BACKENDS

pytestmark = pytest.mark.skipif(not BACKENDS.runs_on("cpu", torch.device("cpu")), reason="vitfast._C is not built")

TILE_BYTES = 512 * 1024  # relation_loss.cpp kTileBytes
PIXEL_BLOCK = 64  # masked_pixel_loss.cpp kPatchesPerBlock
EMBED_TILE_ROWS = 128  # masked_patch_embed.cpp kTileRows


def relation_tiles(n, classes, element_size):
    """(rows per tile, tiles) as relation_loss.cpp chooses them: logits of a tile within TILE_BYTES, >= 8 rows."""
    max_rows = max(8, TILE_BYTES // (classes * n * element_size))
    count = -(-n // max_rows)
    rows = -(-n // count)
    return rows, -(-n // rows)


@pytest.fixture
def threads():
    """threads(n) sets torch's intra-op thread count for the test; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# ---- relation_loss.cpp ------------------------------------------------------------------------------------------

def relation_inputs(batch, n, classes, d_h, dtype, *, side=None, targets=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, n, classes, d_h, generator=gen, dtype=torch.float64) * 1.5).to(dtype)
    k = (torch.randn(batch, n, classes, d_h, generator=gen, dtype=torch.float64) * 1.5).to(dtype)
    if targets:
        kwargs = dict(targets=torch.randint(0, classes, (batch, n, n), generator=gen))
    else:
        positions = torch.stack([torch.randperm(side * side, generator=gen)[:n] for _ in range(batch)])
        kwargs = dict(positions=positions, grid_size=side)
    return q, k, kwargs


def check_relation(q, k, kwargs, dtype, assert_close, need=(True, True)):
    """CPU loss and the asked-for gradients of the pair *sum* (O(1) values) against the float64 reference."""
    inputs = [t.clone().requires_grad_(wanted) for t, wanted in zip((q, k), need)]
    positions = kwargs.get("positions")
    rest = {key: value for key, value in kwargs.items() if key != "positions"}
    loss = relation_loss(*inputs, positions, backend="cpu", **rest)
    leaves = [t.double().requires_grad_(wanted) for t, wanted in zip((q, k), need)]
    want = relation_loss_reference(*leaves, positions, **rest)
    mask = kwargs.get("pair_mask")
    pairs = float(q.shape[0] * q.shape[1] ** 2 if mask is None else mask.expand(q.shape[0], -1, -1).sum())
    assert_close(loss.detach(), want.detach(), dtype, "cpu/loss", op="relation_loss")
    got = torch.autograd.grad(loss, [t for t in inputs if t.requires_grad], torch.tensor(pairs, dtype=loss.dtype))
    expected = torch.autograd.grad(want, [t for t in leaves if t.requires_grad],
                                   torch.tensor(pairs, dtype=torch.float64))
    for name, a, b in zip([n for n, wanted in zip(("d_q", "d_k"), need) if wanted], got, expected):
        assert a.dtype == dtype
        assert_close(a, b, dtype, f"cpu/{name}", op="relation_loss")


@pytest.mark.parametrize("batch", [1, 2], ids=["b-tile-partials", "whole-batches-accumulate"])
def test_relation_loss_float64_tiles(batch, threads, assert_close):
    """Branch: fp64 tile sizing (8-byte logits: other tile rows than fp32) with a ragged last tile, through the
    dgemm path; backward at 2 threads with B = 1 < threads -> (b, tile) items with dK partials summed in order;
    B = 2 >= threads -> whole batch elements, dK accumulated in place over tiles (beta = 1 after the first)."""
    threads(2)
    assert relation_tiles(101, 9, 8) == (51, 2)
    q, k, kwargs = relation_inputs(batch, 101, 9, 6, torch.float64, side=11)
    check_relation(q, k, kwargs, torch.float64, assert_close)


def test_relation_loss_eight_row_floor_and_one_row_tail(threads, assert_close):
    """Branch: a tile's logits above TILE_BYTES even at 8 rows (C = 64 explicit-target classes, N = 257) -> the
    8-row floor, 33 tiles, the last one a single row; explicit targets over many tiles, label smoothing with C = 64."""
    threads(2)
    assert relation_tiles(257, 64, 4) == (8, 33)
    q, k, kwargs = relation_inputs(1, 257, 64, 2, torch.float32, targets=True, seed=1)
    check_relation(q, k, dict(kwargs, label_smoothing=0.2), torch.float32, assert_close)


def test_relation_loss_rows_without_selected_pairs(threads, assert_close):
    """Branch: a query row with no selected pair is skipped in the forward (row sums 0) and its dS rows are zero-filled
    in the backward, in both tiles (N = 130: tiles of 65 rows), with a batched [B, N, N] mask."""
    threads(2)
    assert relation_tiles(130, 9, 4) == (65, 2)
    q, k, kwargs = relation_inputs(2, 130, 9, 8, torch.float32, side=12, seed=2)
    mask = torch.rand(2, 130, 130, generator=torch.Generator().manual_seed(3)) < 0.5
    mask[0, :10] = False  # first rows of the first tile
    mask[0, 70:75] = False  # rows inside the second tile
    mask[1, 129] = False  # the last row
    check_relation(q, k, dict(kwargs, pair_mask=mask), torch.float32, assert_close)


@pytest.mark.parametrize("need", [(True, False), (False, True)], ids=["q-only", "k-only"])
def test_relation_loss_one_gradient_with_partials(need, threads, assert_close):
    """Branch: the (b, tile) backward (B = 1 < 2 threads, 2 tiles) asked for dQ only (no dK partial buffer, no dK
    GEMM) or dK only (no dQ GEMM)."""
    threads(2)
    assert relation_tiles(130, 9, 4)[1] == 2
    q, k, kwargs = relation_inputs(1, 130, 9, 8, torch.float32, side=12, seed=4)
    check_relation(q, k, kwargs, torch.float32, assert_close, need=need)


def aten_mm_calls(fn):
    """How many aten::addmm calls fn() makes (gemm()'s at::addmm_out path shows up as aten::addmm; the BLAS path
    makes none)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return sum(event.count for event in profile.key_averages() if event.key == "aten::addmm")


def test_relation_loss_aten_gemm_float64(monkeypatch, threads, assert_close):
    """Branch: gemm() through at::addmm_out (VITFAST_CPU_GEMM=aten, the path of builds without dgemm_) in fp64, both
    transposed operands (S = Q K^T, dK = dS^T Q), over two tiles with dK partials (B = 1 < 2 threads). The profiler
    shows that the switch took: addmm calls with it, none through the BLAS."""
    threads(2)
    q, k, kwargs = relation_inputs(1, 101, 9, 6, torch.float64, side=11, seed=5)
    q.requires_grad_(), k.requires_grad_()
    rest = {key: value for key, value in kwargs.items() if key != "positions"}
    run = lambda: torch.autograd.grad(relation_loss(q, k, kwargs["positions"], backend="cpu", **rest), (q, k))
    assert aten_mm_calls(run) == 0
    monkeypatch.setenv("VITFAST_CPU_GEMM", "aten")
    assert aten_mm_calls(run) > 0
    check_relation(q.detach(), k.detach(), kwargs, torch.float64, assert_close)


# ---- relation_mlp_loss.cpp ----------------------------------------------------------------------------------------

def mlp_inputs(batch, n, hidden, side, dtype, task="direction", scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    outputs = 9 if task == "direction" else 2
    u = torch.randn(batch, n, hidden, generator=gen, dtype=torch.float64) * scale
    v = torch.randn(batch, n, hidden, generator=gen, dtype=torch.float64) * scale
    weight = torch.randn(outputs, hidden, generator=gen, dtype=torch.float64) / hidden ** 0.5
    bias = torch.randn(outputs, generator=gen, dtype=torch.float64) * 0.1
    positions = torch.stack([torch.randperm(side * side, generator=gen)[:n] for _ in range(batch)])
    return [t.to(dtype) for t in (u, v, weight, bias)], dict(positions=positions, grid_size=side, task=task)


def check_mlp(inputs, kwargs, dtype, assert_close):
    leaves = [t.clone().requires_grad_() for t in inputs]
    loss = relation_mlp_loss(*leaves, backend="cpu", **kwargs)
    ref_leaves = [t.double().requires_grad_() for t in inputs]
    want = relation_mlp_loss_reference(*ref_leaves, **kwargs)
    batch, n = inputs[0].shape[:2]
    mask = kwargs.get("pair_mask")
    pairs = float(batch * n * n if mask is None else mask.expand(batch, n, n).sum())
    assert_close(loss.detach(), want.detach(), dtype, "cpu/loss", op="relation_mlp_loss")
    got = torch.autograd.grad(loss, leaves, torch.tensor(pairs, dtype=loss.dtype))
    expected = torch.autograd.grad(want, ref_leaves, torch.tensor(pairs, dtype=torch.float64))
    for name, a, b in zip(("d_u", "d_v", "d_weight", "d_bias"), got, expected):
        assert_close(a, b, dtype, f"cpu/{name}", op="relation_mlp_loss")


def test_mlp_gelu_saturated_preactivations(assert_close):
    """Branch: the fp32 GELU's exp_nonpositive out of range (-x^2/2 < -87, i.e. |x| > 13.2: masked to 0 without a
    branch) and erf saturated at +-1, in the forward and in the slope of the backward."""
    inputs, kwargs = mlp_inputs(2, 12, 10, 4, torch.float32, scale=12.0, seed=6)
    pre = inputs[0][:, :, None, :] + inputs[1][:, None, :, :]
    assert (pre.abs() > 13.2).float().mean() > 0.2 and (pre.abs() < 3).any()
    check_mlp(inputs, kwargs, torch.float32, assert_close)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_mlp_relu_kink_at_zero(dtype, assert_close):
    """Branch: ReLU pre-activations exactly 0 (u_ik + v_jk == 0 for half the hidden units): slope 0 there, as
    autograd's relu, in the per-target fp32 loop and the fp64 template."""
    inputs, kwargs = mlp_inputs(2, 9, 8, 3, dtype, seed=7)
    inputs[0][..., :4] = 0.0
    inputs[1][..., :4] = 0.0
    check_mlp(inputs, dict(kwargs, activation="relu"), dtype, assert_close)


def test_mlp_offset_single_cell_grid_gradients(assert_close):
    """Branch: the offset task on a 1 x 1 grid (offset scale 1 / max(S - 1, 1): every target offset is 0), backward
    included, with N = 1 (the 8-lane dot runs its tail only)."""
    inputs, kwargs = mlp_inputs(3, 1, 6, 1, torch.float32, task="offset", seed=8)
    check_mlp(inputs, kwargs, torch.float32, assert_close)


def test_mlp_fewer_tokens_than_dot_lanes(assert_close):
    """Branch: N = 5 < 8 lanes: dot() runs its tail loop only; direction task with a shared [N, N] mask."""
    inputs, kwargs = mlp_inputs(2, 5, 7, 3, torch.float32, seed=9)
    mask = torch.rand(5, 5, generator=torch.Generator().manual_seed(10)) < 0.7
    check_mlp(inputs, dict(kwargs, pair_mask=mask, label_smoothing=0.1), torch.float32, assert_close)


# ---- masked_pixel_loss.cpp ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm_pix", "raw"])
def test_pixel_loss_float64_blocks_with_tail(norm_pix, threads, assert_close):
    """Branch: fp64 (accumulation in double) over 130 patches = 2 full blocks of 64 + a 2-patch tail block, blocks
    split over 1 and 2 threads (the loss is the same bits: block sums added in order)."""
    gen = torch.Generator().manual_seed(11)
    batch, num_patches, patch = 2, 65, 2
    assert batch * num_patches % PIXEL_BLOCK == 2
    images = torch.randn(batch, 3, 10, 26, generator=gen, dtype=torch.float64) * 2 + 3
    pred = torch.randn(batch, num_patches, 12, generator=gen, dtype=torch.float64)
    mask = (torch.rand(batch, num_patches, generator=gen) < 0.75).double()
    mask[-1, -1] = 1.0  # the tail block holds a masked patch
    results = []
    for count in (1, 2):
        threads(count)
        leaf = pred.clone().requires_grad_()
        loss = masked_pixel_loss(leaf, images, mask, patch, norm_pix, backend="cpu")
        results.append((loss, *torch.autograd.grad(loss, leaf, torch.tensor(100.0, dtype=torch.float64))))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    leaf = pred.clone().requires_grad_()
    want = masked_pixel_loss_reference(leaf, images, mask, patch, norm_pix)
    (want_grad,) = torch.autograd.grad(want, leaf, torch.tensor(100.0, dtype=torch.float64))
    assert_close(results[0][0], want, torch.float64, "cpu/loss", op="masked_pixel_loss")
    assert_close(results[0][1], want_grad, torch.float64, "cpu/d_pred", op="masked_pixel_loss")


# ---- masked_patch_embed.cpp ---------------------------------------------------------------------------------------

def embed_inputs(batch, kept, dim=8, seed=12):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 2, 8, 8, generator=gen)
    weight, bias = torch.randn(dim, 2, 2, 2, generator=gen), torch.randn(dim, generator=gen)
    pos_embed = torch.randn(16, dim, generator=gen)
    keep_idx = torch.randint(0, 16, (batch, kept), generator=gen)  # duplicates: gradients accumulate
    pos_idx = torch.randint(0, 16, (batch, kept), generator=gen)
    return [images, weight, bias, pos_embed], keep_idx, pos_idx


def check_embed(tensors, keep_idx, pos_idx, wanted, assert_close):
    """CPU tokens and the gradients flagged in `wanted` (images, weight, bias, pos_embed) against float64."""
    leaves = [t.clone().requires_grad_(w) for t, w in zip(tensors, wanted)]
    out = masked_patch_embed(*leaves, keep_idx, pos_idx, backend="cpu")
    ref_leaves = [t.double().requires_grad_(w) for t, w in zip(tensors, wanted)]
    want = masked_patch_embed_reference(*ref_leaves, keep_idx, pos_idx)
    assert_close(out.detach(), want.detach(), torch.float32, "cpu/tokens", op="masked_patch_embed")
    if out.numel() == 0:
        return
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(13))
    got = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad)
    expected = torch.autograd.grad(want, [t for t in ref_leaves if t.requires_grad], grad.double())
    names = [n for n, w in zip(("images", "weight", "bias", "pos_embed"), wanted) if w]
    for name, a, b in zip(names, got, expected):
        assert_close(a, b, torch.float32, f"cpu/{name}", op="masked_patch_embed")


def test_embed_more_kept_than_tile_rows(threads, assert_close):
    """Branch: K = 130 > kTileRows = 128 -> one image per tile (images_per_tile's floor of 1), three tiles over two
    threads, forward and every gradient."""
    threads(2)
    assert max(1, EMBED_TILE_ROWS // 130) == 1
    tensors, keep_idx, pos_idx = embed_inputs(3, 130)
    check_embed(tensors, keep_idx, pos_idx, (True, True, True, True), assert_close)


def test_embed_images_gradient_only(threads, assert_close):
    """Branch: backward with d_images only (weight frozen): no gathered tile, no per-thread dW partials, only the
    scatter-add of g @ W, over several tiles (B = 17, K = 9: 14 images per tile, a 3-image tail)."""
    threads(2)
    assert EMBED_TILE_ROWS // 9 == 14
    tensors, keep_idx, pos_idx = embed_inputs(17, 9)
    check_embed(tensors, keep_idx, pos_idx, (True, False, False, False), assert_close)


def test_embed_bias_and_pos_gradients_only(assert_close):
    """Branch: neither d_images nor d_weight asked for: the backward returns after d_bias and d_pos_embed (duplicate
    positions accumulate through index_add_)."""
    tensors, keep_idx, pos_idx = embed_inputs(3, 7)
    pos_idx[0, 1] = pos_idx[0, 0]
    check_embed(tensors, keep_idx, pos_idx, (False, False, True, True), assert_close)


def test_embed_no_kept_tokens(assert_close):
    """Branch: K = 0 -> an empty [B, 0, D] result (the forward returns before any tile); every gradient is zero."""
    tensors, keep_idx, pos_idx = embed_inputs(2, 0)
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = masked_patch_embed(*leaves, keep_idx, pos_idx, backend="cpu")
    assert out.shape == (2, 0, 8)
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)
