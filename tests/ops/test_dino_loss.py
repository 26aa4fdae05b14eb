"""dino_loss: every backend against the float64 reference (loss, teacher mean, gradients of the student features and
the prototypes) over view layouts, ragged shapes and dtypes; the two kernel-level primitives against their
definitions; the op + MomentumCentre against DINO's loss as its released code computes it, written out here with a
weight-normalised nn.Linear head; gradcheck, opcheck, torch.compile, autocast and argument errors.

Backends join by themselves: a case runs where ``BACKENDS.runs_on`` says the backend runs here and (triton) its
kernel module imports; otherwise it is skipped with the reason. Under the Triton interpreter (no GPU) the triton
backend gets the small cases only. Cost on 2 loaded cores: ~30 s with torch and cpu (13 s of it torch.compile, 4 s
opcheck), ~20 s more for triton under the interpreter.
"""
import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vitfast.nn import MomentumCentre
from vitfast.ops import dino_loss, dino_loss_reference
from vitfast.ops.dino_loss import BACKENDS

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
INTERPRETED = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
TEMPS = dict(student_temp=0.1, teacher_temp=0.04)  # DINO's defaults (the teacher's after its warm-up)

# (name, Vs, Vt, B, d, K, centre shape, teacher_prototypes given)
CASES = [
    ("2+8 B3 d17 K37", 10, 2, 3, 17, 37, "[K]", True),
    ("2+0 B5 d24 K70", 2, 2, 5, 24, 70, "[1,K]", False),
    ("3 views 1 teacher B4 d9 K33", 3, 1, 4, 9, 33, "[K]", True),
    ("2+2 B1 d5 K3", 4, 2, 1, 5, 3, "[1,K]", True),
    # several tiles of rows, prototypes and features with ragged tails (for the compiled backends)
    ("2+4 B9 d130 K300", 6, 2, 9, 130, 300, "[K]", True),
    ("2+8 B7 d67 K517", 10, 2, 7, 67, 517, "[1,K]", False),
]
TRITON_MAX_WORK = 30 * 70  # interpreter: rows x prototypes of the small cases only


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
        pytest.skip(f"triton kernels of dino_loss not importable: {triton_module_missing()}")


def backend_cases(dtypes=(F64, F32, F16, BF16)):
    return [(b, d) for b in ("torch", "cpu", "triton") for d in dtypes if d in BACKENDS.dtypes[b]]


def ids(value):
    return str(value).replace("torch.", "")


def make_inputs(n_student, n_teacher, batch, dim, protos, dtype, centre_shape="[K]", teacher_protos=True, seed=0,
                device="cpu"):
    """student [Vs*B, d] and teacher [Vt*B, d] unit rows (DINO's head ends with an L2 normalisation; the teacher
    sees the global crops with some noise), prototypes v [K, d] with row norms in 0.5..2 (the weight norm must
    remove them), centre of the size of the teacher logits, teacher prototypes near v (or None)."""
    gen = torch.Generator().manual_seed(seed)
    student = F.normalize(torch.randn(n_student * batch, dim, generator=gen), dim=1)
    teacher = F.normalize(student[:n_teacher * batch] + 0.5 * torch.randn(n_teacher * batch, dim, generator=gen),
                          dim=1)
    prototypes = torch.randn(protos, dim, generator=gen) * (0.5 + 1.5 * torch.rand(protos, 1, generator=gen))
    centre = 0.1 * torch.randn(protos, generator=gen)
    if centre_shape == "[1,K]":
        centre = centre[None]
    teacher_prototypes = prototypes + 0.2 * torch.randn(protos, dim, generator=gen) if teacher_protos else None
    to = lambda t: None if t is None else t.to(dtype=dtype, device=device)
    return to(student), to(teacher), to(prototypes), centre.to(device), to(teacher_prototypes)


def reference_with_grads(student, teacher, prototypes, centre, teacher_prototypes, views):
    """(loss, teacher_mean, d_student, d_prototypes) of the reference in float64 for the same (rounded) inputs."""
    x, v = (t.detach().double().cpu().requires_grad_() for t in (student, prototypes))
    tv = None if teacher_prototypes is None else teacher_prototypes.double().cpu()
    loss, mean = dino_loss_reference(x, teacher.double().cpu(), v, centre.double().cpu(), teacher_prototypes=tv,
                                     **views, **TEMPS)
    return (loss, mean, *torch.autograd.grad(loss, (x, v)))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("backend,dtype", backend_cases(), ids=ids)
def test_backend_matches_reference(backend, dtype, case, assert_close, backend_device):
    name, n_student, n_teacher, batch, dim, protos, centre_shape, given_teacher = case
    device = backend_device(backend)
    skip_unless_runs(backend, dtype, device)
    if backend == "triton" and INTERPRETED and n_student * batch * protos > TRITON_MAX_WORK:
        pytest.skip("interpreter: small cases only")
    student, teacher, prototypes, centre, teacher_prototypes = make_inputs(
        n_student, n_teacher, batch, dim, protos, dtype, centre_shape, given_teacher, device=device)
    views = dict(n_student_views=n_student, n_teacher_views=n_teacher)
    student.requires_grad_(), prototypes.requires_grad_()
    loss, mean = dino_loss(student, teacher, prototypes, centre, teacher_prototypes=teacher_prototypes,
                           backend=backend, **views, **TEMPS)
    accumulation = F64 if dtype == F64 else F32
    assert loss.shape == () and loss.dtype == accumulation
    assert mean.shape == (protos,) and mean.dtype == accumulation and not mean.requires_grad
    d_student, d_prototypes = torch.autograd.grad(loss, (student, prototypes))
    want = reference_with_grads(student, teacher, prototypes, centre, teacher_prototypes, views)
    assert_close(loss.detach().cpu(), want[0], dtype, f"{backend}/loss")
    assert_close(mean.cpu(), want[1], dtype, f"{backend}/teacher_mean")
    for what, actual, expected in (("d_student", d_student, want[2]), ("d_prototypes", d_prototypes, want[3])):
        assert actual.dtype == dtype and actual.shape == expected.shape, what
        assert_close(actual.cpu(), expected, dtype, f"{backend}/{what}")


# ---- the kernel-level primitives against their definitions (module doc) ----

def primitive_inputs(rows, protos, dim, width, dtype, seed=1):
    """x [R, d], keys [K, d] (raw: row norms 0.5..2), values [K, e] in dtype; key_scale and value_scale [K] (positive),
    bias [K], lse [R], y [R, e] and out [K, e] (what columns adds to) in the accumulation dtype."""
    gen = torch.Generator().manual_seed(seed)
    accumulation = F64 if dtype == F64 else F32
    x = F.normalize(torch.randn(rows, dim, generator=gen), dim=1).to(dtype)
    keys = (torch.randn(protos, dim, generator=gen) * (0.5 + 1.5 * torch.rand(protos, 1, generator=gen))).to(dtype)
    values = torch.randn(protos, width, generator=gen).to(dtype)
    key_scale = keys.double().norm(dim=1).reciprocal() * (0.8 + 0.4 * torch.rand(protos, generator=gen))
    value_scale = 0.5 + torch.rand(protos, generator=gen)
    bias = torch.randn(protos, generator=gen)
    y = torch.randn(rows, width, generator=gen)
    out = torch.randn(protos, width, generator=gen)
    lse = torch.logsumexp(x.double() @ keys.double().T * key_scale * 7.0 + bias.double(), 1) + 0.3  # not the rows' own
    return x, keys, values, *(t.to(accumulation) for t in (key_scale, value_scale, bias, lse, y, out))


@pytest.mark.parametrize("shape", [(7, 37, 17, 17), (5, 70, 24, 9), (33, 300, 130, 130)],
                         ids=lambda s: "R%dK%dd%de%d" % s)
@pytest.mark.parametrize("backend,dtype", backend_cases(), ids=ids)
def test_primitives_match_definition(backend, dtype, shape, assert_close):
    """softmax_rows and softmax_columns with values of another width than the keys, key and value scales (the fused
    weight norm), a bias, a scale and (columns) an lse that is not the rows' own, added to a nonzero out: each
    backend against the dense definition in float64."""
    skip_unless_runs(backend, dtype)
    rows, protos, dim, width = shape
    if backend == "triton" and INTERPRETED and rows * protos > TRITON_MAX_WORK:
        pytest.skip("interpreter: small cases only")
    x, keys, values, key_scale, value_scale, bias, lse, y, out = primitive_inputs(rows, protos, dim, width, dtype)
    before = out.clone()
    got_lse, got_rows = torch.ops.vitfast.dino_softmax_rows(x, keys, key_scale, values, value_scale, bias, 7.0,
                                                           backend)
    assert torch.ops.vitfast.dino_softmax_columns(x, keys, key_scale, bias, 7.0, lse, y, out, backend) is None
    z = x.double() @ keys.double().T * key_scale.double() * 7.0 + bias.double()
    for got in (got_lse, got_rows, out):
        assert got.dtype == bias.dtype
    assert_close(got_lse, torch.logsumexp(z, 1), dtype, f"{backend}/lse")
    assert_close(got_rows, torch.softmax(z, 1) * value_scale.double() @ values.double(), dtype, f"{backend}/rows")
    columns = torch.exp(z - lse.double()[:, None]).T @ y.double()
    assert_close(out - before, columns, dtype, f"{backend}/columns")  # added to out, not written over it


# ---- the op against DINO as its released code computes it, written out independently ----

class DINOAsReleased:
    """DINO's last layer and loss as the original training code has them: a weight-normalised nn.Linear(d, K,
    bias=False) whose norm g is fixed to 1 (norm_last_layer), the teacher's its EMA copy; the loss a loop over
    (teacher chunk, student chunk) pairs skipping the same crop, divided by the number of terms; the centre an
    EMA of the batch mean of the teacher's outputs (all-reduced: one process here)."""

    def __init__(self, v, teacher_v, n_student, n_teacher, momentum):
        self.student_layer = self._layer(v)
        self.teacher_layer = self._layer(teacher_v)
        self.n_student, self.n_teacher, self.momentum = n_student, n_teacher, momentum
        self.center = torch.zeros(1, v.shape[0], dtype=v.dtype)

    @staticmethod
    def _layer(v):
        layer = nn.utils.parametrizations.weight_norm(nn.Linear(v.shape[1], v.shape[0], bias=False).to(v.dtype))
        weight = layer.parametrizations.weight
        with torch.no_grad():
            weight.original0.fill_(1.0)   # g = 1
            weight.original1.copy_(v)     # v
        weight.original0.requires_grad = False
        return layer

    def __call__(self, student_features, teacher_features, student_temp, teacher_temp):
        student_output = self.student_layer(student_features)
        with torch.no_grad():
            teacher_output = self.teacher_layer(teacher_features)
        student_chunks = torch.chunk(student_output / student_temp, self.n_student)
        teacher_probs = torch.chunk(torch.softmax((teacher_output - self.center) / teacher_temp, dim=-1),
                                    self.n_teacher)
        total, terms = 0, 0
        for j, q in enumerate(teacher_probs):
            for v, s in enumerate(student_chunks):
                if v != j:
                    total = total + (-q * torch.log_softmax(s, dim=-1)).sum(-1).mean()
                    terms += 1
        batch_center = teacher_output.sum(0, keepdim=True) / teacher_output.shape[0]
        self.center = self.center * self.momentum + batch_center * (1 - self.momentum)
        return total / terms


@pytest.mark.parametrize("views", [(10, 2), (2, 2), (3, 1)], ids=["2+8", "2+0", "3-1teacher"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_matches_dino_as_released(backend, views):
    """Three steps (new crops each step, the centre carried): loss, gradients of the student features and of the
    head's v, and the centre. The first step (centre 0) to 1e-12; later ones to 1e-6, since MomentumCentre
    all-reduces the batch mean in float32."""
    skip_unless_runs(backend, F64)
    n_student, n_teacher = views
    batch, dim, protos = 3, 12, 29
    _, _, v, _, teacher_v = make_inputs(n_student, n_teacher, batch, dim, protos, F64, seed=20)
    original = DINOAsReleased(v, teacher_v, n_student, n_teacher, momentum=0.9)
    centre = MomentumCentre(protos, momentum=0.9).double()
    prototypes = v.clone().requires_grad_()
    for step in range(3):
        student, teacher, *_ = make_inputs(n_student, n_teacher, batch, dim, protos, F64, seed=21 + step)
        student = student.requires_grad_()
        want = original(student, teacher, **TEMPS)
        want_grads = torch.autograd.grad(want, (student, original.student_layer.parametrizations.weight.original1))
        loss, mean = dino_loss(student, teacher, prototypes, centre.centre, n_student_views=n_student,
                               n_teacher_views=n_teacher, teacher_prototypes=teacher_v, backend=backend, **TEMPS)
        grads = torch.autograd.grad(loss, (student, prototypes))
        centre.update(mean, count=teacher.shape[0])
        tolerance = dict(rtol=1e-12, atol=1e-12) if step == 0 else dict(rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(loss, want, **tolerance)
        for got, expected in zip(grads, want_grads):
            torch.testing.assert_close(got, expected, **tolerance)
        torch.testing.assert_close(centre.centre, original.center, rtol=1e-6, atol=1e-9)
    assert original.center.abs().max() > 0.01  # the centre moved: the later steps tested it


def test_reference_detaches_prototypes_for_the_teacher():
    """Without teacher_prototypes the teacher uses the student's prototypes, detached: the gradient of v is the
    student path's alone (the released code's teacher is a separate module)."""
    student, teacher, v, centre, _ = make_inputs(4, 2, 3, 8, 11, F64, teacher_protos=False, seed=22)
    views = dict(n_student_views=4, n_teacher_views=2)
    original = DINOAsReleased(v, v, 4, 2, momentum=0.9)
    original.center = centre[None].clone()
    want = original(student, teacher, **TEMPS)
    (want_grad,) = torch.autograd.grad(want, original.student_layer.parametrizations.weight.original1)
    prototypes = v.clone().requires_grad_()
    loss, _ = dino_loss(student, teacher, prototypes, centre, **views, **TEMPS)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, prototypes)[0], want_grad, rtol=1e-12, atol=1e-12)


# ---- edge cases, partial gradients, gradcheck, random calls ----

@pytest.mark.parametrize("backend,dtype", backend_cases((F32, F16, BF16)), ids=ids)
def test_teacher_gets_no_gradient_and_partial_gradients(backend, dtype, assert_close):
    """teacher and teacher_prototypes never get a gradient; asking for the student's (or the prototypes') alone
    gives the same values as asking for both."""
    skip_unless_runs(backend, dtype)
    student, teacher, prototypes, centre, teacher_prototypes = make_inputs(4, 2, 3, 10, 19, dtype, seed=23)
    views = dict(n_student_views=4, n_teacher_views=2)
    want = reference_with_grads(student, teacher, prototypes, centre, teacher_prototypes, views)
    for index in range(2):
        args = [student.clone(), prototypes.clone(), teacher.clone().requires_grad_(),
                teacher_prototypes.clone().requires_grad_()]
        args[index].requires_grad_()
        loss, _ = dino_loss(args[0], args[2], args[1], centre, teacher_prototypes=args[3], backend=backend, **views,
                            **TEMPS)
        grad, d_teacher, d_teacher_prototypes = torch.autograd.grad(loss, (args[index], args[2], args[3]),
                                                                    allow_unused=True)
        assert d_teacher is None and d_teacher_prototypes is None
        assert_close(grad, want[2 + index], dtype, f"{backend}/partial")


@pytest.mark.parametrize("backend,dtype", backend_cases((F32, F16, BF16)), ids=ids)
def test_edge_cases_finite_and_right(backend, dtype, assert_close):
    """K = 1 (every softmax is 1: loss and gradients 0, up to the rounding of the terms that cancel in the fused
    form, m·lse_s - <x, U> / student_temp, each up to 1 / student_temp = 10; a 16-bit kernel may round the softmax
    weights to the dtype for its dot, as attention kernels do), and sharp logits (features 40x longer than unit, so
    the teacher's logits reach 1e3 and its softmax is one-hot)."""
    skip_unless_runs(backend, dtype)
    views = dict(n_student_views=3, n_teacher_views=2)
    student, teacher, prototypes, centre, _ = make_inputs(3, 2, 2, 6, 1, dtype, teacher_protos=False, seed=24)
    student.requires_grad_(), prototypes.requires_grad_()
    loss, _ = dino_loss(student, teacher, prototypes, centre, backend=backend, **views, **TEMPS)
    grads = torch.autograd.grad(loss, (student, prototypes))
    zero = {F32: 1e-5, F16: 1e-3, BF16: 8e-3}[dtype]  # ~ the unit roundoff of what is rounded
    assert abs(loss.item()) <= zero and all(g.abs().max().item() <= zero for g in grads), (loss, grads)

    student, teacher, prototypes, centre, _ = make_inputs(3, 2, 2, 6, 23, F32, teacher_protos=False, seed=25)
    student, teacher, prototypes = ((40 * t).to(dtype) for t in (student, teacher, prototypes))
    student.requires_grad_(), prototypes.requires_grad_()
    loss, _ = dino_loss(student, teacher, prototypes, centre, backend=backend, **views, **TEMPS)
    grads = torch.autograd.grad(loss, (student, prototypes))
    assert torch.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads)
    want = reference_with_grads(student, teacher, prototypes, centre, None, views)
    assert want[0].item() > 10  # not the degenerate case: a large loss
    assert_close(loss.detach(), want[0], dtype, f"{backend}/loss")
    for what, actual, expected in zip(("d_student", "d_prototypes"), grads, want[2:]):
        assert_close(actual, expected, dtype, f"{backend}/{what}")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("given_teacher", [False, True], ids=["shared", "teacher-prototypes"])
def test_gradcheck_float64(backend, given_teacher):
    """Without teacher_prototypes the teacher reads the prototypes detached, so a finite difference in them (which
    moves the teacher too) is not the gradient: there only the student's is checked."""
    skip_unless_runs(backend, F64)
    student, teacher, prototypes, centre, teacher_prototypes = make_inputs(3, 2, 2, 4, 5, F64, "[K]", given_teacher,
                                                                           seed=26)
    fn = lambda x, v=prototypes: dino_loss(x, teacher, v, centre, n_student_views=3, n_teacher_views=2,
                                           teacher_prototypes=teacher_prototypes, backend=backend, **TEMPS)[0]
    leaves = (student, prototypes) if given_teacher else (student,)
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in leaves))


@settings(max_examples=20, deadline=None)
@given(n_teacher=st.integers(1, 3), extra=st.integers(0, 4), batch=st.integers(1, 5), dim=st.integers(1, 20),
       protos=st.integers(1, 40), student_temp=st.floats(0.05, 1.0), teacher_temp=st.floats(0.02, 1.0),
       given_teacher=st.booleans(), seed=st.integers(0, 2**16))
def test_random_calls_match_reference(n_teacher, extra, batch, dim, protos, student_temp, teacher_temp,
                                      given_teacher, seed):
    """Random view layouts, shapes and temperatures: the torch and cpu backends in fp64 against the reference (the
    fp64 bands of the table are measured on the fixed cases; here a fixed 1e-10)."""
    n_student = max(2, n_teacher + extra)
    student, teacher, prototypes, centre, teacher_prototypes = make_inputs(
        n_student, n_teacher, batch, dim, protos, F64, teacher_protos=given_teacher, seed=seed)
    kwargs = dict(n_student_views=n_student, n_teacher_views=n_teacher, student_temp=student_temp,
                  teacher_temp=teacher_temp, teacher_prototypes=teacher_prototypes)
    leaves = (student.requires_grad_(), prototypes.requires_grad_())
    want_loss, want_mean = dino_loss_reference(*leaves[:1], teacher, leaves[1], centre, **kwargs)
    want = torch.autograd.grad(want_loss, leaves)
    for backend in [b for b in ("torch", "cpu") if BACKENDS.runs_on(b, torch.device("cpu"), F64)]:
        loss, mean = dino_loss(student, teacher, prototypes, centre, backend=backend, **kwargs)
        torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(mean, want_mean, rtol=1e-10, atol=1e-10)
        for got, expected in zip(torch.autograd.grad(loss, leaves), want):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


# ---- registration: opcheck, torch.compile, autocast ----

@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_opcheck(backend):
    skip_unless_runs(backend, F32)
    x, keys, values, key_scale, value_scale, bias, lse, y, out = primitive_inputs(5, 9, 6, 4, F32, seed=27)
    torch.library.opcheck(torch.ops.vitfast.dino_softmax_rows.default,
                          (x, keys, key_scale, values, value_scale, bias, 2.5, backend))
    torch.library.opcheck(torch.ops.vitfast.dino_softmax_columns.default,
                          (x, keys, key_scale, bias, 2.5, lse, y, out, backend))


def test_torch_compile_fullgraph_matches_eager(assert_close):
    student, teacher, prototypes, centre, teacher_prototypes = make_inputs(4, 2, 3, 8, 13, F32, seed=28)
    student.requires_grad_(), prototypes.requires_grad_()
    fn = lambda x, y, v, c, tv: dino_loss(x, y, v, c, n_student_views=4, n_teacher_views=2, teacher_prototypes=tv,
                                          **TEMPS)
    eager = fn(student, teacher, prototypes, centre, teacher_prototypes)
    eager_grads = torch.autograd.grad(eager[0], (student, prototypes))
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(student, teacher, prototypes, centre,
                                                                 teacher_prototypes)
    compiled_grads = torch.autograd.grad(out[0], (student, prototypes))
    for a, b in zip((*out, *compiled_grads), (*eager, *eager_grads)):
        assert_close(a.detach(), b.detach(), F32, "compiled", backend=BACKENDS.select(torch.device("cpu"), F32))


def test_autocast_bf16_on_cpu():
    student, teacher, prototypes, centre, teacher_prototypes = make_inputs(4, 2, 3, 8, 13, F32, seed=29)
    views = dict(n_student_views=4, n_teacher_views=2, teacher_prototypes=teacher_prototypes)
    student.requires_grad_(), prototypes.requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        loss, mean = dino_loss(student, teacher, prototypes, centre, **views, **TEMPS)
    assert loss.dtype == F32 and mean.dtype == F32
    loss.backward()
    assert student.grad.dtype == F32 and prototypes.grad.dtype == F32
    # The loss is the op's on the bf16-rounded inputs, not on the fp32 ones.
    rounded = dict(views, teacher_prototypes=teacher_prototypes.to(BF16))
    want, want_mean = dino_loss(*(t.detach().to(BF16) for t in (student, teacher, prototypes)), centre, **rounded,
                                **TEMPS)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean, want_mean, rtol=1e-6, atol=1e-6)
    unrounded, _ = dino_loss(student.detach(), teacher, prototypes.detach(), centre, **views, **TEMPS)
    assert not math.isclose(loss.item(), unrounded.item(), rel_tol=1e-6)  # autocast did change the inputs


# ---- argument errors name the argument, the expectation and what arrived ----

def _good():
    gen = torch.Generator().manual_seed(30)
    return dict(student=torch.randn(8, 6, generator=gen), teacher=torch.randn(4, 6, generator=gen),
                prototypes=torch.randn(5, 6, generator=gen), centre=torch.zeros(5), n_student_views=4,
                n_teacher_views=2, student_temp=0.1, teacher_temp=0.04)


@pytest.mark.parametrize("change,message", [
    (dict(student=torch.randn(8, 6, 1)), "student must be float16/bfloat16/float32/float64 [Vs*B, d], got float32"),
    (dict(student=torch.zeros(8, 6, dtype=torch.int64)), "student must be float16/bfloat16/float32/float64 [Vs*B, d], "
                                                         "got int64"),
    (dict(teacher=torch.randn(4, 7)), "teacher must be float16/bfloat16/float32/float64 [Vt*B, d] with d = 6 (from "
                                      "student)"),
    (dict(prototypes=torch.randn(5, 7)), "prototypes must be float16/bfloat16/float32/float64 [K, d] with d = 6"),
    (dict(teacher_prototypes=torch.randn(4, 6)), "teacher_prototypes must be float16/bfloat16/float32/float64 [K, d] "
                                                 "with K = 5 (from prototypes)"),
    (dict(centre=torch.zeros(6)), "centre must be float16/bfloat16/float32/float64 [K] with K = 5 (from prototypes)"),
    (dict(centre=torch.zeros(2, 5)), "centre must be float16/bfloat16/float32/float64 [K], got float32 [2, 5]"),
    (dict(student=torch.randn(9, 6)), "student rows (9) and teacher rows (4) must be n_student_views (4) and "
                                      "n_teacher_views (2) times B"),
    (dict(teacher=torch.randn(6, 6)), "student has B = 2 images per view and teacher 3; they must be equal"),
    (dict(n_teacher_views=5), "needs n_student_views >= 2 and n_teacher_views <= n_student_views"),
    (dict(n_student_views=1, n_teacher_views=1, student=torch.randn(4, 6)), "needs n_student_views >= 2"),
    (dict(n_student_views=0), "n_student_views must be a positive int, got 0"),
    (dict(n_teacher_views=2.0), "n_teacher_views must be a positive int, got 2.0"),
    (dict(n_teacher_views=True), "n_teacher_views must be a positive int, got True"),
    (dict(student_temp=0.0), "student_temp must be a finite number > 0, got 0.0"),
    (dict(teacher_temp=-0.04), "teacher_temp must be a finite number > 0, got -0.04"),
    (dict(teacher_temp=float("nan")), "teacher_temp must be a finite number > 0, got nan"),
    (dict(student_temp=torch.tensor(0.1)), "student_temp must be a finite number > 0, got tensor(0.1000)"),
    (dict(prototypes=torch.randn(5, 6, dtype=F64)), "prototypes must have the dtype of student (torch.float32), "
                                                    "got float64"),
    (dict(teacher=torch.randn(4, 6, dtype=F16)), "teacher must have the dtype of student (torch.float32), got float16"),
    (dict(teacher=torch.randn(4, 6, device="meta")), "teacher must be on cpu like the other inputs"),
    (dict(centre=torch.zeros(5, device="meta")), "centre must be on cpu like the other inputs"),
    (dict(student=torch.randn(0, 6), teacher=torch.randn(0, 6)), "student has B = 0 images per view"),
    (dict(student=torch.randn(8, 0), teacher=torch.randn(4, 0), prototypes=torch.randn(5, 0)), "needs d >= 1"),
])
def test_bad_arguments_are_named(change, message):
    args = {**_good(), **change}
    with pytest.raises(ValueError) as error:
        dino_loss(args.pop("student"), args.pop("teacher"), args.pop("prototypes"), args.pop("centre"), **args)
    assert message in str(error.value), str(error.value)
    assert str(error.value).startswith("vitfast.ops.dino_loss: ")
    assert "\n" not in str(error.value)
