"""relation_loss: every backend against the reference, targets, masks, smoothing, gradients, registration, errors.

Under the Triton interpreter (no GPU) the triton backend runs on CPU tensors: batches stay small (B = 1 for the
14x14 and 16x16 grids) so that the whole file runs in about a minute on 2 cores.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vitfast.ops import relation_logits, relation_loss, relation_loss_reference, relation_targets
from vitfast.ops.relation_loss import BACKENDS

# (B, N, S, d_h, layout, options). layout: "identity" (positions None, N = S*S), "shuffled" (a permutation of the
# grid), "subset" (N of the S*S cells, DILEMMA-style, in random order). options: "mask" (a random [B, N, N] pair
# mask), "offdiag" (an [N, N] mask without the diagonal) and "smooth" (label smoothing 0.1).
SHAPES = [
    (3, 49, 7, 42, "identity", ()),                 # 7x7, ViT-S d_h
    (2, 64, 8, 85, "shuffled", ("mask",)),          # 8x8, ViT-B d_h (two 64-wide d chunks in Triton)
    (1, 196, 14, 42, "shuffled", ("offdiag", "smooth")),  # 14x14: several tiles and j-loops, ragged last tile
    (1, 256, 16, 42, "identity", ("smooth",)),     # 16x16
    (2, 37, 8, 20, "subset", ("mask", "smooth")),   # 37 tokens drawn from an 8x8 grid, d_h < 32
]


def shape_id(shape):
    batch, n, side, d_h, layout, options = shape
    return f"B{batch}N{n}S{side}d{d_h}-{layout}" + "".join("-" + o for o in options)


def make_inputs(shape, dtype, device, seed=0, classes=9):
    batch, n, side, d_h, layout, options = shape
    gen = torch.Generator().manual_seed(seed)
    # Scaled so that the softmax over classes is neither flat nor one-hot.
    q = (torch.randn(batch, n, classes, d_h, generator=gen) * 1.5).to(dtype=dtype, device=device)
    k = (torch.randn(batch, n, classes, d_h, generator=gen) * 1.5).to(dtype=dtype, device=device)
    if layout == "identity":
        positions = None
    else:
        positions = torch.stack([torch.randperm(side * side, generator=gen)[:n] for _ in range(batch)]).to(device)
    kwargs = dict(positions=positions, grid_size=side)
    if "mask" in options:
        kwargs["pair_mask"] = (torch.rand(batch, n, n, generator=gen) < 0.6).to(device)
    if "offdiag" in options:
        kwargs["pair_mask"] = ~torch.eye(n, dtype=torch.bool, device=device)
    if "smooth" in options:
        kwargs["label_smoothing"] = 0.1
    return q, k, kwargs


def selected_pairs(q, kwargs):
    batch, n = q.shape[:2]
    mask = kwargs.get("pair_mask")
    return batch * n * n if mask is None else int(mask.expand(batch, n, n).sum())


def reference_with_grads(q, k, kwargs, grad):
    """Loss, accuracy and gradients of the reference in float64 on the CPU."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k)]
    cpu_kwargs = {key: (v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in kwargs.items()}
    positions = cpu_kwargs.pop("positions", None)
    loss, accuracy = relation_loss_reference(*leaves, positions, return_accuracy=True, **cpu_kwargs)
    return (loss, accuracy, *torch.autograd.grad(loss, leaves, grad))


def backend_cases():
    cases = []
    for backend in ("cpu", "torch", "triton"):
        for dtype in (torch.float32, torch.float16) + ((torch.bfloat16,) if backend != "torch" else ()):
            cases.append((backend, dtype))
    return cases


INTERPRETED = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_shape(backend, shape):
    """Under the Triton interpreter every program costs about (N / 32)^2 * C interpreted tile steps: the triton
    backend gets B = 1 and, on the 14x14 and 16x16 grids, a subset of 64 tokens of the grid (positions up to S*S - 1,
    as with MAE / DILEMMA masking). Multi-tile and ragged-tail paths stay covered (N = 37, 49, 64)."""
    if backend != "triton" or not INTERPRETED:
        return shape
    batch, n, side, d_h, layout, options = shape
    return (1, min(n, 64), side, d_h, "subset" if n > 64 else layout, options)


def skip_unless_runs(backend, device):
    if not BACKENDS.runs_on(backend, device):
        pytest.skip(f"backend {backend} cannot run on {device} here (needs a GPU, the interpreter or the build)")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend,dtype", backend_cases(), ids=lambda v: str(v).replace("torch.", ""))
def test_backend_matches_reference(backend, dtype, shape, assert_close, backend_device):
    device = backend_device(backend)
    skip_unless_runs(backend, device)
    q, k, kwargs = make_inputs(interpreter_shape(backend, shape), dtype, device)
    q.requires_grad_(), k.requires_grad_()
    positions = kwargs.pop("positions")
    loss, accuracy = relation_loss(q, k, positions, return_accuracy=True, backend=backend, **kwargs)
    kwargs["positions"] = positions
    assert loss.dtype == torch.float32 and loss.shape == () and accuracy.dtype == torch.float32
    assert not accuracy.requires_grad
    # d(count * loss): gradients of the pair *sum*, O(1) per element, so the tolerances mean something.
    grad = torch.tensor(float(selected_pairs(q, kwargs)), device=device)
    d_q, d_k = torch.autograd.grad(loss, (q, k), grad)
    want_loss, want_accuracy, want_q, want_k = reference_with_grads(q, k, kwargs, grad.double().cpu())
    assert_close(loss.detach().cpu(), want_loss, dtype, f"{backend}/loss")
    # Accuracy: argmax ties and near-ties may flip under rounding; allow a few pairs in fp16/bf16.
    slack = 0.0 if dtype == torch.float32 else 0.01
    assert abs(accuracy.item() - want_accuracy.item()) <= slack + 1e-6, (accuracy, want_accuracy)
    for name, actual, want in (("d_q", d_q, want_q), ("d_k", d_k, want_k)):
        assert actual.dtype == dtype and actual.shape == want.shape, name
        assert_close(actual.cpu(), want, dtype, f"{backend}/{name}")


# ---- targets: RelViT's direction classes ----

LABELS = ["LU", "CU", "RU", "LC", "CC", "RC", "LD", "CD", "RD"]  # RelViT's class order (3 * vertical + horizontal)


def test_targets_match_a_literal_double_loop_on_3x3():
    """target(i, j) = where token i lies relative to token j, written out cell by cell."""
    side = 3
    expected = torch.empty(9, 9, dtype=torch.int64)
    for i in range(9):
        for j in range(9):
            row_i, col_i, row_j, col_j = i // side, i % side, j // side, j % side
            vertical = "U" if row_i < row_j else ("C" if row_i == row_j else "D")
            horizontal = "L" if col_i < col_j else ("C" if col_i == col_j else "R")
            expected[i, j] = LABELS.index(horizontal + vertical)
    got = relation_targets(torch.arange(9).unsqueeze(0), side)[0]
    assert torch.equal(got, expected)
    assert (got.diagonal() == 4).all() and (got == 4).sum() == 9  # "same cell" only on the diagonal
    assert got[0, 8] == 0 and got[8, 0] == 8 and got[1, 4] == 1 and got[3, 4] == 3  # corner/edge spot checks


def official_connectivity(patch_flat: np.ndarray) -> np.ndarray:
    """RelViT's released label construction (datasets/encode_locations.py), restated: a (2S-1)^2 board of the
    3 x 3 direction classes centred on the query cell, one window per cell, transposed, then indexed by the
    original cells of the (shuffled) tokens."""
    num = len(patch_flat)
    side = int(round(num ** 0.5))
    corner = side - 1
    blocks = np.arange(9).reshape(3, 3)
    spans = [corner, 1, corner]
    board = np.block([[np.full((spans[a], spans[b]), blocks[a, b]) for b in range(3)] for a in range(3)])
    conn = np.empty((num, num), dtype=np.int64)
    for row in range(side):
        for col in range(side):
            window = board[corner - row: corner - row + side, corner - col: corner - col + side]
            conn[row * side + col] = window.reshape(-1)
    conn = conn.T
    return conn[patch_flat][:, patch_flat]


@pytest.mark.parametrize("side", [3, 4, 7])
def test_targets_match_relvit_official_construction(side):
    gen = torch.Generator().manual_seed(side)
    positions = torch.stack([torch.arange(side * side), torch.randperm(side * side, generator=gen)])
    got = relation_targets(positions, side)
    for b in range(2):
        want = torch.from_numpy(official_connectivity(positions[b].numpy()))
        assert torch.equal(got[b], want)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_kernel_targets_equal_explicit_targets(backend, backend_device):
    """The targets computed inside the kernels from positions equal relation_targets passed explicitly."""
    device = backend_device(backend)
    skip_unless_runs(backend, device)
    q, k, kwargs = make_inputs((2, 37, 8, 20, "subset", ()), torch.float32, device, seed=3)
    from_positions = relation_loss(q, k, kwargs["positions"], grid_size=8, return_accuracy=True, backend=backend)
    targets = relation_targets(kwargs["positions"], 8)
    explicit = relation_loss(q, k, targets=targets, return_accuracy=True, backend=backend)
    for a, b in zip(from_positions, explicit):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_explicit_targets_with_other_class_counts(backend, assert_close, backend_device):
    device = backend_device(backend)
    skip_unless_runs(backend, device)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 20, 5, 12, generator=gen).to(device).requires_grad_()
    k = torch.randn(2, 20, 5, 12, generator=gen).to(device).requires_grad_()
    targets = torch.randint(0, 5, (2, 20, 20), generator=gen).to(device)
    mask = (torch.rand(20, 20, generator=gen) < 0.5).to(device)
    loss, accuracy = relation_loss(q, k, targets=targets, pair_mask=mask, label_smoothing=0.2, return_accuracy=True,
                                   backend=backend)
    grads = torch.autograd.grad(loss, (q, k))
    leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k)]
    want, want_accuracy = relation_loss_reference(*leaves, targets=targets.cpu(), pair_mask=mask.cpu(),
                                                  label_smoothing=0.2, return_accuracy=True)
    assert_close(loss.detach().cpu(), want, torch.float32, "loss")
    assert accuracy.item() == pytest.approx(want_accuracy.item(), abs=1e-6)
    for got, expected in zip(grads, torch.autograd.grad(want, leaves)):
        assert_close(got.cpu() * 1e3, expected * 1e3, torch.float32, "grad")


# ---- reductions: masks, ties, smoothing, the official loss ----

@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_empty_pair_mask_gives_zero(backend, backend_device):
    device = backend_device(backend)
    skip_unless_runs(backend, device)
    q, k, _ = make_inputs((2, 16, 4, 8, "identity", ()), torch.float32, device)
    q.requires_grad_()
    mask = torch.zeros(16, 16, dtype=torch.bool, device=device)
    loss, accuracy = relation_loss(q, k, pair_mask=mask, return_accuracy=True, backend=backend)
    assert loss.item() == 0.0 and accuracy.item() == 0.0
    (d_q,) = torch.autograd.grad(loss, (q,))
    assert torch.equal(d_q, torch.zeros_like(d_q))


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_ties_pick_the_first_class(backend, backend_device):
    """All logits 0: the argmax is class 0 (as torch.argmax), so accuracy = share of 'left-up' pairs; loss = ln 9."""
    device = backend_device(backend)
    skip_unless_runs(backend, device)
    q = torch.zeros(1, 16, 9, 8, device=device)
    loss, accuracy = relation_loss(q, q, return_accuracy=True, backend=backend)
    targets = relation_targets(torch.arange(16).unsqueeze(0), 4)
    assert accuracy.item() == pytest.approx((targets == 0).float().mean().item(), abs=1e-7)
    assert loss.item() == pytest.approx(float(np.log(9.0)), rel=1e-6)


def test_reference_is_relvit_cross_entropy():
    """RelViT: F.cross_entropy(logits [B, 9, N, N], labels [B, N, N]) (mean over all B*N*N pairs, diagonal included);
    with smooth_rel: (1 - eps) * nll + eps * mean over classes of -log_softmax, averaged over pairs."""
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 16, 9, 6, generator=gen, dtype=torch.float64), torch.randn(2, 16, 9, 6, generator=gen,
                                                                                     dtype=torch.float64)
    positions = torch.stack([torch.randperm(16, generator=gen) for _ in range(2)])
    # One bias-free head per class (RelViT's MultiHeadAttentionScores): scores q_c k_c^T / sqrt(d_h).
    logits = torch.stack([torch.stack([q[b, :, c] @ k[b, :, c].T for c in range(9)]) for b in range(2)]) / 6 ** 0.5
    labels = relation_targets(positions, 4)
    torch.testing.assert_close(relation_logits(q, k), logits)
    torch.testing.assert_close(relation_loss_reference(q, k, positions, grid_size=4), F.cross_entropy(logits, labels))
    eps = 0.1
    log_probs = F.log_softmax(logits, dim=1)
    nll = -log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
    official = ((1 - eps) * nll + eps * (-log_probs.mean(1))).mean()
    torch.testing.assert_close(relation_loss_reference(q, k, positions, grid_size=4, label_smoothing=eps), official)
    accuracy = (F.softmax(logits, 1).argmax(1) == labels).float().mean()
    torch.testing.assert_close(relation_loss_reference(q, k, positions, grid_size=4, return_accuracy=True)[1],
                               accuracy)


def test_batched_and_shared_masks_agree():
    q, k, kwargs = make_inputs((3, 25, 5, 10, "shuffled", ()), torch.float64, "cpu")
    mask = torch.rand(25, 25, generator=torch.Generator().manual_seed(1)) < 0.5
    for backend in ("cpu", "torch"):
        shared = relation_loss(q, k, kwargs["positions"], grid_size=5, pair_mask=mask, backend=backend)
        batched = relation_loss(q, k, kwargs["positions"], grid_size=5, pair_mask=mask.expand(3, 25, 25).clone(),
                                backend=backend)
        torch.testing.assert_close(shared, batched)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), side=st.integers(1, 6), d_h=st.integers(1, 9), data=st.data())
def test_cpu_backend_property(batch, side, d_h, data):
    """Any grid, token subset (duplicated cells allowed), class count, mask and smoothing: CPU equals the reference."""
    n = data.draw(st.integers(1, side * side + 2))
    explicit = data.draw(st.booleans())
    classes = data.draw(st.integers(2, 6)) if explicit else 9
    gen = torch.Generator().manual_seed(n * 31 + classes)
    q = torch.randn(batch, n, classes, d_h, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, n, classes, d_h, generator=gen, dtype=torch.float64, requires_grad=True)
    kwargs = dict(label_smoothing=data.draw(st.sampled_from([0.0, 0.3])))
    if explicit:
        kwargs["targets"] = torch.randint(0, classes, (batch, n, n), generator=gen)
    else:
        kwargs["positions"] = torch.randint(0, side * side, (batch, n), generator=gen)
        kwargs["grid_size"] = side
    mask_kind = data.draw(st.sampled_from(["none", "shared", "batched"]))
    if mask_kind != "none":
        shape = (n, n) if mask_kind == "shared" else (batch, n, n)
        kwargs["pair_mask"] = torch.rand(shape, generator=gen) < data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    out, accuracy = relation_loss(q, k, backend="cpu", return_accuracy=True, **kwargs)
    want, want_accuracy = relation_loss_reference(q, k, return_accuracy=True, **kwargs)
    torch.testing.assert_close(out, want)
    assert accuracy.item() == pytest.approx(want_accuracy.item(), abs=1e-6)
    for a, b in zip(torch.autograd.grad(out, (q, k)), torch.autograd.grad(want, (q, k))):
        torch.testing.assert_close(a, b)


# ---- gradients ----

@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("options", [(), ("mask", "smooth")], ids=["plain", "mask-smooth"])
def test_gradcheck_float64(backend, options):
    q, k, kwargs = make_inputs((1, 9, 3, 2, "shuffled", options), torch.float64, "cpu")
    q.requires_grad_(), k.requires_grad_()
    positions = kwargs.pop("positions")
    fn = lambda a, b: relation_loss(a, b, positions, backend=backend, **kwargs)
    assert torch.autograd.gradcheck(fn, (q, k))


def test_reference_backward_matches_autograd(assert_close):
    """The torch backend's closed-form backward equals autograd through the reference."""
    q, k, kwargs = make_inputs((2, 25, 5, 7, "subset", ("mask", "smooth")), torch.float64, "cpu")
    q.requires_grad_(), k.requires_grad_()
    positions = kwargs.pop("positions")
    ours = torch.autograd.grad(relation_loss(q, k, positions, backend="torch", **kwargs), (q, k))
    theirs = torch.autograd.grad(relation_loss_reference(q, k, positions, **kwargs), (q, k))
    for a, b in zip(ours, theirs):
        assert_close(a, b, torch.float64, "grad")


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_partial_gradients(backend, assert_close, backend_device):
    """Only the asked-for gradient is computed (k frozen / q frozen), and it is right."""
    device = backend_device(backend)
    skip_unless_runs(backend, device)
    q, k, kwargs = make_inputs((2, 30, 6, 12, "subset", ("mask",)), torch.float32, device)
    positions = kwargs.pop("positions")
    leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k)]
    want = torch.autograd.grad(relation_loss_reference(*leaves, positions.cpu(), grid_size=6,
                                                       pair_mask=kwargs["pair_mask"].cpu()), leaves)
    for index in (0, 1):
        inputs = [q.detach(), k.detach()]
        inputs[index].requires_grad_()
        loss = relation_loss(*inputs, positions, backend=backend, **kwargs)
        (grad,) = torch.autograd.grad(loss, (inputs[index],))
        assert_close(grad.cpu() * 1e3, want[index] * 1e3, torch.float32, f"grad {index}")


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_work_splits_agree_and_are_deterministic(threads):
    """Backward work items are whole batch elements when B >= threads, else (b, tile) with dK partials: both equal
    the reference, and reruns are bitwise equal."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch in (1, 3):
            q, k, kwargs = make_inputs((batch, 196, 14, 42, "shuffled", ("mask",)), torch.float32, "cpu", seed=7)
            q.requires_grad_(), k.requires_grad_()
            positions = kwargs.pop("positions")
            runs = [torch.autograd.grad(relation_loss(q, k, positions, backend="cpu", **kwargs), (q, k)) for _ in "ab"]
            for a, b in zip(*runs):
                assert torch.equal(a, b)
            leaves = [t.detach().double().requires_grad_() for t in (q, k)]
            want = torch.autograd.grad(relation_loss_reference(*leaves, positions, **kwargs), leaves)
            for got, expected in zip(runs[0], want):
                torch.testing.assert_close(got.double() * 1e4, expected * 1e4, atol=1e-4, rtol=1e-4)
    finally:
        torch.set_num_threads(before)


def test_cpu_aten_gemm_fallback():
    """VITFAST_CPU_GEMM=aten routes the tile GEMMs through at::addmm_out (builds without a Fortran BLAS symbol)."""
    script = (
        "import torch; from vitfast.ops import relation_loss, relation_loss_reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q = torch.randn(2, 49, 9, 42, generator=g, requires_grad=True); k = torch.randn(2, 49, 9, 42, generator=g)\n"
        "k.requires_grad_(); pos = torch.stack([torch.randperm(64, generator=g)[:49] for _ in range(2)])\n"
        "a = relation_loss(q, k, pos, grid_size=8, backend='cpu'); ga = torch.autograd.grad(a, (q, k))\n"
        "b = relation_loss_reference(q, k, pos, grid_size=8); gb = torch.autograd.grad(b, (q, k))\n"
        "torch.testing.assert_close(a, b); [torch.testing.assert_close(x, y) for x, y in zip(ga, gb)]\n"
        "print('ok')\n")
    env = dict(os.environ, VITFAST_CPU_GEMM="aten")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# ---- registration: opcheck, torch.compile, autocast ----

@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_opcheck(backend):
    q, k, kwargs = make_inputs((2, 16, 5, 6, "subset", ("mask",)), torch.float32, "cpu")
    q.requires_grad_(), k.requires_grad_()
    args = (q, k, kwargs["positions"], None, kwargs["pair_mask"], 5, 0.1, backend)
    torch.library.opcheck(torch.ops.vitfast.relation_loss.default, args)
    targets = relation_targets(kwargs["positions"], 5)
    torch.library.opcheck(torch.ops.vitfast.relation_loss.default, (q, k, None, targets, None, 0, 0.0, backend))


def test_torch_compile_matches_eager(assert_close):
    q, k, kwargs = make_inputs((2, 36, 6, 10, "shuffled", ("mask", "smooth")), torch.float32, "cpu")
    q.requires_grad_(), k.requires_grad_()
    fn = lambda a, b, positions, mask: relation_loss(a, b, positions, grid_size=6, pair_mask=mask,
                                                     label_smoothing=0.1, backend="cpu")
    eager = fn(q, k, kwargs["positions"], kwargs["pair_mask"])
    eager_grads = torch.autograd.grad(eager, (q, k))
    compiled = torch.compile(fn, fullgraph=True)
    out = compiled(q, k, kwargs["positions"], kwargs["pair_mask"])
    for a, b in zip((out, *torch.autograd.grad(out, (q, k))), (eager, *eager_grads)):
        assert_close(a * 1e3, b * 1e3, torch.float32, "compiled")


def test_autocast_casts_to_autocast_dtype():
    q, k, kwargs = make_inputs((2, 16, 4, 8, "identity", ()), torch.float32, "cpu")
    q.requires_grad_(), k.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = relation_loss(q, k)
    assert loss.dtype == torch.float32
    loss.backward()
    assert q.grad.dtype == torch.float32 and k.grad.dtype == torch.float32


def test_no_grad_and_logits():
    q, k, _ = make_inputs((2, 16, 4, 8, "identity", ()), torch.float32, "cpu")
    with torch.no_grad():
        loss = relation_loss(q, k)
    logits = relation_logits(q, k)
    assert logits.shape == (2, 9, 16, 16)
    want = F.cross_entropy(logits, relation_targets(torch.arange(16).expand(2, 16), 4))
    torch.testing.assert_close(loss, want)


# ---- argument errors name the argument, the expectation and what arrived ----

def _good():
    q, k, kwargs = make_inputs((2, 16, 5, 6, "subset", ()), torch.float32, "cpu")
    return dict(q=q, k=k, positions=kwargs["positions"], grid_size=5)


@pytest.mark.parametrize("change,message", [
    (dict(q=torch.randn(2, 16, 9)), "q must be float16/bfloat16/float32/float64 [B, N, C, d_h]"),
    (dict(k=torch.randn(2, 15, 9, 6)), "k must be float16/bfloat16/float32/float64 [B, N, C, d_h] with N = 16"),
    (dict(k=torch.randn(2, 16, 9, 6, dtype=torch.float64)), "k must have the dtype of q"),
    (dict(positions=torch.zeros(2, 16)), "positions must be int64 [B, N] with values in [0, 25), got float32 [2, 16]"),
    (dict(positions=torch.full((2, 16), 25)),
     "positions must be int64 [B, N] with values in [0, 25), got values in [25, 25]"),
    (dict(grid_size=None), "grid_size (the side S of the token grid) is required with positions"),
    (dict(grid_size=0), "grid_size must be a positive int"),
    (dict(q=torch.randn(2, 16, 5, 6), k=torch.randn(2, 16, 5, 6)), "direction targets from positions have 9 classes"),
    (dict(pair_mask=torch.ones(16, 16)), "pair_mask must be bool [N, N]"),
    (dict(pair_mask=torch.ones(3, 16, 16, dtype=torch.bool)), "pair_mask must be bool [B, N, N] with B = 2"),
    (dict(label_smoothing=1.5), "label_smoothing must be in [0, 1]"),
    (dict(targets=torch.zeros(2, 16, 16, dtype=torch.int64)), "pass either positions"),
    (dict(positions=None, grid_size=None, targets=torch.full((2, 16, 16), 9)),
     "targets must be int64 [B, N, N] with values in [0, 9), got values in [9, 9]"),
    (dict(positions=None, grid_size=None, q=torch.randn(2, 15, 9, 6), k=torch.randn(2, 15, 9, 6)),
     "N = 15 tokens is not a square grid; pass grid_size"),
    (dict(positions=None, grid_size=3), "N = 16 tokens do not fit a 3x3 grid"),
    (dict(q=torch.randn(2, 16, 1, 6), k=torch.randn(2, 16, 1, 6)), "C >= 2 classes"),
])
def test_bad_arguments_are_named(change, message):
    args = {**_good(), **change}
    with pytest.raises(ValueError) as error:
        relation_loss(**args)
    assert message in str(error.value), str(error.value)
    assert str(error.value).startswith("vitfast.ops.relation_loss: ")
# ---- the Triton kernels: branches the grid above does not reach, saved state, launch tables ----

def _triton_kernels():
    pytest.importorskip("triton")
    from vitfast.kernels import relation_loss as kernels
    return kernels


@pytest.mark.parametrize("case", ["tf32", "wide-head"])
def test_triton_other_branches(case, assert_close, backend_device, request):
    """fp32 dots as TF32 (matmul precision "high"; exact fp32 under the interpreter), and d_h > 128, which runs two
    128-wide d chunks per own tile in the backward. Against the reference, with the tolerance of each."""
    device = backend_device("triton")
    skip_unless_runs("triton", device)
    d_h = 130 if case == "wide-head" else 12
    if case == "tf32":
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        request.addfinalizer(lambda: torch.set_float32_matmul_precision(before))
        assert _triton_kernels()._scalars(torch.empty(1, 1, 9, d_h), 0.0)["INPUT_PRECISION"] == "tf32"
    q, k, kwargs = make_inputs((1, 20, 5, d_h, "subset", ("mask",)), torch.float32, device)
    q.requires_grad_(), k.requires_grad_()
    positions = kwargs.pop("positions")
    loss = relation_loss(q, k, positions, backend="triton", **kwargs)
    grad = torch.tensor(float(selected_pairs(q, kwargs)), device=device)
    grads = torch.autograd.grad(loss, (q, k), grad)
    want_loss, _, *want_grads = reference_with_grads(q, k, dict(kwargs, positions=positions), grad.double().cpu())
    # TF32 on a GPU rounds the dot inputs to 10 mantissa bits: the fp16 tolerance
    dtype = torch.float16 if case == "tf32" and torch.cuda.is_available() else torch.float32
    assert_close(loss.detach().cpu(), want_loss, dtype, "loss")
    for got, want in zip(grads, want_grads):
        assert_close(got.cpu(), want, dtype, "grad")


def test_triton_saved_state_and_determinism(backend_device):
    """The forward saves each pair's log-sum-exp (log2 units) and target (-1 off the selection) and q, k packed
    class-major with zero padding; the backward reads those (not positions or the mask) and is bitwise repeatable."""
    device = backend_device("triton")
    skip_unless_runs("triton", device)
    kernels = _triton_kernels()
    q, k, kwargs = make_inputs((2, 24, 5, 20, "subset", ("mask",)), torch.float16, device, seed=4)
    positions, mask = kwargs["positions"], kwargs["pair_mask"]
    loss, accuracy, count, lse, target, q_packed, k_packed = kernels.relation_loss_forward(
        q, k, positions, None, mask, 5, 0.0)
    assert [tuple(t.shape) for t in (lse, target, q_packed)] == [(2, 24, 24), (2, 24, 24), (2, 9, 24, 64)]
    logits = relation_logits(q.double(), k.double())
    torch.testing.assert_close(lse.double(), logits.logsumexp(1) / np.log(2.0), atol=1e-4, rtol=1e-4)
    want_target = torch.where(mask, relation_targets(positions, 5), -1)
    assert target.dtype == torch.int16 and torch.equal(target.long(), want_target)
    assert torch.equal(q_packed[..., :20], q.permute(0, 2, 1, 3)) and not q_packed[..., 20:].any()
    assert count.item() == mask.sum().item()
    runs = [kernels.relation_loss_backward(torch.tensor(2.0, device=device), count, q, k, None, None, None, 0, 0.0,
                                           [True, True], lse, target, q_packed, k_packed) for _ in range(2)]
    for a, b in zip(*runs):
        assert a.dtype == torch.float16 and a.shape == q.shape and torch.equal(a, b)
    only_k = kernels.relation_loss_backward(torch.tensor(2.0, device=device), count, q, k, None, None, None, 0, 0.0,
                                            [False, True], lse, target, q_packed, k_packed)
    assert only_k[0] is None and torch.equal(only_k[1], runs[0][1])


def test_triton_opcheck(backend_device):
    """The registration with the triton backend's saved state (fake shapes, schema, autograd) passes opcheck."""
    device = backend_device("triton")
    skip_unless_runs("triton", device)
    q, k, kwargs = make_inputs((1, 9, 3, 6, "subset", ("mask",)), torch.float32, device)
    q.requires_grad_(), k.requires_grad_()
    args = (q, k, kwargs["positions"], None, kwargs["pair_mask"], 3, 0.1, "triton")
    torch.library.opcheck(torch.ops.vitfast.relation_loss.default, args)


def test_triton_aot_specs_cover_the_launch_tables():
    """AOT_SPECS hold every kernel x dtype x precision x BLOCK_D candidate, with the launchers' tables."""
    kernels = _triton_kernels()
    tables = {"_relation_fwd_kernel": kernels.FORWARD_CONFIG, "_relation_bwd_kernel": kernels.BACKWARD_CONFIG}
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    seen = set()
    for spec in kernels.AOT_SPECS:
        dtype = dtypes[spec.variant.split("-")[0].split(" ")[0]]
        cfg = tables[spec.name][spec.constexprs["BLOCK_D"]][dtype]
        assert {key: spec.constexprs[key] for key in cfg if key.startswith("BLOCK_")} == \
            {key: value for key, value in cfg.items() if key.startswith("BLOCK_")}, spec.variant
        assert (spec.num_warps, spec.num_stages) == (cfg["num_warps"], cfg["num_stages"]), spec.variant
        assert spec.tensor_cores == (dtype != torch.float32 or "tf32" in spec.variant)
        seen.add((spec.name, dtype, spec.constexprs["INPUT_PRECISION"], spec.constexprs["BLOCK_D"],
                  spec.constexprs.get("KEYS")))
    want = {(name, dtype, precision, block, keys) for name in tables for block in kernels.BLOCK_D_CANDIDATES
            for dtype, precision in ((torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float16, "tf32"),
                                     (torch.bfloat16, "tf32"))
            for keys in ((None,) if name == "_relation_fwd_kernel" else (False, True))}
    assert seen == want
    # every head width picks one of the candidates, and the tested shapes (d_h 12, 20, 42, 85, 130) reach both
    assert [kernels.block_d(d) for d in (12, 20, 42, 64, 65, 85, 130)] == [64] * 4 + [128] * 3
