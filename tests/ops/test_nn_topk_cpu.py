"""nn_topk CPU kernel (csrc/cpu/nn_topk.cpp) against the kernel-level reference, on the paths that depend on the
kernel's tile and chunk rules: several query tiles, queue tiles and queue chunks with ragged tails; k = 1, k = 20, k
equal to the number of eligible entries (every one of them, in rank order); duplicate ids; ties (integer features:
every similarity exact in every dtype, so ranks must match the reference exactly, ties by the lower index, also
across chunk boundaries; and duplicated queue rows of real data); fp16/bf16 widened per tile; the at::addmm_out GEMM
path; bitwise thread-count independence; NaN, inf and -0 similarities ranked as the reference sorts them; the
public nn_topk on the cpu backend; the precondition check.

Cost: 8 s of test time on 2 cores shared with about 10 busy processes (the largest case is 300 queries x 3000
queue entries); less on a quiet machine.
"""
import pytest
import torch
import torch.nn.functional as F

from vitfast.ops import nn_topk
from vitfast.ops.nn_topk import BACKENDS, _reference_topk

pytestmark = pytest.mark.skipif(not BACKENDS.runs_on("cpu", torch.device("cpu")), reason="vitfast._C is not built")

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
NO_ID = torch.iinfo(torch.int64).min  # the query id the public function passes without ids


@pytest.fixture
def threads():
    """threads(n) sets torch's intra-op thread count for the test; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def inputs(b, q, d, dtype, *, ids=None, integer=False, seed=0):
    """(queries [b, d], queue [q, d], query_ids [b], queue_ids [q]). integer: features in -3..3 (exact dot products,
    many ties), else unit rows. ids: ids drawn from range(ids) for both sides (duplicates: entries excluded per
    query); None: no exclusion (the public function's placeholder ids)."""
    gen = torch.Generator().manual_seed(seed)
    if integer:
        queries, queue = (torch.randint(-3, 4, (n, d), generator=gen).to(F64) for n in (b, q))
    else:
        queries, queue = (F.normalize(torch.randn(n, d, generator=gen, dtype=F64), dim=1) for n in (b, q))
    if ids is None:
        query_ids, queue_ids = torch.full((b,), NO_ID), torch.zeros(q, dtype=torch.int64)
    else:
        query_ids, queue_ids = (torch.randint(0, ids, (n,), generator=gen) for n in (b, q))
    return queries.to(dtype), queue.to(dtype), query_ids, queue_ids


def eligible(query_ids, queue_ids):
    return (queue_ids[None, :] != query_ids[:, None]).sum(1)


def check(case, k, assert_close, *, exact=False):
    """Indices equal to the float64 reference's; values close to it (equal with exact similarities)."""
    queries, queue, query_ids, queue_ids = case
    values, indices = torch.ops.vitfast_C.nn_topk(queries, queue, query_ids, queue_ids, k)
    want_values, want_indices = _reference_topk(queries.double(), queue.double(), query_ids, queue_ids, k)
    assert values.dtype == (F64 if queries.dtype == F64 else F32) and indices.dtype == torch.int64
    assert values.shape == indices.shape == (queries.shape[0], k)
    assert torch.equal(indices, want_indices)
    if exact:
        assert torch.equal(values.double(), want_values)
    else:
        assert_close(values, want_values, queries.dtype, "cpu/values")


@pytest.mark.parametrize("b, q, d, k", [(1, 1, 3, 1), (5, 7, 4, 7), (300, 1100, 16, 20), (3, 3000, 8, 20),
                                        (300, 1100, 5, 1)])
def test_tiles_and_chunks_with_ragged_tails(b, q, d, k, assert_close):
    # 300 queries: 2 query tiles of 150; 1100 entries: 512 + 512 + 76 in 3 chunks; 3 x 3000: 6 chunks of one tile.
    check(inputs(b, q, d, F32), k, assert_close)


@pytest.mark.parametrize("dtype", [F64, F32, F16, BF16])
@pytest.mark.parametrize("k", [1, 20])
def test_exact_ties_and_duplicate_ids(dtype, k, assert_close):
    # Integer features: dot products in -144..144, exact in every dtype and every summation order, so hundreds of
    # entries tie and the order among them (the lower index first, across tiles and chunks) is checked exactly.
    check(inputs(70, 1300, 16, dtype, ids=40, integer=True), k, assert_close, exact=True)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_k_is_every_eligible_entry(dtype, assert_close):
    # 1100 entries with ids 0..4: k = the fewest eligible of any query, so that query gets all its entries in rank
    # order (and others all but some).
    case = inputs(20, 1100, 9, dtype, ids=5, seed=1)
    k = int(eligible(case[2], case[3]).min())
    assert 800 < k < 1100
    check(case, k, assert_close)


def test_duplicated_queue_rows_rank_by_index(assert_close):
    # Real-valued features; entries 3, 600 and 1000 are copies of one row, in three different queue tiles and chunks,
    # and query 0 is that row itself: they tie for its top 3, lower index first.
    queries, queue, query_ids, queue_ids = inputs(40, 1100, 16, F32)
    queue[600] = queue[1000] = queue[3]
    queries[0] = queue[3]
    values, indices = torch.ops.vitfast_C.nn_topk(queries, queue, query_ids, queue_ids, 20)
    assert indices[0, :3].tolist() == [3, 600, 1000] and values[0, 0] == values[0, 1] == values[0, 2]
    check((queries, queue, query_ids, queue_ids), 20, assert_close)


def test_special_similarities_rank_as_the_reference_sorts():
    # d = 1 and query 1.0: the similarities are the queue values themselves. The reference's descending sort puts
    # NaN first, then inf, ..., -inf; -0.0 ties with +0.0 (lower index first). Specials sit in both queue tiles.
    special = [1.5, -0.0, 0.0, -2.0, float("inf"), float("-inf"), float("nan"), 0.0]
    queue = torch.full((600, 1), -3.0)
    queue[:8, 0] = torch.tensor(special)
    queue[520:528, 0] = torch.tensor(special)
    queries = torch.ones(1, 1)
    ids = torch.full((1,), NO_ID), torch.zeros(600, dtype=torch.int64)
    values, indices = torch.ops.vitfast_C.nn_topk(queries, queue, *ids, 20)
    want_values, want_indices = _reference_topk(queries.double(), queue.double(), *ids, 20)
    assert indices[0, :12].tolist() == [6, 526, 4, 524, 0, 520, 1, 2, 7, 521, 522, 527]
    assert torch.equal(indices, want_indices) and torch.equal(values.double().nan_to_num(), want_values.nan_to_num())


def test_gemm_through_aten(monkeypatch, assert_close):
    monkeypatch.setenv("VITFAST_CPU_GEMM", "aten")
    check(inputs(300, 1100, 12, F32, ids=30), 20, assert_close)


def test_thread_count_does_not_change_bits(threads):
    # 300 queries x 3000 entries: 2 query tiles x 6 chunks.
    case = inputs(300, 3000, 16, F32, ids=100)
    results = []
    for n in (1, 2, 3):
        threads(n)
        results.append(torch.ops.vitfast_C.nn_topk(*case, 20))
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0]) and torch.equal(results[0][1], other[1])


@pytest.mark.parametrize("k", [1, 20])
def test_public_function_matches_reference(k):
    # The public op on the cpu backend and on the torch reference: the same draw from the same generator state picks
    # the same rank; integer features make the similarities exact, so index and similarity agree exactly.
    queries, queue, query_ids, queue_ids = inputs(64, 700, 8, F32, ids=30, integer=True, seed=2)
    got, want = (nn_topk(queries, queue, k=k, queue_ids=queue_ids, query_ids=query_ids,
                         generator=torch.Generator().manual_seed(7), backend=backend) for backend in ("cpu", "torch"))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_fewer_eligible_entries_than_k_is_refused():
    # The public function checks this; the kernel refuses it too rather than return unfilled ranks.
    queries, queue, query_ids, queue_ids = inputs(4, 10, 3, F32)
    queue_ids[:] = 1
    query_ids[2] = 1  # query 2 has no eligible entry
    with pytest.raises(RuntimeError, match="query 2 has 0 eligible"):
        torch.ops.vitfast_C.nn_topk(queries, queue, query_ids, queue_ids, 1)
