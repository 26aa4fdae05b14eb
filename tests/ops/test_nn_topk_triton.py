"""Launcher-level tests of the Triton kernel of nn_topk (vitfast.kernels.nn_topk).

Every kernel branch (one-chunk D classes d128 / d256 and chunked D, K classes 32 and 128, the rounds of a k > 128,
one chunk and several chunks merged on the host), fp32 / fp16 / bf16, exact ties inside a tile and across chunks,
duplicate ids, queries whose own id fills most of the queue, k = 1, k = 20 and k = every eligible entry, the rank
keys' order, the candidate memory at the benchmark shape and the AOT specs, against the float64 reference (the
torch backend, via tests/ops/test_nn_topk.py's checks). Under the interpreter (no GPU) the cases have a few rows;
the whole file: ~1.5 min on 2 loaded cores (the bitonic merges dominate).
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from test_nn_topk import assert_topk_right, make_inputs, ranked  # noqa: E402

from vitfast import ops  # noqa: E402
from vitfast.kernels import nn_topk as kn  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
F32 = torch.float32


def ids(value):
    return str(value).replace("torch.", "")


def launch(queries, queue, query_ids, queue_ids, k):
    """The launcher on DEVICE; results back on the CPU."""
    on = lambda t: t.to(DEVICE).contiguous()  # noqa: E731
    values, indices = kn.nn_topk(on(queries), on(queue), on(query_ids), on(queue_ids), k)
    return values.cpu(), indices.cpu()


@pytest.fixture
def many_chunks(monkeypatch):
    """Split even a tiny queue into chunks of one tile (the host merge of the chunks' candidates runs)."""
    monkeypatch.setattr(kn, "MIN_TILES_PER_CHUNK", 1)
    monkeypatch.setattr(kn, "CANDIDATE_ROWS_PER_KEY", 1)


# (name, B, Q, d, k, ids): D 40 -> d128, D 130 -> d256 (fp16 / bf16 one chunk), D 300 -> chunked; K 20 -> KP 32,
# K 40 -> KP 128.
SHAPES = [
    ("B5 Q37 d40 k3 own", 5, 37, 40, 3, "own"),
    ("B12 Q150 d130 k20 dup-queries", 12, 150, 130, 20, "dup-queries"),
    ("B3 Q90 d300 k1 own", 3, 90, 300, 1, "own"),
    ("B4 Q70 d24 k40 no-ids", 4, 70, 24, 40, None),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_matches_reference(dtype, shape, assert_close):
    name, batch, size, dim, k, ids_kind = shape
    queries, queue, query_ids, queue_ids = make_inputs(batch, size, dim, ids_kind, dtype, seed=11)
    if ids_kind is None:  # what the public function passes without ids
        query_ids = torch.full((batch,), torch.iinfo(torch.int64).min)
        queue_ids = torch.zeros(size, dtype=torch.int64)
    inputs = (queries, queue, query_ids, queue_ids)
    values, indices = launch(*inputs, k)
    assert_topk_right(values, indices, inputs, k, dtype, name, assert_close)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=ids)
def test_several_chunks_merge_with_exact_ties(dtype, many_chunks):
    """Integer features (every dot exact in every dtype) and each queue row 4 times, the copies spread over 4 chunks
    of one tile: the order is the stable sort's (lower index first among equals), across tiles and chunks."""
    gen = torch.Generator().manual_seed(3)
    rows = torch.randint(-2, 3, (64, 20), generator=gen)
    queue = torch.cat([rows[torch.randperm(64, generator=gen)] for _ in range(4)])  # [256, 20]
    queries = torch.randint(-2, 3, (9, 20), generator=gen)
    query_ids, queue_ids = torch.randint(0, 5, (9,), generator=gen), torch.randint(0, 5, (256,), generator=gen)
    inputs = (queries.to(dtype), queue.to(dtype), query_ids, queue_ids)
    assert kn.plan(9, 256, 20, 20, dtype)[1] == 4  # four chunks: the host merge runs
    similarity, order = ranked(*inputs)
    values, indices = launch(*inputs, 20)
    assert torch.equal(indices, order[:, :20])
    assert torch.equal(values.double(), similarity.gather(1, order[:, :20]))
    assert bool((similarity.gather(1, order[:, :20]).diff(dim=1) == 0).sum() > 20)  # many ties to break


@pytest.mark.parametrize("dtype", [torch.float32], ids=ids)  # the K classes' 16-bit builds: test_matches_reference
def test_k_above_128_runs_in_rounds(dtype, assert_close):
    """k = 150 > 128: two rounds (128, then 22 below the first round's last key); k = every eligible entry."""
    queries, queue, _, queue_ids = make_inputs(3, 160, 24, "own", dtype, seed=5)
    query_ids = torch.tensor([queue_ids[0].item(), -1, queue_ids[7].item()])
    k = int((queue_ids[None, :] != query_ids[:, None]).sum(1).min())
    assert 128 < k <= 160
    inputs = (queries, queue, query_ids, queue_ids)
    values, indices = launch(*inputs, k)
    assert_topk_right(values, indices, inputs, k, dtype, "rounds", assert_close)


def test_own_id_fills_most_of_the_queue(assert_close, many_chunks):
    """Queries whose id is on 140 of 150 entries (the nearest ones): exactly the 10 others, in rank order (k = all
    eligible); chunks made of excluded entries only contribute nothing."""
    queries, queue, _, _ = make_inputs(4, 150, 16, None, F32, seed=6)
    queue_ids = torch.full((150,), 7)
    others = torch.tensor([3, 40, 41, 77, 100, 101, 120, 140, 148, 149])
    queue_ids[others] = torch.arange(10, 20)
    query_ids = torch.full((4,), 7)
    values, indices = launch(queries, queue, query_ids, queue_ids, 10)
    assert set(indices.flatten().tolist()) == set(others.tolist())
    assert_topk_right(values, indices, (queries, queue, query_ids, queue_ids), 10, F32, "own-id", assert_close,
                      clear_share=0.8)


def test_public_function_draws_as_the_torch_backend():
    """ops.nn_topk(backend="triton") with a fixed generator returns the torch backend's draw (k = 20 and k = 1)."""
    queries, queue, query_ids, queue_ids = make_inputs(10, 60, 32, "dup-queries", F32, seed=8)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    for k in (20, 1):
        got = ops.nn_topk(on(queries), on(queue), k=k, queue_ids=on(queue_ids), query_ids=on(query_ids),
                          generator=torch.Generator(DEVICE).manual_seed(4), backend="triton")
        want = ops.nn_topk(queries, queue, k=k, queue_ids=queue_ids, query_ids=query_ids,
                           generator=torch.Generator().manual_seed(4), backend="torch")
        assert torch.equal(got[0].cpu(), want[0])
        torch.testing.assert_close(got[1].cpu(), want[1], atol=1e-6, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")  # the NaN entry, under the interpreter
def test_rank_keys_order_and_decode():
    """Keys of special similarities: greater key = higher similarity, then lower index; -0.0 ties with +0.0; NaN
    first (as torch's descending sort); decode_keys gives the similarity and the index back."""
    sims = torch.tensor([[1.5, -0.0, 0.0, -2.0, float("inf"), float("-inf"), float("nan"), 0.0] + [-3.0] * 8])
    queries, queue = torch.eye(16)[:1], torch.zeros(16, 16)
    queue[:, 0] = sims[0]  # <queries[0], queue[q]> = sims[0, q]
    values, indices = launch(queries, queue, torch.tensor([-1]), torch.zeros(16, dtype=torch.int64), 16)
    assert indices[0, :6].tolist() == [6, 4, 0, 1, 2, 7]  # NaN, inf, 1.5, then the zeros by index
    assert indices[0, 6:].tolist() == [3] + list(range(8, 16)) + [5]
    assert torch.isnan(values[0, 0]) and values[0, 1:].tolist() == sorted(values[0, 1:].tolist(), reverse=True)


def test_candidates_stay_small_at_the_benchmark_shape():
    """B = 512, Q = 65536, d = 256, k = 20: the chunks' int64 candidates take <= 1/20 of the [B, Q] fp32
    similarities' bytes, and the grid fills a 132-SM GPU; every K class's tiles are at least KP wide."""
    for dtype in DTYPES:
        cfg, n_chunks, tiles_per_chunk = kn.plan(512, 65536, 256, 20, dtype)
        assert 512 * n_chunks * 20 * 8 <= 512 * 65536 * 4 / 20
        assert triton.cdiv(512, cfg["BLOCK_B"]) * n_chunks >= 132
        assert n_chunks * tiles_per_chunk * cfg["BLOCK_Q"] >= 65536
    for kclass in kn.CONFIG.values():
        for dclass in kclass.values():
            for cfg in dclass.values():
                assert cfg["BLOCK_Q"] >= cfg["KP"]


def test_aot_specs_cover_the_launch_table():
    """Every (K class, D class, dtype) entry the launcher can pick is compiled by the compile check."""
    built = {(tuple(sorted(s.constexprs.items())), s.num_warps, s.num_stages, s.signature["queries_ptr"])
             for s in kn.AOT_SPECS}
    for kclass in kn.CONFIG.values():
        for dclass in kclass.values():
            for dtype, cfg in dclass.items():
                blocks = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
                precisions = ("ieee", "tf32") if dtype == F32 else ("tf32",)
                for precision in precisions:
                    key = (tuple(sorted(dict(blocks, INPUT_PRECISION=precision).items())), cfg["num_warps"],
                           cfg["num_stages"], "*" + kn.TRITON_DTYPE[dtype])
                    assert key in built, (dtype, cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's sort speed-up (no interpreter on a GPU)")
def test_interpreter_xor_sum_speed_up_is_exact():
    """vitfast.triton_interpreter.speed_up_sort: xor_sum over a size-2 axis (max ^ min) and over a longer axis (the
    original reduce) give numpy's xor reduction."""
    import numpy as np
    import triton.language as tl
    import triton.language.standard as standard

    assert getattr(standard.xor_sum, "pairs_by_max_min", False)  # tests/conftest.py applied it

    @triton.jit
    def _xor(x_ptr, pairs_ptr, rows_ptr):
        offs = tl.arange(0, 8)[:, None] * 2 + tl.arange(0, 2)[None, :]
        x = tl.load(x_ptr + offs)
        tl.store(pairs_ptr + tl.arange(0, 8), tl.reshape(tl.standard.xor_sum(x, 1, True), (8,)))
        tl.store(rows_ptr + tl.arange(0, 2), tl.standard.xor_sum(x, 0))

    x = torch.randint(-2 ** 62, 2 ** 62, (8, 2), generator=torch.Generator().manual_seed(0))
    pairs, rows = torch.empty(8, dtype=torch.int64), torch.empty(2, dtype=torch.int64)
    _xor[(1,)](x, pairs, rows)
    assert pairs.tolist() == np.bitwise_xor.reduce(x.numpy(), axis=1).tolist()
    assert rows.tolist() == np.bitwise_xor.reduce(x.numpy(), axis=0).tolist()
