"""dino_loss CPU kernels (csrc/cpu/dino_loss.cpp): the two streaming softmax primitives against the float64
kernel-level reference, on the paths that depend on the kernel's tile and chunk rules. test_dino_loss.py holds every
backend to the reference at small shapes; here: several row tiles, key tiles and key chunks with ragged tails (and
R = 1, K = 1, d = 1), per-key key_scale / value_scale (the fused weight norm) and softmax_columns adding into a
nonzero out, the shared keys/values path, fp16/bf16 widened per tile, logits far beyond exp's range and key tiles
whose logits are all -inf (the online softmax's running max), the at::addmm_out GEMM path, bitwise thread-count
independence, no [K, e] or [K, d] buffer inside the kernels (profiler), argument errors, and the public dino_loss on
the cpu backend (loss and both gradients) against DINO's formula.

Cost: 6 s of test time (24 tests) on 2 cores shared with about 7 busy processes (the largest cases: 600 rows x 3000
keys, d = 16, and the profiled 64 rows x 16384 keys, d = 64); less on a quiet machine.
"""
import pytest
import torch
import torch.nn.functional as F

from vitfast.ops import dino_loss, dino_loss_reference
from vitfast.ops.dino_loss import BACKENDS, _reference_softmax_columns, _reference_softmax_rows

pytestmark = pytest.mark.skipif(not BACKENDS.runs_on("cpu", torch.device("cpu")), reason="vitfast._C is not built")

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
ROW_TILE, KEY_TILE, ROWS_ITEMS = 256, 512, 16  # dino_loss.cpp kRowTile, kKeyTile, kRowsItems


def key_chunks(rows, keys):
    """softmax_rows' key chunks (common.h chunk_grid(rows, kRowTile, keys, kKeyTile, kRowsItems))."""
    count = -(-rows // ROW_TILE)
    row_tiles = -(-rows // -(-rows // count))
    return min(-(-ROWS_ITEMS // row_tiles), -(-keys // KEY_TILE))


@pytest.fixture
def threads():
    """threads(n) sets torch's intra-op thread count for the test; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def inputs(r, k, d, e, dtype, *, seed=0, shared=False):
    """(x [r, d], keys [k, d], key_scale [k], values [k, e], value_scale [k], bias [k], y [r, e], out [k, e]): unit rows
    of x, keys of norm 0.5..2 with key_scale = 1 / ||keys_k|| (the fused weight norm), value_scale in 0.5..1.5, values,
    y and out Gaussian, bias ~ N(0, 4); the scales, bias, y and out in the accumulation dtype. shared: values is keys
    (e = d) and value_scale is key_scale, as in the loss."""
    acc = F64 if dtype == F64 else F32
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(r, d, generator=gen, dtype=F64), dim=1).to(dtype)
    norms = 0.5 + 1.5 * torch.rand(k, 1, generator=gen, dtype=F64)
    keys = (F.normalize(torch.randn(k, d, generator=gen, dtype=F64), dim=1) * norms).to(dtype)
    key_scale = keys.double().norm(dim=1).reciprocal().to(acc)
    values = keys if shared else torch.randn(k, e, generator=gen, dtype=F64).to(dtype)
    value_scale = key_scale if shared else (0.5 + torch.rand(k, generator=gen, dtype=F64)).to(acc)
    bias = (2 * torch.randn(k, generator=gen, dtype=F64)).to(acc)
    y = torch.randn(r, values.shape[1], generator=gen, dtype=F64).to(acc)
    out = torch.randn(k, values.shape[1], generator=gen, dtype=F64).to(acc)
    return x, keys, key_scale, values, value_scale, bias, y, out


def run_cpu(x, keys, key_scale, values, value_scale, bias, y, out, scale):
    """(lse, rows, columns) of the C++ kernels: columns = a copy of out after softmax_columns added into it, fed the
    reference lse, so that each kernel is checked alone."""
    lse, rows = torch.ops.vitfast_C.dino_softmax_rows(x, keys, key_scale, values, value_scale, bias, scale)
    wide = [t.double() for t in (x, keys, key_scale, values, value_scale, bias)]
    want_lse = _reference_softmax_rows(*wide, scale)[0]
    columns = out.clone()
    assert torch.ops.vitfast_C.dino_softmax_columns(x, keys, key_scale, bias, scale, want_lse.to(bias.dtype), y,
                                                    columns) is None
    return lse, rows, columns


def check(case, scale, assert_close):
    x, keys, key_scale, values, value_scale, bias, y, out = case
    acc = bias.dtype
    lse, rows, columns = run_cpu(*case, scale)
    wide = [t.double() for t in (x, keys, key_scale, values, value_scale, bias)]
    want_lse, want_rows = _reference_softmax_rows(*wide, scale)
    want_columns = out.double()  # the reference adds in place too
    _reference_softmax_columns(wide[0], wide[1], wide[2], wide[5], scale, want_lse, y.double(), want_columns)
    assert lse.dtype == rows.dtype == columns.dtype == acc
    assert lse.shape == want_lse.shape and rows.shape == want_rows.shape and columns.shape == want_columns.shape
    assert torch.isfinite(rows).all() and torch.isfinite(columns).all()
    assert_close(lse, want_lse, x.dtype, "cpu/lse")
    assert_close(rows, want_rows, x.dtype, "cpu/rows")
    # The added part alone too: out's own magnitude would hide an error in it.
    assert_close(columns - out, want_columns - out.double(), x.dtype, "cpu/columns added")
    assert_close(columns, want_columns, x.dtype, "cpu/columns")


@pytest.mark.parametrize("r, k, d, e", [(1, 1, 1, 1), (1, 1, 5, 3), (7, 3, 4, 5), (300, 1100, 19, 13),
                                        (3, 3000, 8, 6), (600, 600, 16, 16)])
def test_tiles_and_chunks_with_ragged_tails(r, k, d, e, assert_close):
    # 300 rows: 2 row tiles of 150, keys 512 + 512 + 76 in 3 chunks; 3 rows x 3000 keys: 6 chunks of one tile;
    # 600 rows: 3 row tiles of 200, 2 key chunks.
    assert key_chunks(300, 1100) == 3 and key_chunks(3, 3000) == 6 and key_chunks(600, 600) == 2
    check(inputs(r, k, d, e, F32), 25.0, assert_close)


@pytest.mark.parametrize("dtype", [F64, F32, F16, BF16])
@pytest.mark.parametrize("shared", [False, True])
def test_widened_dtypes_and_shared_values(dtype, shared, assert_close):
    # fp16/bf16 keys and values widened per key tile (once when values is keys); fp64 in fp64 throughout. The
    # reference takes the same rounded inputs in float64: only the kernel's accumulation error remains.
    check(inputs(300, 1100, 19, 13, dtype, shared=shared), 10.0, assert_close)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_large_logits_and_masked_key_tiles(dtype, assert_close):
    # scale 100 on unit rows: |z| up to 100 + bias, past exp's fp32 range without the running max. Keys 0..599 have
    # bias -inf: the first key tile of every row (and all of chunk 0) has no finite logit, then the max jumps.
    case = inputs(40, 1600, 8, 5, dtype)
    case[5][:600] = float("-inf")  # bias
    check(case, 100.0, assert_close)


def test_gemm_through_aten(monkeypatch, assert_close):
    monkeypatch.setenv("VITFAST_CPU_GEMM", "aten")
    check(inputs(300, 1100, 10, 7, F32), 25.0, assert_close)


def test_thread_count_does_not_change_bits(threads):
    # 600 rows x 3000 keys: 3 row tiles x 6 key chunks = 18 rows items; 6 key tiles for the columns (into out).
    case = inputs(600, 3000, 16, 16, F32)
    results = []
    for n in (1, 2, 3):
        threads(n)
        results.append(run_cpu(*case, 25.0))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_no_key_sized_buffer_inside(threads):
    # K = 16384 bf16 prototypes, e = d = 64: a [K, e] fp32 buffer is 4 MiB, a widened [K, d] copy too. The kernels' own
    # allocations (2 threads' tiles, 1 MiB with the widened key / value tiles; the rows' 16 chunk partials, 256 KiB;
    # the outputs) must stay below half of that; softmax_columns writes into the caller's out.
    from vitfast.gpu_check.measure import peak_bytes
    threads(2)
    x, keys, key_scale, values, value_scale, bias, y, out = inputs(64, 16384, 64, 64, BF16, shared=True)
    lse, _ = torch.ops.vitfast_C.dino_softmax_rows(x, keys, key_scale, values, value_scale, bias, 10.0)
    key_sized = 16384 * 64 * 4
    rows_peak = peak_bytes(lambda: torch.ops.vitfast_C.dino_softmax_rows(x, keys, key_scale, values, value_scale,
                                                                         bias, 10.0), torch.device("cpu"))
    columns_peak = peak_bytes(lambda: torch.ops.vitfast_C.dino_softmax_columns(x, keys, key_scale, bias, 10.0, lse, y,
                                                                               out), torch.device("cpu"))
    assert 0 < rows_peak < key_sized / 2 and 0 < columns_peak < key_sized / 2, (rows_peak, columns_peak)


def test_columns_without_rows_leave_out_unchanged():
    x, keys, key_scale, values, value_scale, bias, y, out = inputs(3, 700, 4, 5, F32)
    before = out.clone()
    torch.ops.vitfast_C.dino_softmax_columns(x[:0], keys, key_scale, bias, 2.0, torch.zeros(0), y[:0], out)
    assert torch.equal(out, before)


def test_argument_errors():
    x, keys, key_scale, values, value_scale, bias, y, out = inputs(3, 700, 4, 5, F32)
    lse = torch.zeros(3)
    rows = torch.ops.vitfast_C.dino_softmax_rows
    columns = torch.ops.vitfast_C.dino_softmax_columns
    with pytest.raises(RuntimeError, match="key_scale must be Float"):
        rows(x, keys, key_scale.double(), values, value_scale, bias, 2.0)
    with pytest.raises(RuntimeError, match=r"value_scale must be Float \[K\] = \[700\]"):
        rows(x, keys, key_scale, values, value_scale[:-1], bias, 2.0)
    with pytest.raises(RuntimeError, match="key_scale must be"):
        columns(x, keys, key_scale[:-1], bias, 2.0, lse, y, out)
    with pytest.raises(RuntimeError, match=r"out must be a contiguous Float \[K, e\] = \[700, 5\].*not contiguous"):
        columns(x, keys, key_scale, bias, 2.0, lse, y, torch.zeros(5, 700).T)
    with pytest.raises(RuntimeError, match="out must be"):
        columns(x, keys, key_scale, bias, 2.0, lse, y, out.double())


@pytest.mark.parametrize("dtype", [F64, F32, BF16])
def test_public_loss_and_gradients(dtype, assert_close):
    # The whole loss on the cpu backend: 4 student views (2 global), B = 3, K = 700 (two key tiles, two key chunks),
    # own teacher prototypes and a centre, against DINO's formula in float64 on the same (rounded) inputs.
    gen = torch.Generator().manual_seed(5)
    vs, vt, b, d, k = 4, 2, 3, 16, 700
    student = F.normalize(torch.randn(vs * b, d, generator=gen, dtype=F64), dim=1).to(dtype)
    teacher = F.normalize(torch.randn(vt * b, d, generator=gen, dtype=F64), dim=1).to(dtype)
    prototypes, teacher_prototypes = (torch.randn(k, d, generator=gen, dtype=F64).to(dtype) for _ in range(2))
    centre = 0.1 * torch.randn(k, generator=gen, dtype=F64)
    kwargs = dict(n_student_views=vs, n_teacher_views=vt, student_temp=0.1, teacher_temp=0.04)
    leaves = [student.clone().requires_grad_(), prototypes.clone().requires_grad_()]
    loss, mean = dino_loss(leaves[0], teacher, leaves[1], centre, teacher_prototypes=teacher_prototypes,
                           backend="cpu", **kwargs)
    wide = [student.double().requires_grad_(), prototypes.double().requires_grad_()]
    want, want_mean = dino_loss_reference(wide[0], teacher.double(), wide[1], centre,
                                          teacher_prototypes=teacher_prototypes.double(), **kwargs)
    assert loss.dtype == (F64 if dtype == F64 else F32)
    assert_close(loss.detach(), want.detach(), dtype, "cpu/loss")
    assert_close(mean, want_mean, dtype, "cpu/teacher_mean")
    for got, expected in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(want, wide)):
        assert got.dtype == dtype
        assert_close(got, expected, dtype, "cpu/grad")
