"""contrastive_loss CPU kernel (csrc/cpu/contrastive_loss.cpp): the paths that depend on its tile and group rules,
against the float64 kernel-level reference. test_contrastive_loss.py holds every backend, this one included, to the
reference over the positive modes at small shapes; here: several anchor tiles and pool tiles with ragged tails, the
anchor's own column in every position of a pool tile, the backward's d_pool group partials and their thread-count
independence (bitwise), fp16/bf16 widening, logits far beyond exp's range, anchors without positives next to ones with,
one-sided gradients, and the at::addmm_out GEMM path; then the same for the symmetric path (pool equal to the anchors,
tile pairs I <= J) and its agreement with the general path.

Cost: about 20 s on 2 cores (the largest case is 600 anchors x 1100 pool rows).
"""
import pytest
import torch

from vitfast.ops import contrastive_loss, contrastive_loss_reference
from vitfast.ops.contrastive_loss import BACKENDS, _reference_backward, _reference_forward

pytestmark = pytest.mark.skipif(not BACKENDS.runs_on("cpu", torch.device("cpu")), reason="vitfast._C is not built")

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
ANCHOR_ROWS, POOL_COLUMNS, POOL_GROUPS = 256, 512, 4  # contrastive_loss.cpp kAnchorRows, kPoolColumns, kPoolGroups
SQUARE_TILE = 256  # contrastive_loss.cpp kSquareTile (the symmetric path: pool equal to the anchors)


def anchor_tiles(rows):
    """Number of anchor tiles (common.h balanced_row_tiles(rows, kAnchorRows))."""
    count = -(-rows // ANCHOR_ROWS)
    per = -(-rows // count)
    return -(-rows // per)


@pytest.fixture
def threads():
    """threads(n) sets torch's intra-op thread count for the test; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def kernel_inputs(a, m, d, dtype, *, classes=None, self_every=1, scale=1.0, seed=0, symmetric=False):
    """(anchors [a, d], pool [m, d], anchor_labels, pool_labels, anchor_self): unit rows times `scale`; labels from
    `classes` classes (None: pool row i has label i, anchor r label r % m as InfoNCE); anchor r's own pool row is
    (r * 7) % m for every `self_every`-th anchor, else -1. symmetric: the pool is a copy of the anchors (a == m), the
    kernel's symmetric path."""
    gen = torch.Generator().manual_seed(seed)
    anchors = torch.nn.functional.normalize(torch.randn(a, d, generator=gen, dtype=F64), dim=1) * scale
    pool = torch.nn.functional.normalize(torch.randn(m, d, generator=gen, dtype=F64), dim=1) * scale
    if symmetric:
        assert a == m
        pool = anchors.clone()
    if classes is None:
        pool_labels, anchor_labels = torch.arange(m), torch.arange(a) % m
    else:
        pool_labels, anchor_labels = (torch.randint(0, classes, (n,), generator=gen) for n in (m, a))
    rows = torch.arange(a)
    anchor_self = torch.where(rows % self_every == 0, (rows * 7) % m, -1)
    return anchors.to(dtype), pool.to(dtype), anchor_labels, pool_labels, anchor_self


def run_cpu(inputs, inv_temperature, loss_scale, output_mask=(True, True), grad=1.0):
    anchors, pool = inputs[:2]
    loss, lse, count = torch.ops.vitfast_C.contrastive_loss_forward(*inputs, inv_temperature, loss_scale)
    grad_loss = torch.tensor(grad, dtype=loss.dtype)
    grads = torch.ops.vitfast_C.contrastive_loss_backward(grad_loss, *inputs, lse, count, inv_temperature, loss_scale,
                                                          list(output_mask))
    return loss, lse, count, grads


def run_reference(inputs, inv_temperature, loss_scale, grad=1.0):
    wide = [inputs[0].double(), inputs[1].double(), *inputs[2:]]
    loss, lse, count = _reference_forward(*wide, inv_temperature, loss_scale)
    grads = _reference_backward(torch.tensor(grad, dtype=F64), *wide, lse, count, inv_temperature, loss_scale,
                                [True, True])
    return loss, lse, count, grads


def check(inputs, dtype, assert_close, inv_temperature=5.0, output_mask=(True, True)):
    """Loss, lse, count and the asked-for gradients of the CPU kernel against the float64 reference. loss_scale = 1
    (a sum over anchors) keeps the gradients O(1) per row."""
    loss, lse, count, grads = run_cpu(inputs, inv_temperature, 1.0, output_mask)
    want_loss, want_lse, want_count, want_grads = run_reference(inputs, inv_temperature, 1.0)
    assert loss.dtype == lse.dtype == (F64 if dtype == F64 else F32) and count.dtype == torch.int32
    assert torch.equal(count, want_count)
    assert torch.isfinite(loss) and torch.isfinite(lse).all()
    assert_close(loss, want_loss, dtype, "cpu/loss")
    assert_close(lse, want_lse, dtype, "cpu/lse")
    for name, got, want, needed, like in zip(("d_anchors", "d_pool"), grads, want_grads, output_mask, inputs[:2]):
        if not needed:
            assert got.numel() == 0
            continue
        assert got.dtype == dtype and got.shape == like.shape and torch.isfinite(got).all()
        assert_close(got, want, dtype, f"cpu/{name}")
    return loss, grads


@pytest.mark.parametrize("a, m, d", [(600, 1100, 40), (257, 513, 17), (3, 700, 9)])
def test_tiles_with_ragged_tails(a, m, d, assert_close):
    # 600 anchors: 3 tiles of 200 rows; 1100 pool rows: 512 + 512 + 76; 257 / 513: one row / column over a tile.
    assert anchor_tiles(a) == -(-a // ANCHOR_ROWS) and m > POOL_COLUMNS
    check(kernel_inputs(a, m, d, F32, classes=5, self_every=2), F32, assert_close)


def test_own_column_at_every_tile_position(assert_close):
    # anchor r's own column is pool row r: first, last and inner columns of both pool tiles (and one past 512).
    a = m = 530
    inputs = list(kernel_inputs(a, m, 8, F32, classes=4))
    inputs[4] = torch.arange(a)
    check(tuple(inputs), F32, assert_close)


@pytest.mark.parametrize("dtype", [F16, BF16, F64])
def test_widened_dtypes(dtype, assert_close):
    check(kernel_inputs(300, 520, 24, dtype, classes=6, self_every=3), dtype, assert_close)


@pytest.mark.parametrize("output_mask", [(True, False), (False, True)])
def test_one_sided_gradients(output_mask, assert_close):
    # Without d_pool the backward takes every anchor tile as its own work item (no groups).
    check(kernel_inputs(520, 600, 12, F32, classes=3), F32, assert_close, output_mask=output_mask)


def test_gemm_through_aten(monkeypatch, assert_close):
    monkeypatch.setenv("VITFAST_CPU_GEMM", "aten")
    check(kernel_inputs(270, 530, 10, F32, classes=4, self_every=2), F32, assert_close)


def test_no_positive_rows_add_nothing(assert_close):
    # Labels 0..9 for anchors, pool labels all 0: only label-0 anchors have positives; the rest have lse 0 and zero
    # gradient rows, also when their logits are large.
    anchors, pool, _, _, anchor_self = kernel_inputs(300, 530, 16, F32, scale=4.0)
    anchor_labels = torch.arange(300) % 10
    inputs = (anchors, pool, anchor_labels, torch.zeros(530, dtype=torch.int64), anchor_self)
    loss, lse, count, (d_anchors, _) = run_cpu(inputs, 10.0, 1.0)
    assert (count[anchor_labels != 0] == 0).all() and (count[anchor_labels == 0] > 0).all()
    assert (lse[anchor_labels != 0] == 0).all() and (d_anchors[anchor_labels != 0] == 0).all()
    check(inputs, F32, assert_close, inv_temperature=10.0)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_large_logits_stay_finite(dtype, assert_close):
    # |s| up to 2 * 2 * 50 = 200: exp of a logit above 89 overflows fp32 without the running max. Identical rows too
    # (pool row 1 equals pool row 0), so the softmax ties. (Larger logits only scale the fp32 rounding of s into the
    # softmax: the comparison would measure conditioning, not the kernel.)
    anchors, pool, anchor_labels, pool_labels, anchor_self = kernel_inputs(260, 530, 8, F32, classes=3, scale=2.0)
    pool[1] = pool[0]
    inputs = (anchors.to(dtype), pool.to(dtype), anchor_labels, pool_labels, anchor_self)
    check(inputs, dtype, assert_close, inv_temperature=50.0)


@pytest.mark.parametrize("a", [ANCHOR_ROWS * 2 + 5, ANCHOR_ROWS * 6])
def test_thread_count_does_not_change_bits(a, threads):
    # 3 (then 6) anchor tiles: fewer tiles than groups x threads, then more; every row sums in a fixed order.
    inputs = kernel_inputs(a, 600, 20, F32, classes=7, self_every=2)
    results = []
    for n in (1, 2, 3):
        threads(n)
        results.append(run_cpu(inputs, 5.0, 1.0 / a))
    for other in results[1:]:
        for x, y in zip(results[0][:3] + tuple(results[0][3]), other[:3] + tuple(other[3])):
            assert torch.equal(x, y)


def test_public_ntxent_matches_reference(assert_close):
    # The public function on the cpu backend, NT-Xent over 2 x 300 rows (3 anchor tiles, 2 pool tiles): loss and
    # gradients of q and k against the float64 reference written as SimCLR's code computes it.
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(300, 32, generator=gen) for _ in range(2))
    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
    loss = contrastive_loss(*leaves, temperature=0.2, positives="ntxent", backend="cpu")
    wide = [q.double().requires_grad_(), k.double().requires_grad_()]
    want = contrastive_loss_reference(*wide, temperature=0.2, positives="ntxent")
    assert_close(loss.detach(), want.detach(), F32, "cpu/loss")
    for got, expected in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(want, wide)):
        assert_close(got, expected, F32, "cpu/d_q")


# ---- the symmetric path (pool equal to the anchors: NT-Xent, one-process SupCon) ----------------------------------

@pytest.mark.parametrize("n, d, classes, self_every", [(600, 40, 5, 1), (257, 17, None, 2), (200, 9, 3, 1)])
def test_symmetric_tiles(n, d, classes, self_every, assert_close):
    # 600 rows: square tiles 256 + 256 + 88 (3 x 4 / 2 = 6 tile pairs, 3 diagonal); 257: one row past a tile; 200: one
    # (diagonal) tile only. The own column lands in diagonal and off-diagonal tiles (self_every / (r * 7) % n).
    check(kernel_inputs(n, n, d, F32, classes=classes, self_every=self_every, symmetric=True), F32, assert_close)


@pytest.mark.parametrize("dtype", [F16, BF16, F64])
def test_symmetric_widened_dtypes(dtype, assert_close):
    check(kernel_inputs(300, 300, 24, dtype, classes=6, symmetric=True), dtype, assert_close)


@pytest.mark.parametrize("output_mask", [(True, False), (False, True)])
def test_symmetric_one_sided_gradients(output_mask, assert_close):
    check(kernel_inputs(520, 520, 12, F32, classes=3, symmetric=True), F32, assert_close, output_mask=output_mask)


def test_symmetric_large_logits_and_rows_without_positives(assert_close):
    anchors, pool, _, _, anchor_self = kernel_inputs(300, 300, 16, F32, scale=2.0, symmetric=True)
    labels = torch.arange(300) % 150  # pairs of rows share a label ...
    labels[:40] = 1000 + torch.arange(40)  # ... except 40 singletons: no positive besides themselves
    inputs = (anchors, pool, labels, labels, torch.arange(300))
    loss, lse, count, (d_anchors, d_pool) = run_cpu(inputs, 50.0, 1.0)
    assert (count[:40] == 0).all() and (lse[:40] == 0).all() and (d_anchors[:40] == 0).all()
    check(inputs, F32, assert_close, inv_temperature=50.0)


def test_symmetric_thread_count_does_not_change_bits(threads):
    # 5 square tiles: 15 tile pairs over 4 groups (forward: per-pair partial statistics merged in block order).
    inputs = kernel_inputs(SQUARE_TILE * 4 + 30, SQUARE_TILE * 4 + 30, 20, F32, classes=7, symmetric=True)
    results = []
    for n in (1, 2, 3):
        threads(n)
        results.append(run_cpu(inputs, 5.0, 1.0 / inputs[0].shape[0]))
    for other in results[1:]:
        for x, y in zip(results[0][:3] + tuple(results[0][3]), other[:3] + tuple(other[3])):
            assert torch.equal(x, y)


def test_symmetric_and_general_paths_agree(assert_close):
    # The same problem through both paths: pool a copy of the anchors (symmetric) and that copy with one element
    # nudged by far less than fp32 resolves in the loss (general path).
    inputs = kernel_inputs(520, 520, 12, F32, classes=4, symmetric=True)
    nudged = inputs[1].clone()
    nudged[0, 0] = torch.nextafter(nudged[0, 0], torch.tensor(2.0))
    general = (inputs[0], nudged) + inputs[2:]
    sym = run_cpu(inputs, 5.0, 1.0)
    gen = run_cpu(general, 5.0, 1.0)
    assert torch.equal(sym[2], gen[2])
    assert_close(sym[0], gen[0].double(), F32, "cpu/loss")
    for a, b in zip(sym[3], gen[3]):
        assert_close(a, b.double(), F32, "cpu/d_anchors")
