"""Shared test setup: the Triton interpreter on CPU-only machines (its bf16 dot and casts mended), the tolerance
table of the tests outside tests/ops, and the small digits data of the methods' CLI tests."""
import os

import torch

# TRITON_INTERPRET is read when @triton.jit decorates a kernel, so it must be set before any
# vitfast.kernels module is imported. On a GPU machine the kernels run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


# ---- bf16 under the Triton interpreter ----
# The interpreter gets bf16 wrong in two ways a GPU does not: its tl.dot multiplies the raw uint16 bits of bf16
# operands (upstream triton issue #11584) and its fp32 -> bf16 casts truncate instead of rounding to nearest even.
# vitfast.triton_interpreter mends both, each only while a probe finds the bug (so the mends switch themselves off
# on a fixed Triton); nothing is touched on a GPU. Nothing to do in tests: bf16 Triton cases just work.
INTERPRETER_MENDS = {"bf16_dot": False, "bf16_cast": False}
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    try:
        import triton  # noqa: F401
    except ImportError:  # no triton: the triton backend is skipped anyway
        pass
    else:
        from vitfast import triton_interpreter

        INTERPRETER_MENDS = triton_interpreter.mend()


@pytest.fixture
def small_digits(monkeypatch):
    """Training runs on the first 320 / 64 / 64 images of digits (at the size the run asks for: 16 px gives 10 steps
    of 32 per epoch), with no plots: the cheap data of the methods' end-to-end CLI tests."""
    from vitfast import engine

    load_splits = engine.load_splits
    cache = {}

    def first_images(name, **kwargs):
        if not cache:
            sizes = {"train": 320, "val": 64, "test": 64}
            cache.update({s: split.subset(range(sizes[s])) for s, split in load_splits(name, **kwargs).items()})
        return cache

    monkeypatch.setattr(engine, "load_splits", first_images)
    monkeypatch.setattr(engine.Trainer, "_plot", lambda self: None)


@pytest.fixture
def interpreter_bf16_cast():
    """(patched, probe): whether the fp32 -> bf16 rounding patch is applied, and the probe (True while casts truncate)."""
    from vitfast.triton_interpreter import bf16_cast_truncates

    return INTERPRETER_MENDS["bf16_cast"], bf16_cast_truncates


@pytest.fixture
def interpreter_bf16_dot():
    """(patched, probe): whether the bf16-dot patch is applied, and the probe (True while a bf16 dot is wrong)."""
    from vitfast.triton_interpreter import bf16_dot_is_wrong

    return INTERPRETER_MENDS["bf16_dot"], bf16_dot_is_wrong


# Absolute and relative tolerance per dtype of the computation, against a float64 reference, for the tests outside
# tests/ops (model, evaluation). The op tests use the measured table of tests/ops/conftest.py, whose assert_close
# overrides this one there (and whose backend_device serves them).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (1e-1, 2e-2),
}


@pytest.fixture
def assert_close():
    """assert_close(actual, expected, dtype, name): compares in float64 with the dtype's tolerance.

    Sums over many terms grow the absolute error, so the absolute tolerance scales with the
    magnitude of the expected values.
    """

    def check(actual, expected, dtype, name=""):
        atol, rtol = TOLERANCES[dtype]
        expected = expected.double()
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
        torch.testing.assert_close(actual.double(), expected, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")

    return check

