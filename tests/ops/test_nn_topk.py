"""nn_topk: every backend's k best eligible entries (values and indices, in rank order) against the float64 reference
over ragged shapes, id layouts and dtypes; the public lookup (k = 1: the nearest neighbour; k = 20: the same draw
for the same generator on every backend; a uniform draw), exact ties, self-exclusion with duplicate ids, no ids,
opcheck, autocast, random calls (hypothesis) and argument errors.

Backends join by themselves: a case runs where ``BACKENDS.runs_on`` says the backend runs here and (triton) its
kernel module imports; otherwise it is skipped with the reason. Under the Triton interpreter (no GPU) the triton
backend gets two small cases in every dtype and fp32 elsewhere. Cost on 2 loaded cores: ~27 s with torch, cpu and
triton under the interpreter.

Indices are compared exactly where the reference's similarity at that rank is clear of its neighbours (by more than
twice the largest value error seen plus a rounding floor); inside a near-tie the returned entry must have the
similarity of its rank instead. Exact ties (integer features: every dot exact in every dtype) must come out lower
index first.
"""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vitfast.ops import nn_topk, nn_topk_reference
from vitfast.ops.nn_topk import BACKENDS

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
INTERPRETED = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# (name, B, Q, d, k, ids): ids "own" = each query's id on 1..3 queue entries (near copies of it), the rest drawn from
# a small range (duplicates); "dup-queries" = several queries share an id; None = no ids.
CASES = [
    ("B5 Q37 d17 k1 own", 5, 37, 17, 1, "own"),
    ("B6 Q70 d24 k20 own", 6, 70, 24, 20, "own"),
    ("B3 Q20 d8 k20 no-ids", 3, 20, 8, 20, None),
    ("B7 Q45 d33 k5 dup-queries", 7, 45, 33, 5, "dup-queries"),
    ("B1 Q3 d2 k2 own", 1, 3, 2, 2, "own"),
    # several tiles of queries, queue rows and features with ragged tails (for the compiled backends)
    ("B37 Q1100 d130 k20 own", 37, 1100, 130, 20, "own"),
    ("B65 Q3000 d67 k7 dup-queries", 65, 3000, 67, 7, "dup-queries"),
]
# The interpreter takes seconds per call: there the triton backend gets two cases here (every dtype) and fp32 in the
# other tests; tests/ops/test_nn_topk_triton.py covers its branches, dtypes and ties.
INTERPRETER_CASES = ("B6 Q70 d24 k20 own", "B3 Q20 d8 k20 no-ids")


def triton_module_missing():
    try:
        importlib.import_module(BACKENDS.triton[0])
    except ImportError as error:
        return str(error)
    return None


def skip_unless_runs(backend, dtype=None, device=torch.device("cpu"), every_dtype=False):
    if backend == "triton" and INTERPRETED and dtype not in (None, F32) and not every_dtype:
        pytest.skip("interpreter: fp32 only here (tests/ops/test_nn_topk_triton.py runs every dtype)")
    if not BACKENDS.runs_on(backend, device, dtype):
        pytest.skip(f"backend {backend} does not run {dtype} on {device} here (needs a GPU, the interpreter or the "
                    "build)")
    if backend == "triton" and triton_module_missing():
        pytest.skip(f"triton kernels of nn_topk not importable: {triton_module_missing()}")


def backend_cases(dtypes=(F64, F32, F16, BF16)):
    return [(b, d) for b in ("torch", "cpu", "triton") for d in dtypes if d in BACKENDS.dtypes[b]]


def ids(value):
    return str(value).replace("torch.", "")


def make_inputs(batch, size, dim, ids_kind, dtype, seed=0, device="cpu"):
    """queries [B, d] and queue [Q, d] unit rows (the cosine), query_ids [B] and queue_ids [Q] (or None)."""
    gen = torch.Generator().manual_seed(seed)
    queries = F.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    queue = F.normalize(torch.randn(size, dim, generator=gen), dim=1)
    query_ids = queue_ids = None
    if ids_kind is not None:
        queue_ids = torch.randint(100, 100 + max(2, size // 4), (size,), generator=gen)
        if ids_kind == "dup-queries":
            query_ids = queue_ids[torch.randint(0, size, (batch,), generator=gen)]
            query_ids[batch // 2:] = query_ids[0]
        else:  # "own": the queue holds near copies of each query under its id (the most similar entries)
            query_ids = torch.arange(batch)
            slots = torch.randperm(size, generator=gen)[:min(size - 2, 3 * batch)]
            owner = torch.arange(slots.shape[0]) % batch
            queue_ids[slots] = owner
            queue[slots] = F.normalize(queries[owner] + 0.05 * torch.randn(slots.shape[0], dim, generator=gen), dim=1)
        query_ids, queue_ids = query_ids.to(device), queue_ids.to(device)
    return queries.to(device=device, dtype=dtype), queue.to(device=device, dtype=dtype), query_ids, queue_ids


def ranked(queries, queue, query_ids, queue_ids):
    """The float64 similarities (excluded entries -inf) and every query's eligible entries in rank order."""
    similarity = queries.double().cpu() @ queue.double().cpu().T
    if query_ids is not None:
        similarity = similarity.masked_fill(queue_ids.cpu()[None, :] == query_ids.cpu()[:, None], float("-inf"))
    return similarity, torch.sort(similarity, dim=1, descending=True, stable=True).indices


def kernel_call(queries, queue, query_ids, queue_ids, k, backend):
    """The kernel-level op, with the ids the public function passes when there are none."""
    if query_ids is None:
        query_ids = torch.full((queries.shape[0],), torch.iinfo(torch.int64).min, device=queries.device)
        queue_ids = torch.zeros(queue.shape[0], dtype=torch.int64, device=queries.device)
    return torch.ops.vitfast.nn_topk(queries, queue, query_ids, queue_ids, k, backend)


def assert_topk_right(values, indices, inputs, k, dtype, name, assert_close, clear_share=0.5):
    """values / indices [B, k] against the reference (module doc). Returns the mask of entries compared exactly."""
    similarity, order = ranked(*inputs)
    want_indices = order[:, :k]
    want_values = similarity.gather(1, want_indices)
    assert values.dtype == (F64 if dtype == F64 else F32) and indices.dtype == torch.int64
    assert values.shape == indices.shape == want_values.shape
    values, indices = values.cpu(), indices.cpu()
    assert_close(values, want_values, dtype, f"{name}/values")
    own = similarity.gather(1, indices)                  # each returned entry's similarity in float64
    assert bool(torch.isfinite(own).all()), "an excluded entry was returned"
    assert bool((indices.sort(1).values.diff(dim=1) != 0).all()), "an entry returned twice"
    scale = want_values.abs().max().item()
    slack = 2 * (values.double() - want_values).abs().max().item() + (1e-13 if dtype == F64 else 1e-6) * scale
    assert (own - want_values).abs().max().item() <= slack, "an entry is not at its rank's similarity"
    after = similarity.gather(1, order[:, k:k + 1]) if order.shape[1] > k else torch.full_like(want_values[:, :1],
                                                                                                -float("inf"))
    padded = torch.cat([torch.full_like(after, float("inf")), want_values, after], dim=1)
    clear = (padded[:, :-2] - want_values > slack) & (want_values - padded[:, 2:] > slack)
    assert torch.equal(indices[clear], want_indices[clear]), "an index differs where no near-tie excuses it"
    assert clear.double().mean().item() >= clear_share, "too few clear ranks: the case tests little"
    return clear


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("backend,dtype", backend_cases(), ids=ids)
def test_backend_matches_reference(backend, dtype, case, assert_close, backend_device):
    name, batch, size, dim, k, ids_kind = case
    device = backend_device(backend)
    skip_unless_runs(backend, dtype, device, every_dtype=True)
    if backend == "triton" and INTERPRETED and name not in INTERPRETER_CASES:
        pytest.skip("interpreter: small cases only")
    inputs = make_inputs(batch, size, dim, ids_kind, dtype, device=device)
    values, indices = kernel_call(*inputs, k, backend)
    assert_topk_right(values, indices, inputs, k, dtype, backend, assert_close)


@pytest.mark.parametrize("backend,dtype", backend_cases(), ids=ids)
def test_exact_ties_lower_index_first(backend, dtype):
    """Integer features in -2..2: every similarity exact in every dtype, many equal; the order is the stable sort's
    (lower queue index first among equals), the same entries as the reference's, bit for bit."""
    skip_unless_runs(backend, dtype)
    gen = torch.Generator().manual_seed(1)
    queue = torch.randint(-2, 3, (12, 6), generator=gen).repeat(4, 1)  # every row 4 times: ties of 4 at least
    queue = queue[torch.randperm(48, generator=gen)]
    queries = torch.randint(-2, 3, (5, 6), generator=gen)
    query_ids, queue_ids = torch.tensor([0, 1, 1, 2, 9]), torch.randint(0, 4, (48,), generator=gen)
    inputs = (queries.to(dtype), queue.to(dtype), query_ids, queue_ids)
    similarity, order = ranked(*inputs)
    values, indices = kernel_call(*inputs, 10, backend)
    assert torch.equal(indices, order[:, :10])
    assert torch.equal(values.double(), similarity.gather(1, order[:, :10]))
    assert bool((similarity.gather(1, order[:, :10]).diff(dim=1) == 0).any())  # there are ties to break


# ---- the public lookup ----

@pytest.mark.parametrize("backend,dtype", backend_cases(), ids=ids)
def test_k1_is_the_nearest_other_entry(backend, dtype):
    """k = 1: each query's most similar entry not carrying its id (the near copies under its own id, the most
    similar of all, are skipped); without ids the query's own copy in the queue is found."""
    skip_unless_runs(backend, dtype)
    queries, queue, query_ids, queue_ids = make_inputs(6, 40, 12, "own", dtype, seed=2)
    index, similarity = nn_topk(queries, queue, k=1, queue_ids=queue_ids, query_ids=query_ids, backend=backend)
    assert index.shape == similarity.shape == (6,) and index.dtype == torch.int64
    assert similarity.dtype == (F64 if dtype == F64 else F32)
    full = queries.double() @ queue.double().T
    want = full.masked_fill(queue_ids[None, :] == query_ids[:, None], -float("inf")).argmax(1)
    assert torch.equal(index, want)
    assert bool((queue_ids[index] != query_ids).all())
    assert bool((full.argmax(1) != want).all())  # the excluded copies were the nearest: the exclusion mattered
    copies = torch.cat([queue, queries])  # the queries themselves at rows 40..45
    index, _ = nn_topk(queries, copies, k=1, backend=backend)
    assert torch.equal(index, torch.arange(40, 46))


@pytest.mark.parametrize("backend,dtype", backend_cases(), ids=ids)
def test_k20_same_draw_as_the_reference(backend, dtype, assert_close):
    """k = 20 with a generator: the same draw as the float64 reference from the same generator state, and the
    entry at the drawn rank of the reference's ranking."""
    skip_unless_runs(backend, dtype)
    inputs = make_inputs(8, 70, 24, "own", dtype, seed=3)
    queries, queue, query_ids, queue_ids = inputs
    index, similarity = nn_topk(queries, queue, k=20, queue_ids=queue_ids, query_ids=query_ids,
                                generator=torch.Generator().manual_seed(7), backend=backend)
    want_index, want_similarity = nn_topk_reference(queries.double(), queue.double(), k=20, queue_ids=queue_ids,
                                                    query_ids=query_ids, generator=torch.Generator().manual_seed(7))
    values, indices = kernel_call(*inputs, 20, backend)
    clear = assert_topk_right(values, indices, inputs, 20, dtype, backend, assert_close)
    rank = (indices == index[:, None]).int().argmax(1)   # where the returned entry sits in the backend's ranking
    assert torch.equal(indices.gather(1, rank[:, None])[:, 0], index)
    want_rank = (ranked(*inputs)[1][:, :20] == want_index[:, None]).int().argmax(1)
    assert torch.equal(rank, want_rank)  # the same draw
    at_clear = clear.gather(1, rank[:, None])[:, 0]
    assert torch.equal(index[at_clear], want_index[at_clear]) and bool(at_clear.any())
    assert_close(similarity, want_similarity, dtype, f"{backend}/drawn")
    assert len(set(rank.tolist())) > 2  # the draw is not stuck at one rank


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_draw_is_uniform_over_the_k_ranks(backend):
    """4000 identical queries, k = 5: each rank drawn about 800 times (chi-square, 4 degrees of freedom, below its
    0.1 % point 18.5)."""
    skip_unless_runs(backend, F32)
    queries, queue, _, _ = make_inputs(1, 10, 4, None, F32, seed=4)
    index, _ = nn_topk(queries.expand(4000, -1).contiguous(), queue, k=5, generator=torch.Generator().manual_seed(0),
                       backend=backend)
    top = ranked(queries, queue, None, None)[1][0, :5]
    counts = torch.stack([(index == entry).sum() for entry in top]).double()
    assert counts.sum().item() == 4000  # every draw is one of the 5 nearest
    chi2 = ((counts - 800) ** 2 / 800).sum().item()
    assert chi2 < 18.5, counts


def test_no_query_is_an_empty_answer():
    queue = torch.randn(5, 3)
    for k in (1, 3):
        index, similarity = nn_topk(torch.randn(0, 3), queue, k=k, queue_ids=torch.arange(5),
                                    query_ids=torch.zeros(0, dtype=torch.int64))
        assert index.shape == similarity.shape == (0,) and index.dtype == torch.int64


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 12), size=st.integers(1, 60), dim=st.integers(1, 20), k=st.integers(1, 20),
       id_range=st.integers(1, 8), dtype=st.sampled_from([F32, F64]), seed=st.integers(0, 2**16))
def test_returned_entry_is_eligible_and_in_the_top_k(batch, size, dim, k, id_range, dtype, seed):
    """Random shapes and id draws (queries sharing ids with many entries): on the torch and cpu backends the
    returned entry never carries the query's id, lies within the query's k most similar eligible entries, and its
    similarity is its own."""
    gen = torch.Generator().manual_seed(seed)
    queries, queue = torch.randn(batch, dim, generator=gen, dtype=dtype), torch.randn(size, dim, generator=gen,
                                                                                         dtype=dtype)
    queue_ids = torch.randint(0, id_range, (size,), generator=gen)
    query_ids = torch.randint(0, id_range, (batch,), generator=gen)
    eligible = (queue_ids[None, :] != query_ids[:, None]).sum(1)
    k = max(1, min(k, int(eligible.min()))) if int(eligible.min()) > 0 else None
    if k is None:  # a query without eligible entries: the one-line error instead
        with pytest.raises(ValueError, match="fewer than k = 1"):
            nn_topk(queries, queue, k=1, queue_ids=queue_ids, query_ids=query_ids)
        return
    similarity, order = ranked(queries, queue, query_ids, queue_ids)
    kth = similarity.gather(1, order[:, k - 1:k])[:, 0]
    tolerance = (1e-12 if dtype == F64 else 1e-5) * similarity[similarity.isfinite()].abs().max().clamp_min(1)
    for backend in [b for b in ("torch", "cpu") if BACKENDS.runs_on(b, torch.device("cpu"), dtype)]:
        index, got = nn_topk(queries, queue, k=k, queue_ids=queue_ids, query_ids=query_ids,
                             generator=torch.Generator().manual_seed(seed), backend=backend)
        assert bool((queue_ids[index] != query_ids).all())
        own = similarity.gather(1, index[:, None])[:, 0]
        assert bool((own >= kth - tolerance).all())
        assert bool(((got.double() - own).abs() <= tolerance).all())


# ---- registration: opcheck, autocast ----

@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_opcheck(backend):
    skip_unless_runs(backend, F32)
    queries, queue, query_ids, queue_ids = make_inputs(4, 30, 6, "own", F32, seed=5)
    torch.library.opcheck(torch.ops.vitfast.nn_topk.default, (queries, queue, query_ids, queue_ids, 5, backend))


def test_autocast_bf16_on_cpu():
    queries, queue, query_ids, queue_ids = make_inputs(6, 50, 16, "own", F32, seed=6)
    kwargs = dict(k=4, queue_ids=queue_ids, query_ids=query_ids)
    with torch.autocast("cpu", dtype=BF16):
        index, similarity = nn_topk(queries, queue, generator=torch.Generator().manual_seed(1), **kwargs)
    assert similarity.dtype == F32
    # The lookup is the op's on the bf16-rounded inputs, not on the fp32 ones.
    want_index, want = nn_topk(queries.to(BF16), queue.to(BF16), generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(index, want_index)
    torch.testing.assert_close(similarity, want, rtol=0, atol=0)
    _, unrounded = nn_topk(queries, queue, generator=torch.Generator().manual_seed(1), **kwargs)
    assert not torch.equal(similarity, unrounded)  # autocast did change the inputs


# ---- argument errors name the argument, the expectation and what arrived ----

def _good():
    gen = torch.Generator().manual_seed(8)
    return dict(queries=torch.randn(4, 6, generator=gen), queue=torch.randn(10, 6, generator=gen), k=3,
                queue_ids=torch.arange(10), query_ids=torch.tensor([0, 1, 2, 50]))


@pytest.mark.parametrize("change,message", [
    (dict(queries=torch.randn(4, 6, 1)), "queries must be float16/bfloat16/float32/float64 [B, d], got float32"),
    (dict(queries=torch.zeros(4, 6, dtype=torch.int64)), "queries must be float16/bfloat16/float32/float64 [B, d], "
                                                         "got int64"),
    (dict(queue=torch.randn(10, 7)), "queue must be float16/bfloat16/float32/float64 [Q, d] with d = 6 (from "
                                     "queries)"),
    (dict(queue=torch.randn(10, 6, dtype=F64)), "queue must have the dtype of queries (torch.float32), got float64"),
    (dict(queue=torch.randn(10, 6, device="meta")), "queue must be on cpu like the other inputs"),
    (dict(queue_ids=torch.arange(10, device="meta")), "queue_ids must be on cpu like the other inputs"),
    (dict(query_ids=None), "pass both queue_ids [Q] and query_ids [B]"),
    (dict(queue_ids=None), "pass both queue_ids [Q] and query_ids [B]"),
    (dict(queue_ids=torch.arange(10, dtype=torch.int32)), "queue_ids must be int64 [Q], got int32"),
    (dict(queue_ids=torch.arange(9)), "queue_ids must be int64 [Q] with Q = 10 (from queue)"),
    (dict(query_ids=torch.arange(5)), "query_ids must be int64 [B] with B = 4 (from queries)"),
    (dict(k=0), "k must be a positive int, got 0"),
    (dict(k=2.0), "k must be a positive int, got 2.0"),
    (dict(k=True), "k must be a positive int, got True"),
    (dict(k=11, queue_ids=None, query_ids=None), "query 0 has 10 queue entries not carrying its own id, fewer than "
                                                 "k = 11 (queue of 10)"),
    (dict(k=8, queue_ids=torch.tensor([50, 50, 50, 0, 1, 2, 4, 5, 6, 7])),
     "query 3 has 7 queue entries not carrying its own id, fewer than k = 8"),
    (dict(queries=torch.randn(4, 0), queue=torch.randn(10, 0)), "queries must have at least one feature"),
])
def test_bad_arguments_are_named(change, message):
    args = {**_good(), **change}
    with pytest.raises(ValueError) as error:
        nn_topk(args.pop("queries"), args.pop("queue"), **args)
    assert message in str(error.value), str(error.value)
    assert str(error.value).startswith("vitfast.ops.nn_topk: ")
    assert "\n" not in str(error.value)
