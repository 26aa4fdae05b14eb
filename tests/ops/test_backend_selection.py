"""Backend selection of every op: the declarations, the argument / VITFAST_BACKEND / device order, the fallback
by device and by dtype (float64 on any device), the one-time warning, available_backends(), and that the Triton
kernels never reach back into vitfast.ops.

Tiny shapes (a few tokens): the whole file runs in a few seconds, the interpreter cases included.
"""
import ast
import pathlib
import warnings

import pytest
import torch

import vitfast
from vitfast.ops import _backend
from vitfast.ops._backend import BACKENDS, NO_FLOAT64, OpBackends, available_backends
from vitfast.ops._checks import FLOATING

OPS = ("masked_patch_embed", "masked_pixel_loss", "relation_loss", "relation_mlp_loss")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
KERNELS = pathlib.Path(__file__).resolve().parents[2] / "kernels"


def table(op):
    return _backend._REGISTRY[op]


def make_call(op, dtype):
    """(differentiable inputs, call(backend) -> scalar) for a tiny problem of ``op`` in ``dtype``."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    if op == "masked_patch_embed":
        images, weight, bias, pos = rand(2, 3, 8, 8), rand(6, 3, 4, 4), rand(6), rand(4, 6)
        keep = torch.tensor([[0, 3], [2, 1]])
        return [images, weight, bias, pos], lambda backend: vitfast.ops.masked_patch_embed(
            images, weight, bias, pos, keep, backend=backend).square().sum()
    if op == "masked_pixel_loss":
        pred, images = rand(2, 4, 48), rand(2, 3, 8, 8).detach()
        mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 1]])
        return [pred], lambda backend: vitfast.ops.masked_pixel_loss(pred, images, mask, 4, backend=backend)
    if op == "relation_loss":
        q, k = rand(2, 4, 9, 3), rand(2, 4, 9, 3)
        return [q, k], lambda backend: vitfast.ops.relation_loss(q, k, backend=backend)
    u, v, weight, bias = rand(2, 4, 5), rand(2, 4, 5), rand(9, 5), rand(9)
    return [u, v, weight, bias], lambda backend: vitfast.ops.relation_mlp_loss(u, v, weight, bias, backend=backend)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees the one-time fallback warnings afresh, and no VITFAST_BACKEND from outside."""
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    _backend._warn_fallback.cache_clear()
    yield
    _backend._warn_fallback.cache_clear()


# ---- the declarations ----

def test_every_op_declares_its_backends():
    assert set(OPS) <= set(_backend._REGISTRY)
    for op in OPS:
        declared = table(op).dtypes
        assert set(declared["torch"]) == set(FLOATING), op  # the reference takes everything: the last fallback
        assert set(declared) <= set(BACKENDS), op
    # Triton kernels that compute in fp32 do not claim float64 (masked_pixel_loss has an fp64 Triton path).
    for op in ("masked_patch_embed", "relation_loss", "relation_mlp_loss"):
        assert torch.float64 not in table(op).dtypes["triton"], op
    assert torch.float64 in table("masked_pixel_loss").dtypes["triton"]
    for op in ("relation_loss", "relation_mlp_loss"):  # no CUDA C++ kernel
        assert "cuda" not in table(op).dtypes and "cuda" not in available_backends(op), op


@pytest.mark.parametrize("declaration, message", [
    (dict(dtypes={"tpu": FLOATING, "torch": FLOATING}), "unknown backend 'tpu'"),
    (dict(dtypes={"torch": NO_FLOAT64}), "must take every floating dtype"),
    (dict(dtypes={"cpu": FLOATING, "torch": FLOATING}), "need native="),
    (dict(dtypes={"triton": NO_FLOAT64, "torch": FLOATING}), "needs triton="),
])
def test_bad_declarations_are_refused(declaration, message):
    with pytest.raises(ValueError, match=message):
        OpBackends("toy", reference=(None, None), **declaration)


# ---- argument, environment, device ----

@pytest.mark.parametrize("op", OPS)
def test_unknown_backend_is_refused(op):
    _, call = make_call(op, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        call("tpu")


@pytest.mark.parametrize("op", OPS)
def test_environment_picks_and_device_falls_back_loudly_once(op, monkeypatch):
    backends = table(op)
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select(CPU, torch.float32) == "torch"
    monkeypatch.setenv(_backend.ENV_VAR, " CUDA")  # not runnable on CPU tensors: loud fallback to the CPU backend
    expected = "cpu" if backends.runs_on("cpu", CPU) else "torch"
    with pytest.warns(RuntimeWarning, match=f"{op}: backend 'cuda' is not available for cpu tensors here; "
                                            f"falling back to '{expected}'"):
        assert backends.select(CPU, torch.float32) == expected
    _, call = make_call(op, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once, not on every call
        call(None)


@pytest.mark.parametrize("op", OPS)
def test_default_preference_per_device(op):
    backends = table(op)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cpu_choice = backends.select(CPU, torch.float32)
        assert cpu_choice == ("cpu" if backends.runs_on("cpu", CPU) else "torch")
        # A CUDA tensor is never needed to choose: the choice depends on the device type only.
        if _backend._triton_importable():
            assert backends.select(CUDA, torch.float16) == "triton"


# ---- float64 on every device ----

@pytest.mark.parametrize("op", ["masked_patch_embed", "relation_loss", "relation_mlp_loss"])
def test_float64_on_cuda_skips_triton(op):
    """float64 CUDA tensors: Triton does not take them; the next backend of CUDA's preference that does runs."""
    if not _backend._triton_importable():
        pytest.skip("triton is not installed")
    backends = table(op)
    expected = "cuda" if backends.runs_on("cuda", CUDA) else "torch"
    with pytest.warns(RuntimeWarning, match=f"{op}: backend 'triton' does not take float64 inputs; "
                                            f"falling back to '{expected}'"):
        assert backends.select(CUDA, torch.float64) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        assert backends.select(CUDA, torch.float64) == expected
        assert backends.select(CUDA, torch.float32) == "triton"


def test_float64_on_cuda_reaches_the_reference_when_nothing_else_takes_it(monkeypatch):
    """Without a CUDA C++ kernel (the relation ops; masked_patch_embed on a build without CUDA) float64 runs torch."""
    if not _backend._triton_importable():
        pytest.skip("triton is not installed")
    monkeypatch.setattr(_backend, "_has_kernel", lambda schema, key: False)
    for op in OPS:
        expected = "triton" if op == "masked_pixel_loss" else "torch"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            assert table(op).select(CUDA, torch.float64) == expected, op


@pytest.mark.parametrize("op", ["masked_patch_embed", "relation_loss", "relation_mlp_loss"])
def test_float64_with_triton_requested_runs_and_matches_the_reference(op):
    """Under the interpreter a CPU tensor with backend="triton" in float64 falls back (warning once) and is right."""
    if not table(op).runs_on("triton", CPU):
        pytest.skip("the triton backend does not run on CPU tensors here (needs TRITON_INTERPRET=1)")
    inputs, call = make_call(op, torch.float64)
    fallback = "cpu" if table(op).runs_on("cpu", CPU) else "torch"
    with pytest.warns(RuntimeWarning, match=f"backend 'triton' does not take float64 inputs; "
                                            f"falling back to '{fallback}'") as record:
        got = call("triton")
        got_grads = torch.autograd.grad(got, inputs)
        call("triton")
    assert len([w for w in record if "does not take float64" in str(w.message)]) == 1
    want = call("torch")
    want_grads = torch.autograd.grad(want, inputs)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for got_grad, want_grad in zip(got_grads, want_grads):
        assert got_grad.dtype == torch.float64
        torch.testing.assert_close(got_grad, want_grad, atol=1e-10, rtol=1e-10)


# ---- available_backends ----

def test_available_backends():
    everything = vitfast.ops.available_backends()
    assert "torch" in everything and everything == vitfast.available_backends()
    assert everything == [name for name in BACKENDS if any(name in available_backends(op) for op in OPS)]
    for op in OPS:
        assert available_backends(op) == table(op).available()
        assert "torch" in available_backends(op)
    if _backend.extension() is not None:
        assert "cpu" in everything
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        available_backends("nope")


def test_built_backends_that_need_a_device_are_listed_apart(monkeypatch):
    """available_backends() lists what runs now; a CUDA build without a GPU, or Triton without a GPU and without
    the interpreter, is reported by backends_needing_a_device() instead, with what it needs."""
    monkeypatch.setattr(_backend, "triton_interpreter", lambda: False)
    runnable, waiting = vitfast.ops.available_backends(), vitfast.ops.backends_needing_a_device()
    assert not set(runnable) & set(waiting)
    if not torch.cuda.is_available():
        assert "triton" not in runnable and "cuda" not in runnable
        if _backend._triton_importable():
            assert "needs a CUDA GPU" in waiting["triton"]
        if any(_backend._has_kernel(table(op).native[0], "CUDA") for op in OPS if table(op).native):
            assert waiting["cuda"] == "built; needs a CUDA GPU (none is visible)"
    monkeypatch.setattr(_backend, "triton_interpreter", lambda: True)
    if _backend._triton_importable():
        assert "triton" in vitfast.ops.available_backends() and "triton" not in vitfast.ops.backends_needing_a_device()


# ---- kernels/ stands alone ----

def _imports_vitfast_ops(source: str) -> bool:
    """Whether a module imports vitfast.ops: import statements (absolute or relative) or importlib calls."""
    is_ops = lambda name: name == "vitfast.ops" or name.startswith("vitfast.ops.")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(is_ops(alias.name) for alias in node.names):
            return True
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if is_ops(module) or (node.level >= 2 and (module == "ops" or module.startswith("ops.")
                                                       or (not module and any(a.name == "ops" for a in node.names)))):
                return True
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            name = str(node.args[0].value)
            if is_ops(name) or name.startswith("..ops"):
                return True
    return False


@pytest.mark.parametrize("source, imports", [
    ("import vitfast.ops.relation_loss as r", True), ("from vitfast.ops import relation_loss", True),
    ("from ..ops.relation_loss import _reference_forward", True), ("from .. import ops", True),
    ("importlib.import_module('vitfast.ops.relation_loss')", True),
    ('"""never imported from vitfast.ops"""\nimport torch\nfrom . import AotSpec', False),
])
def test_the_import_detector(source, imports):
    assert _imports_vitfast_ops(source) == imports


def test_no_kernel_module_imports_vitfast_ops():
    """The float64 fallback lives in the selection, not in the kernels: kernels/ never imports vitfast.ops."""
    sources = sorted(KERNELS.glob("*.py"))
    assert sources, KERNELS
    offenders = [path.name for path in sources if _imports_vitfast_ops(path.read_text())]
    assert offenders == [], f"kernels that import vitfast.ops: {offenders}"


def test_select_carries_the_marker_that_torch_compile_reads():
    """_backend marks _select as torch.compiler.assume_constant_result does, without importing torch._dynamo: the
    attributes the public decorator sets are on _select with the same values (a torch that changes the marker fails
    here; the fullgraph compile tests of every op would then fail too)."""
    def probe():
        return None

    marker = dict(vars(torch.compiler.assume_constant_result(probe)))
    assert marker and all(getattr(_backend._select, name, None) == value for name, value in marker.items())


def test_import_vitfast_does_not_load_the_compiler():
    """import vitfast leaves torch._dynamo unloaded (2 s of every train.py start and test subprocess)."""
    import subprocess
    import sys
    code = "import sys, vitfast, vitfast.train; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stdout + result.stderr[-2000:]
