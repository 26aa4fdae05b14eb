"""contrastive_loss: every backend against the reference (values, gradients, saved statistics) for every positive
mode, the reference against SupCon's and SimCLR's formulas written out, edge cases, registration and errors.

Backends join by themselves: a case runs where ``BACKENDS.runs_on`` says the backend runs here and (triton) its
kernel module imports; otherwise it is skipped with the reason. Under the Triton interpreter (no GPU) the triton
backend gets the small cases only. The 2-process tests are in tests/test_contrastive_distributed.py, the modules'
in tests/test_contrastive_modules.py.
"""
import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vitfast.ops import contrastive_loss, contrastive_loss_reference
from vitfast.ops.contrastive_loss import BACKENDS

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
INTERPRETED = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# (name, mode, B, D, labels): mode "labels1" is positives="labels" with one view (k=None); labels "few" draws from
# 3 classes (several positives per anchor), "singletons" leaves some classes with one image (anchors without a
# positive in one view; across two views each still has its other view).
CASES = [
    ("diag-B5D17", "diagonal", 5, 17, None),
    ("ntxent-B6D33", "ntxent", 6, 33, None),
    ("labels-B7D20-few", "labels", 7, 20, "few"),
    ("labels1-B9D12-singletons", "labels1", 9, 12, "singletons"),
    ("labels-B8D9-singletons", "labels", 8, 9, "singletons"),
    ("diag-B1D8", "diagonal", 1, 8, None),
    ("ntxent-B1D5", "ntxent", 1, 5, None),
    ("labels1-B1D6", "labels1", 1, 6, "few"),
    # Several tiles of rows and columns with ragged tails (64-wide tiles: 2B = 146 pool rows), D over one chunk.
    ("ntxent-B73D130", "ntxent", 73, 130, None),
    ("labels-B70D67-few", "labels", 70, 67, "few"),
    ("diag-B67D40", "diagonal", 67, 40, None),
]
TRITON_MAX_ROWS = 40  # interpreter: the B >= 67 cases are for the compiled backends


def triton_module_missing():
    try:
        importlib.import_module(BACKENDS.triton[0])
    except ImportError as error:
        return str(error)
    return None


def skip_unless_runs(backend, dtype=None, device=torch.device("cpu")):
    if not BACKENDS.runs_on(backend, device, dtype):
        pytest.skip(f"backend {backend} does not run {dtype} on {device} here (needs a GPU, the interpreter or the "
                    "build)")
    if backend == "triton" and triton_module_missing():
        pytest.skip(f"triton kernels of contrastive_loss not importable: {triton_module_missing()}")


def backend_cases():
    cases = []
    for backend in ("torch", "cpu", "triton"):
        for dtype in (F64, F32, F16, BF16):
            if dtype in BACKENDS.dtypes[backend]:
                cases.append((backend, dtype))
    return cases


def make_inputs(mode, batch, dim, labels_kind, dtype, device="cpu", seed=0, spread=1.0):
    """q, k (None for labels1), op kwargs. ``k`` is q plus noise so positives are likelier than negatives."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, dim, generator=gen) * spread
    k = None if mode == "labels1" else q + 0.8 * spread * torch.randn(batch, dim, generator=gen)
    kwargs = dict(positives="labels" if mode.startswith("labels") else mode, temperature=0.3)
    if labels_kind == "few":
        kwargs["labels"] = torch.randint(0, 3, (batch,), generator=gen)
    elif labels_kind == "singletons":  # classes 0..2 repeated, plus unique classes 100, 101, ...
        kwargs["labels"] = torch.where(torch.arange(batch) % 3 == 0, 100 + torch.arange(batch),
                                       torch.arange(batch) % 2)
    to = lambda t: None if t is None else t.to(dtype=dtype, device=device)
    if "labels" in kwargs:
        kwargs["labels"] = kwargs["labels"].to(device)
    return to(q), to(k), kwargs


def reference_with_grads(q, k, kwargs, scale=1.0):
    """Loss and gradients of the reference in float64 on the CPU, for the same (rounded) inputs."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k) if t is not None]
    cpu_kwargs = {key: (v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in kwargs.items()}
    loss = contrastive_loss_reference(*leaves, scale=scale, **cpu_kwargs)
    return (loss, *torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("backend,dtype", backend_cases(), ids=lambda v: str(v).replace("torch.", ""))
def test_backend_matches_reference(backend, dtype, case, assert_close, backend_device):
    name, mode, batch, dim, labels_kind = case
    device = backend_device(backend)
    skip_unless_runs(backend, dtype, device)
    if backend == "triton" and INTERPRETED and batch > TRITON_MAX_ROWS:
        pytest.skip("interpreter: small cases only")
    q, k, kwargs = make_inputs(mode, batch, dim, labels_kind, dtype, device)
    leaves = [t.requires_grad_() for t in (q, k) if t is not None]
    loss = contrastive_loss(q, k, backend=backend, scale=0.7, **kwargs)
    assert loss.shape == () and loss.dtype == (F64 if dtype == F64 else F32)
    grads = torch.autograd.grad(loss, leaves)
    want = reference_with_grads(q, k, kwargs, scale=0.7)
    assert_close(loss.detach().cpu(), want[0], dtype, f"{backend}/loss")
    for what, actual, expected in zip(("d_q", "d_k"), grads, want[1:]):
        assert actual.dtype == dtype and actual.shape == expected.shape, what
        assert_close(actual.cpu(), expected, dtype, f"{backend}/{what}")


def kernel_inputs(q, k, kwargs):
    """The kernel-level form of one process's call, built from the public arguments as the op does."""
    from vitfast.ops.contrastive_loss import _layout
    q, k = F.normalize(q, dim=1), (F.normalize(k, dim=1) if k is not None else None)
    return [t.contiguous() for t in _layout(q, k, kwargs["positives"], kwargs.get("labels"), False)]


@pytest.mark.parametrize("case", [c for c in CASES if c[2] <= TRITON_MAX_ROWS], ids=lambda c: c[0])
@pytest.mark.parametrize("backend,dtype", [(b, d) for b, d in backend_cases() if d in (F32, F64)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_saved_statistics(backend, dtype, case, assert_close):
    """The forward's lse and positive counts (what the backward reads) are the definition's; lse = 0 and the anchor
    adds nothing where it has no positive."""
    skip_unless_runs(backend, dtype)
    name, mode, batch, dim, labels_kind = case
    q, k, kwargs = make_inputs(mode, batch, dim, labels_kind, dtype)
    anchors, pool, anchor_labels, pool_labels, anchor_self = kernel_inputs(q, k, kwargs)
    loss, lse, count = torch.ops.vitfast.contrastive_loss(anchors, pool, anchor_labels, pool_labels, anchor_self,
                                                          1 / 0.3, 1.0, backend)
    s = anchors.double() @ pool.double().T / 0.3
    allowed = torch.arange(pool.shape[0])[None, :] != anchor_self[:, None]
    positive = allowed & (pool_labels[None, :] == anchor_labels[:, None])
    want_count = positive.sum(1)
    assert count.dtype == torch.int32 and torch.equal(count.long(), want_count)
    want_lse = torch.where(want_count > 0, torch.logsumexp(s.masked_fill(~allowed, -math.inf), 1), 0.0)
    assert_close(lse, want_lse, dtype, f"{backend}/lse")
    assert bool((lse[want_count == 0] == 0).all())
    per_anchor = torch.where(want_count > 0, want_lse - torch.where(positive, s, 0.0).sum(1) / want_count.clamp_min(1),
                             0.0)
    assert_close(loss, per_anchor.sum(), dtype, f"{backend}/loss")


def as_rank_one_of_two(q, k, kwargs, backend, monkeypatch):
    """The op as rank 1 of 2 would run it, in one process: anchors are the second half of the rows, the pool both
    halves (A != M, own rows offset by B / 2); rank 0's rows enter through a patched gather. (loss, grads)."""
    module = importlib.import_module("vitfast.ops.contrastive_loss")
    half = q.shape[0] // 2
    others = iter([F.normalize(t[:half], dim=1) for t in (q, k) if t is not None])  # in the op's gather order
    monkeypatch.setattr(module, "rank", lambda: 1)
    monkeypatch.setattr(module, "world_size", lambda: 2)
    monkeypatch.setattr(module, "gather_rows_with_grad", lambda x: torch.cat([next(others), x]))
    monkeypatch.setattr(module, "gather_rows", lambda labels: kwargs["labels"])  # the labels gather
    local = {**kwargs, **({"labels": kwargs["labels"][half:]} if "labels" in kwargs else {})}
    leaves = [t[half:].clone().requires_grad_() for t in (q, k) if t is not None]
    loss = contrastive_loss(*leaves, gather_distributed=True, backend=backend, **local)
    return loss, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("mode", ["diagonal", "ntxent", "labels", "labels1"])
@pytest.mark.parametrize("backend,dtype", [(b, d) for b, d in backend_cases() if d in (F32, F16) and b != "torch"],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_rank_layout_matches_reference(backend, dtype, mode, monkeypatch, assert_close):
    """Kernels see A != M and self indices offset into the pool only under gather_distributed: held here against the
    kernel-level reference (the torch backend in fp64), which tests/test_contrastive_distributed.py holds against
    one process."""
    skip_unless_runs(backend, dtype)
    q, k, kwargs = make_inputs(mode, 10, 9, "few" if mode.startswith("labels") else None, dtype, seed=12)
    loss, grads = as_rank_one_of_two(q, k, kwargs, backend, monkeypatch)
    want_loss, want_grads = as_rank_one_of_two(*(t.double() if t is not None else None for t in (q, k)), kwargs,
                                               "torch", monkeypatch)
    assert_close(loss.detach(), want_loss, dtype, f"{backend}/loss")
    for what, actual, expected in zip(("d_q", "d_k"), grads, want_grads):
        assert_close(actual, expected, dtype, f"{backend}/{what}")


# ---- the reference against the papers' formulas, written out independently ----

def supcon_as_released(features, labels, temperature, base_temperature):
    """SupCon as Khosla et al.'s released loss computes it ("all" contrast mode): features [B, V, D] normalised,
    labels [B]; every view of every image is an anchor against every other view."""
    batch, n_views = features.shape[:2]
    same_class = (labels[:, None] == labels[None, :]).to(features.dtype)
    contrast = torch.cat(torch.unbind(features, dim=1))  # [V*B, D], view-major
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()  # stability; cancels in log_prob
    not_self = 1 - torch.eye(batch * n_views, dtype=features.dtype)
    mask = same_class.repeat(n_views, n_views) * not_self
    exp_logits = torch.exp(logits) * not_self
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    positives = mask.sum(1)
    mean_log_prob_pos = (mask * log_prob).sum(1) / torch.where(positives < 1e-6, torch.ones_like(positives), positives)
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(n_views, batch).mean()


def ntxent_as_simclr(z1, z2, temperature):
    """NT-Xent as SimCLR's Algorithm 1 states it: views interleaved (2k-1, 2k), cosine similarities,
    l(i, j) = -log exp(s_ij / t) / sum_{k != i} exp(s_ik / t), loss = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]."""
    z = torch.stack([z1, z2], dim=1).reshape(-1, z1.shape[1])  # rows 2k, 2k+1 (0-based) are image k's views
    sim = F.cosine_similarity(z[:, None, :], z[None, :, :], dim=2) / temperature
    total = 0.0
    for i in range(z.shape[0]):
        j = i + 1 if i % 2 == 0 else i - 1
        others = torch.cat([sim[i, :i], sim[i, i + 1:]])
        total = total - (sim[i, j] - torch.logsumexp(others, 0))
    return total / z.shape[0]


def infonce_as_mocov3(q, k, temperature):
    """MoCo v3's contrastive loss, one direction: cross-entropy of q k^T / t against the diagonal, times 2t."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    terms = [torch.logsumexp(q[i] @ k.T / temperature, 0) - q[i] @ k[i] / temperature for i in range(q.shape[0])]
    return 2 * temperature * torch.stack(terms).mean()


@pytest.mark.parametrize("labels_kind", ["few", "singletons"])
def test_reference_is_supcon_as_released(labels_kind):
    _, _, kwargs = make_inputs("labels", 10, 16, labels_kind, F64)
    features = F.normalize(torch.randn(10, 2, 16, dtype=F64, generator=torch.Generator().manual_seed(1)), dim=2)
    want = supcon_as_released(features, kwargs["labels"], 0.1, 0.07)
    got = contrastive_loss_reference(features[:, 0], features[:, 1], temperature=0.1, positives="labels",
                                     labels=kwargs["labels"], scale=0.1 / 0.07)
    fused = contrastive_loss(features[:, 0], features[:, 1], temperature=0.1, positives="labels",
                             labels=kwargs["labels"], scale=0.1 / 0.07)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused, want, rtol=1e-12, atol=1e-12)
    one_view = supcon_as_released(features[:, :1], kwargs["labels"], 0.1, 0.07)
    torch.testing.assert_close(contrastive_loss_reference(features[:, 0], temperature=0.1, positives="labels",
                                                          labels=kwargs["labels"], scale=0.1 / 0.07), one_view)


def test_reference_is_ntxent_as_simclr():
    gen = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(6, 12, dtype=F64, generator=gen), torch.randn(6, 12, dtype=F64, generator=gen)
    want = ntxent_as_simclr(z1, z2, 0.5)
    for got in (contrastive_loss_reference(z1, z2, temperature=0.5, positives="ntxent"),
                contrastive_loss(z1, z2, temperature=0.5, positives="ntxent")):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reference_is_infonce_as_mocov3():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(7, 10, dtype=F64, generator=gen), torch.randn(7, 10, dtype=F64, generator=gen)
    want = infonce_as_mocov3(q, k, 0.2)
    for got in (contrastive_loss_reference(q, k, temperature=0.2, scale=0.4),
                contrastive_loss(q, k, temperature=0.2, scale=0.4)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---- edge cases: every backend that runs, values and gradients finite and right ----

def edge_inputs(kind, dtype):
    gen = torch.Generator().manual_seed(4)
    if kind == "duplicate-rows":  # rows 0, 1, 2 equal in q and k: positives tie with negatives
        q = torch.randn(6, 8, generator=gen)
        q[1:3] = q[0]
        return q, q.clone(), dict(positives="ntxent", temperature=0.2)
    if kind == "identical-rows":  # every row the same vector: every logit equal
        q = torch.randn(1, 8, generator=gen).repeat(5, 1)
        return q, q.clone(), dict(positives="labels", labels=torch.tensor([0, 1, 0, 2, 1]), temperature=0.1)
    if kind == "all-singletons":  # one view, all labels distinct: no anchor has a positive
        return torch.randn(5, 8, generator=gen), None, dict(positives="labels", labels=torch.arange(5), temperature=0.1)
    # large logits: normalize=False, |rows| ~ 8 * sqrt(32), temperature 0.05: logits of several 1e3 (the excluded
    # own logit ~4e4); views independent, so the positive is rarely the largest logit: loss and gradients are large
    q, k = 8 * torch.randn(6, 32, generator=gen), 8 * torch.randn(6, 32, generator=gen)
    return q, k, dict(positives="ntxent", temperature=0.05, normalize=False)


@pytest.mark.parametrize("kind", ["duplicate-rows", "identical-rows", "all-singletons", "large-logits"])
@pytest.mark.parametrize("backend,dtype", [c for c in backend_cases() if c[1] != F64],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_edge_cases_finite_and_right(backend, dtype, kind, assert_close):
    skip_unless_runs(backend, dtype)
    q, k, kwargs = edge_inputs(kind, dtype)
    q, k = q.to(dtype).requires_grad_(), (k.to(dtype).requires_grad_() if k is not None else None)
    leaves = [t for t in (q, k) if t is not None]
    loss = contrastive_loss(q, k, backend=backend, **kwargs)
    grads = torch.autograd.grad(loss, leaves)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads), (loss, grads)
    want = reference_with_grads(q, k, kwargs)
    if kind == "all-singletons":  # exactly zero, not merely small
        assert loss.item() == 0 and all(bool((g == 0).all()) for g in grads)
    if kind == "identical-rows":  # every gradient is parallel to the row: normalisation's projection makes it 0
        # (the projection is formed in fp32: what is left is fp32 rounding, against gradients of O(1) otherwise)
        assert all(g.abs().max().item() <= 1e-6 for g in grads), grads
        grads, want = (), want[:1]
    if kind == "large-logits":  # not the degenerate case: a loss of O(1e3), softmax weights away from the positive
        assert want[0].item() > 100 and all(w.abs().max() > 10 for w in want[1:]), want
    assert_close(loss.detach(), want[0], dtype, f"{backend}/loss")
    for what, actual, expected in zip(("d_q", "d_k"), grads, want[1:]):
        assert_close(actual, expected, dtype, f"{backend}/{what}")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_mixed_singletons_add_zero(backend):
    """Anchors without a positive add 0 to the sum (the mean still divides by every anchor) and stay in the pool."""
    skip_unless_runs(backend, F64)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(6, 5, dtype=F64, generator=gen).requires_grad_()
    labels = torch.tensor([0, 0, 7, 1, 1, 9])  # rows 2 and 5 alone
    loss = contrastive_loss(q, temperature=0.2, positives="labels", labels=labels, backend=backend)
    z = F.normalize(q, dim=1)
    s = z @ z.T / 0.2
    terms = []
    for a in (0, 1, 3, 4):  # written out: the anchors that have a positive, the singletons still negatives
        others = torch.arange(6) != a
        positive = others & (labels == labels[a])
        terms.append(torch.logsumexp(s[a, others], 0) - s[a, positive].mean())
    want = torch.stack(terms).sum() / 6
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(torch.autograd.grad(loss, q)[0], torch.autograd.grad(want, q)[0])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("mode", ["diagonal", "ntxent", "labels", "labels1"])
def test_gradcheck_float64(backend, mode):
    skip_unless_runs(backend, F64)
    q, k, kwargs = make_inputs(mode, 4, 3, "few" if mode.startswith("labels") else None, F64, seed=6)
    leaves = [t.requires_grad_() for t in (q, k) if t is not None]
    fn = lambda *xs: contrastive_loss(*xs, backend=backend, scale=1.3, **kwargs)
    assert torch.autograd.gradcheck(fn, leaves)


@settings(max_examples=30, deadline=None)
@given(mode=st.sampled_from(["diagonal", "ntxent", "labels", "labels1"]), batch=st.integers(1, 24),
       dim=st.integers(1, 40), classes=st.integers(1, 8), temperature=st.floats(0.05, 2.0),
       normalize=st.booleans(), seed=st.integers(0, 2**16))
def test_random_calls_match_reference(mode, batch, dim, classes, temperature, normalize, seed):
    """Random shapes, label draws, temperatures and normalize: the torch and cpu backends in fp64 against the
    reference (the fp64 bands of the table are measured on the fixed cases above; here a fixed 1e-10)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, dim, dtype=F64, generator=gen)
    k = None if mode == "labels1" else torch.randn(batch, dim, dtype=F64, generator=gen)
    kwargs = dict(positives="labels" if mode.startswith("labels") else mode, temperature=temperature,
                  normalize=normalize, scale=0.9)
    if mode.startswith("labels"):
        kwargs["labels"] = torch.randint(0, classes, (batch,), generator=gen)
    leaves = [t.requires_grad_() for t in (q, k) if t is not None]
    want_loss = contrastive_loss_reference(*leaves, **kwargs)
    want = torch.autograd.grad(want_loss, leaves)
    for backend in [b for b in ("torch", "cpu") if BACKENDS.runs_on(b, torch.device("cpu"), F64)]:
        loss = contrastive_loss(*leaves, backend=backend, **kwargs)
        torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-10)
        for got, expected in zip(torch.autograd.grad(loss, leaves), want):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_partial_gradients(backend, assert_close):
    skip_unless_runs(backend, F32)
    q, k, kwargs = make_inputs("ntxent", 5, 7, None, F32, seed=7)
    want = reference_with_grads(q, k, kwargs)
    for index in range(2):
        args = [q.detach().clone(), k.detach().clone()]
        args[index].requires_grad_()
        (grad,) = torch.autograd.grad(contrastive_loss(*args, backend=backend, **kwargs), (args[index],))
        assert_close(grad, want[1 + index], F32, f"{backend}/partial")


def test_gather_on_one_process_is_the_plain_loss():
    q, k, kwargs = make_inputs("labels", 6, 8, "few", F32)
    torch.testing.assert_close(contrastive_loss(q, k, gather_distributed=True, **kwargs),
                               contrastive_loss(q, k, **kwargs), rtol=0, atol=0)


# ---- registration: opcheck, torch.compile, autocast ----

@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("mode", ["diagonal", "labels"])
def test_opcheck(backend, mode):
    skip_unless_runs(backend, F32)
    q, k, kwargs = make_inputs(mode, 5, 6, "singletons" if mode == "labels" else None, F32, seed=8)
    anchors, pool, anchor_labels, pool_labels, anchor_self = kernel_inputs(q, k, kwargs)
    args = (anchors.requires_grad_(), pool.requires_grad_(), anchor_labels, pool_labels, anchor_self, 2.5, 0.1,
            backend)
    torch.library.opcheck(torch.ops.vitfast.contrastive_loss.default, args)
    _, lse, count = torch.ops.vitfast.contrastive_loss(*args)
    for mask in ([True, True], [True, False], [False, True]):
        backward_args = (torch.tensor(1.5), anchors.detach(), pool.detach(), anchor_labels, pool_labels, anchor_self,
                         lse, count, 2.5, 0.1, mask, backend)
        torch.library.opcheck(torch.ops.vitfast.contrastive_loss_backward.default, backward_args)


def test_torch_compile_fullgraph_matches_eager(assert_close):
    q, k, kwargs = make_inputs("labels", 6, 8, "few", F32, seed=9)
    q.requires_grad_(), k.requires_grad_()
    fn = lambda a, b, labels: contrastive_loss(a, b, temperature=0.1, positives="labels", labels=labels, scale=2.0)
    eager = fn(q, k, kwargs["labels"])
    eager_grads = torch.autograd.grad(eager, (q, k))
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, kwargs["labels"])
    for a, b in zip((out, *torch.autograd.grad(out, (q, k))), (eager, *eager_grads)):
        assert_close(a, b, F32, "compiled")


def test_autocast_bf16_on_cpu():
    q, k, kwargs = make_inputs("ntxent", 6, 8, None, F32, seed=10)
    q.requires_grad_(), k.requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        loss = contrastive_loss(q, k, **kwargs)
    assert loss.dtype == F32
    loss.backward()
    assert q.grad.dtype == F32 and k.grad.dtype == F32
    # The loss is the op's on the bf16-rounded inputs, not on the fp32 ones.
    want = contrastive_loss(q.detach().to(BF16), k.detach().to(BF16), **kwargs)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=1e-6)


# ---- argument errors name the argument, the expectation and what arrived ----

def _good():
    gen = torch.Generator().manual_seed(11)
    return dict(q=torch.randn(4, 6, generator=gen), k=torch.randn(4, 6, generator=gen), temperature=0.1)


@pytest.mark.parametrize("change,message", [
    (dict(q=torch.randn(4, 6, 1)), "q must be float16/bfloat16/float32/float64 [B, D], got float32 [4, 6, 1]"),
    (dict(q=torch.zeros(4, 6, dtype=torch.int64)), "q must be float16/bfloat16/float32/float64 [B, D], got int64"),
    (dict(k=torch.randn(4, 6, device="meta")), "k must be on cpu like the other inputs"),
    (dict(k=torch.randn(5, 6)), "k must be float16/bfloat16/float32/float64 [B, D] with B = 4 (from q)"),
    (dict(k=torch.randn(4, 7)), "k must be float16/bfloat16/float32/float64 [B, D] with D = 6 (from q)"),
    (dict(k=torch.randn(4, 6, dtype=F64)), "k must have the dtype of q (torch.float32), got float64"),
    (dict(k=None), 'positives="diagonal" needs k (the keys / the second view) [B, D]'),
    (dict(k=None, positives="ntxent"), 'positives="ntxent" needs k'),
    (dict(positives="labels"), 'positives="labels" needs labels [B] int64'),
    (dict(positives="labels", labels=torch.zeros(4)), "labels must be int64 [B], got float32 [4]"),
    (dict(positives="labels", labels=torch.zeros(3, dtype=torch.int64)), "labels must be int64 [B] with B = 4"),
    (dict(labels=torch.zeros(4, dtype=torch.int64)), 'labels are only used with positives="labels", not "diagonal"'),
    (dict(positives="supcon"), "positives must be one of ('diagonal', 'ntxent', 'labels'), got 'supcon'"),
    (dict(temperature=0.0), "temperature must be a finite number > 0, got 0.0"),
    (dict(temperature=-0.1), "temperature must be a finite number > 0, got -0.1"),
    (dict(temperature=float("nan")), "temperature must be a finite number > 0, got nan"),
    (dict(temperature=torch.tensor(0.1)), "temperature must be a finite number > 0, got tensor(0.1000)"),
    (dict(scale=float("inf")), "scale must be a finite number, got inf"),
    (dict(q=torch.randn(0, 6), k=torch.randn(0, 6)), "q must have at least one row and one feature, got [0, 6]"),
    (dict(q=torch.randn(4, 0), k=torch.randn(4, 0)), "q must have at least one row and one feature, got [4, 0]"),
])
def test_bad_arguments_are_named(change, message):
    args = {**_good(), **change}
    with pytest.raises(ValueError) as error:
        contrastive_loss(**args)
    assert message in str(error.value), str(error.value)
    assert str(error.value).startswith("vitfast.ops.contrastive_loss: ")
