"""dino_loss CPU kernels (csrc/cpu/dino_loss.cpp): the two streaming softmax primitives against the float64
kernel-level reference, on the paths that depend on the kernel's tile and chunk rules. test_dino_loss.py holds every
backend to the reference at small shapes; here: several row tiles, key tiles and key chunks with ragged tails (and
R = 1, K = 1, d = 1), the shared keys/values path, fp16/bf16 widened per tile, logits far beyond exp's range and key
tiles whose logits are all -inf (the online softmax's running max), the at::addmm_out GEMM path, bitwise thread-count
independence, and the public dino_loss on the cpu backend (loss and both gradients) against DINO's formula.

Cost: 11 s of test time on 2 cores shared with about 10 busy processes (the largest case is 600 rows x 3000 keys,
d = 16); less on a quiet machine.
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
    """(x [r, d], keys [k, d], values [k, e], bias [k], y [r, e]): unit rows of x and keys (the op's use), values and y
    Gaussian, bias ~ N(0, 4); bias and y in the accumulation dtype. shared: values is keys (e = d), as in the loss."""
    acc = F64 if dtype == F64 else F32
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(r, d, generator=gen, dtype=F64), dim=1).to(dtype)
    keys = F.normalize(torch.randn(k, d, generator=gen, dtype=F64), dim=1).to(dtype)
    values = keys if shared else torch.randn(k, e, generator=gen, dtype=F64).to(dtype)
    bias = (2 * torch.randn(k, generator=gen, dtype=F64)).to(acc)
    y = torch.randn(r, values.shape[1], generator=gen, dtype=F64).to(acc)
    return x, keys, values, bias, y


def run_cpu(x, keys, values, bias, y, scale):
    """(lse, out, columns) of the C++ kernels; columns is fed the reference lse, so that each is checked alone."""
    lse, out = torch.ops.vitfast_C.dino_softmax_rows(x, keys, values, bias, scale)
    want_lse = _reference_softmax_rows(x.double(), keys.double(), values.double(), bias.double(), scale)[0]
    columns = torch.ops.vitfast_C.dino_softmax_columns(x, keys, bias, scale, want_lse.to(bias.dtype), y)
    return lse, out, columns


def check(case, scale, assert_close):
    x, keys, values, bias, y = case
    acc = bias.dtype
    lse, out, columns = run_cpu(x, keys, values, bias, y, scale)
    wide = [t.double() for t in (x, keys, values, bias)]
    want_lse, want_out = _reference_softmax_rows(*wide, scale)
    want_columns = _reference_softmax_columns(wide[0], wide[1], wide[3], scale, want_lse, y.double())
    assert lse.dtype == out.dtype == columns.dtype == acc
    assert lse.shape == want_lse.shape and out.shape == want_out.shape and columns.shape == want_columns.shape
    assert torch.isfinite(out).all() and torch.isfinite(columns).all()
    assert_close(lse, want_lse, x.dtype, "cpu/lse")
    assert_close(out, want_out, x.dtype, "cpu/out")
    assert_close(columns, want_columns, x.dtype, "cpu/columns")


@pytest.mark.parametrize("r, k, d, e", [(1, 1, 1, 1), (1, 1, 5, 3), (7, 3, 4, 5), (300, 1100, 19, 13),
                                        (3, 3000, 8, 6), (600, 600, 16, 16)])
def test_tiles_and_chunks_with_ragged_tails(r, k, d, e, assert_close):
    # 300 rows: 2 row tiles of 150, keys 512 + 512 + 76 in 3 chunks; 3 rows x 3000 keys: 6 chunks of one tile;
    # 600 rows: 3 row tiles of 200, 2 key chunks.
    assert key_chunks(300, 1100) == 3 and key_chunks(3, 3000) == 6 and key_chunks(600, 600) == 2
    check(inputs(r, k, d, e, F32), 25.0, assert_close)


@pytest.mark.parametrize("dtype", [F64, F16, BF16])
@pytest.mark.parametrize("shared", [False, True])
def test_widened_dtypes_and_shared_values(dtype, shared, assert_close):
    # fp16/bf16 keys and values widened per key tile (once when values is keys); fp64 in fp64 throughout. The
    # reference takes the same rounded inputs in float64: only the kernel's accumulation error remains.
    check(inputs(300, 1100, 19, 13, dtype, shared=shared), 10.0, assert_close)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_large_logits_and_masked_key_tiles(dtype, assert_close):
    # scale 100 on unit rows: |z| up to 100 + bias, past exp's fp32 range without the running max. Keys 0..599 have
    # bias -inf: the first key tile of every row (and all of chunk 0) has no finite logit, then the max jumps.
    x, keys, values, bias, y = inputs(40, 1600, 8, 5, dtype)
    bias[:600] = float("-inf")
    check((x, keys, values, bias, y), 100.0, assert_close)


def test_gemm_through_aten(monkeypatch, assert_close):
    monkeypatch.setenv("VITFAST_CPU_GEMM", "aten")
    check(inputs(300, 1100, 10, 7, F32), 25.0, assert_close)


def test_thread_count_does_not_change_bits(threads):
    # 600 rows x 3000 keys: 3 row tiles x 6 key chunks = 18 rows items; 6 key tiles for the columns.
    case = inputs(600, 3000, 16, 16, F32)
    results = []
    for n in (1, 2, 3):
        threads(n)
        results.append(run_cpu(*case, 25.0))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


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
