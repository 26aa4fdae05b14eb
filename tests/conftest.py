"""Shared test setup: the Triton interpreter on CPU-only machines, and the one tolerance table."""
import os

import torch

# TRITON_INTERPRET is read when @triton.jit decorates a kernel, so it must be set before any
# vitfast.kernels module is imported. On a GPU machine the kernels run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Absolute and relative tolerance per dtype of the computation, against a float64 reference.
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


@pytest.fixture
def backend_device():
    """backend_device(backend): tensors for a backend live on CUDA when there is a GPU; else on the CPU (Triton via interpreter)."""

    def device(backend):
        if backend in ("triton", "cuda") and torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")

    return device
