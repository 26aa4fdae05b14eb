"""kernels/_common.py: the @triton.jit pair-tile helpers (under the interpreter without a GPU) against torch, and the
launch helpers. About 5 s on 2 cores."""
import math

import pytest
import torch

from vitfast.ops import relation_targets

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
common = pytest.importorskip("vitfast.kernels._common")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _lse_rows_kernel(s_ptr, out_ptr, N, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    # out[i] = log2 sum_j 2^s[i, j] over column tiles; -inf entries are absent columns
    offs_i = tl.arange(0, BLOCK_I)
    m = tl.full((BLOCK_I,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        s = tl.load(s_ptr + offs_i[:, None] * N + offs_j[None, :], mask=(offs_j < N)[None, :], other=float("-inf"))
        m, l = common.online_lse_rows(m, l, s)
    tl.store(out_ptr + offs_i, m + tl.log2(l))


@triton.jit
def _lse_elementwise_kernel(s_ptr, out_ptr, K, BLOCK: tl.constexpr):
    # out[e] = log2 sum_k 2^s[k, e], one score tile per k
    offs = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, K):
        m, l = common.online_lse(m, l, tl.load(s_ptr + k * BLOCK + offs))
    tl.store(out_ptr + offs, m + tl.log2(l))


@triton.jit
def _directions_kernel(pos_ptr, mask_ptr, out_ptr, N, S, mask_batch_stride, HAS_MASK: tl.constexpr,
                       BLOCK: tl.constexpr):
    # out[b, i, j] = direction class of (i, j), -1 where the pair is not selected
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    d_row, d_col = common.grid_offsets(pos_ptr, b, offs, offs, N, S)
    chosen = common.pair_selection(mask_ptr, b, offs, offs, N, mask_batch_stride, HAS_MASK)
    target = tl.where(chosen, common.direction_class(d_row, d_col), -1)
    tl.store(out_ptr + b * N * N + offs[:, None] * N + offs[None, :], target,
             mask=(offs < N)[:, None] & (offs < N)[None, :])


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log2(0) = -inf for the empty row: intended
def test_online_lse_rows_over_column_tiles():
    """Three column tiles (the last ragged) and a row whose every column is absent (-inf): no NaN, -inf out."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(16, 37, generator=gen) * 8
    scores[3] = float("-inf")
    scores[5, :20] = float("-inf")
    out = torch.empty(16, device=DEVICE)
    _lse_rows_kernel[(1,)](scores.to(DEVICE), out, 37, BLOCK_I=16, BLOCK_J=16)
    want = (scores.double() * math.log(2.0)).logsumexp(1) / math.log(2.0)  # log2 sum_j 2^s
    assert out[3].item() == float("-inf")
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-6, atol=1e-6)


def test_online_lse_elementwise():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(9, 32, generator=gen) * 20
    out = torch.empty(32, device=DEVICE)
    _lse_elementwise_kernel[(1,)](scores.to(DEVICE), out, 9, BLOCK=32)
    want = (scores.double() * math.log(2.0)).logsumexp(0) / math.log(2.0)
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mask", ["none", "shared", "batched"])
def test_direction_classes_and_pair_selection(mask):
    """Direction classes of a token subset of a 5 x 5 grid equal relation_targets; the mask selects pairs."""
    gen = torch.Generator().manual_seed(2)
    positions = torch.stack([torch.randperm(25, generator=gen)[:13] for _ in range(2)])
    pair_mask = {"none": None, "shared": torch.rand(13, 13, generator=gen) < 0.5,
                 "batched": torch.rand(2, 13, 13, generator=gen) < 0.5}[mask]
    out = torch.empty(2, 13, 13, dtype=torch.int32, device=DEVICE)
    _directions_kernel[(2,)](positions.to(DEVICE), (pair_mask if pair_mask is not None else positions).to(DEVICE),
                             out, 13, 5, 13 * 13 if mask == "batched" else 0, HAS_MASK=pair_mask is not None,
                             BLOCK=16)
    want = relation_targets(positions, 5)
    if pair_mask is not None:
        want = torch.where(pair_mask, want, -1)
    assert torch.equal(out.cpu().long(), want)


def test_launch_device_follows_the_tensor(monkeypatch):
    """CUDA tensors launch under their own device (not the current one); CPU tensors (interpreter) need nothing."""
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or "context")

    class OnSecondGpu:
        is_cuda = True
        device = torch.device("cuda", 1)

    assert common.launch_device(OnSecondGpu()) == "context" and entered == [torch.device("cuda", 1)]
    with common.launch_device(torch.zeros(1)):
        pass
    assert len(entered) == 1


def test_input_precision_follows_the_matmul_setting(request):
    before = torch.get_float32_matmul_precision()
    request.addfinalizer(lambda: torch.set_float32_matmul_precision(before))
    torch.set_float32_matmul_precision("highest")
    assert [common.input_precision(d) for d in (torch.float32, torch.float16)] == ["ieee", "tf32"]
    torch.set_float32_matmul_precision("high")
    assert common.input_precision(torch.float32) == "tf32"
