"""The bf16 fixes of the Triton interpreter (tests/conftest.py): bf16 dots equal the fp32 result, and fp32 -> bf16
casts round to nearest even.

Costs well under a second: three tiny kernels, one program each.
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="the patch concerns the Triton interpreter (CPU-only machines)")


@triton.jit
def _dot_kernel(a_ptr, b_ptr, out_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [M, N] fp32 = a [M, K] @ b [K, N], accumulated over K tiles (tl.dot with an accumulator)."""
    rows, cols = tl.arange(0, M), tl.arange(0, N)
    acc = tl.zeros((M, N), tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * K + ks[None, :])
        b = tl.load(b_ptr + ks[:, None] * N + cols[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_interpreter_dot_equals_the_fp32_product(dtype):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 64, generator=gen).to(dtype)
    b = torch.randn(64, 32, generator=gen).to(dtype)
    out = torch.empty(16, 32)
    _dot_kernel[(1,)](a, b, out, M=16, K=64, N=32, BLOCK_K=32)
    # The inputs are exact in fp32, so the only difference is the fp32 summation order.
    torch.testing.assert_close(out, a.float() @ b.float(), atol=1e-5, rtol=1e-5)


def test_probe_detects_the_bug_it_fixes(interpreter_bf16_dot, monkeypatch):
    patched, probe = interpreter_bf16_dot
    assert not probe()  # with the patch (or on a fixed Triton) a bf16 dot is right
    if not patched:
        return  # Triton's own dot is right: the patch switched itself off, nothing else to check
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    monkeypatch.setattr(builder, "create_dot", builder.create_dot.original)
    assert probe()  # the unpatched interpreter gets the bf16 dot wrong: the probe can fail


@triton.jit
def _store_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs))  # fp32 values stored into a bf16 tensor: a cast


def test_interpreter_fp32_to_bf16_cast_rounds_to_nearest_even():
    """A GPU rounds fp32 -> bf16 to nearest even; the interpreter (patched) must too, ties included."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(224, generator=gen)
    ulp = 2.0 ** -8  # bf16's spacing on [1, 2)
    ties = 1.0 + torch.arange(16) * ulp + ulp / 2  # exact midpoints: round to the even neighbour
    x = torch.cat([x, ties, -ties])
    out = torch.empty(x.numel(), dtype=torch.bfloat16)
    _store_kernel[(1,)](x, out, N=x.numel())
    assert torch.equal(out, x.to(torch.bfloat16))


def test_cast_probe_detects_the_truncation_it_fixes(interpreter_bf16_cast, monkeypatch):
    patched, probe = interpreter_bf16_cast
    assert not probe()
    if not patched:
        return  # Triton's own cast rounds: the patch switched itself off
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    monkeypatch.setattr(builder, "cast_impl", builder.cast_impl.original)
    assert probe()  # the unpatched interpreter truncates: the probe can fail
