"""Shared test setup: the Triton interpreter on CPU-only machines (with bf16 dots fixed), and the tolerance table."""
import os

import torch

# TRITON_INTERPRET is read when @triton.jit decorates a kernel, so it must be set before any
# vitfast.kernels module is imported. On a GPU machine the kernels run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


# ---- bf16 tl.dot under the Triton interpreter ----
# The interpreter holds bf16 tensors as their raw uint16 bit patterns, and its tl.dot hands those to
# np.matmul unchanged: a bf16 dot multiplies integers and is off by ~1e10 (upstream triton issue #11584).
# Until Triton fixes it, the tests patch the interpreter's dot to widen bf16 operands to fp32 first (exact:
# a bf16 is the upper half of an fp32), as a GPU's tensor cores do. A probe decides: the patch is applied
# only while a tiny bf16 dot comes out wrong, so it switches itself off on a fixed Triton, and it never
# touches a real GPU run (no interpreter there). Nothing to do in tests: bf16 Triton cases just work.

def interpreter_bf16_dot_is_wrong() -> bool:
    """Run a 16x16x16 bf16 tl.dot of small integers (exact in bf16 and fp32) under the interpreter."""
    import triton
    import triton.language as tl

    @triton.jit
    def _bf16_dot(a_ptr, b_ptr, out_ptr):
        rows = tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :]
        tl.store(out_ptr + rows, tl.dot(tl.load(a_ptr + rows), tl.load(b_ptr + rows)))

    a = (torch.arange(256) % 7 - 3).reshape(16, 16).to(torch.bfloat16)
    b = (torch.arange(256) % 5 - 2).reshape(16, 16).t().contiguous().to(torch.bfloat16)
    out = torch.empty(16, 16)
    _bf16_dot[(1,)](a, b, out)
    return not torch.equal(out, a.float() @ b.float())


def _widen_bf16(handle):
    """An interpreter tensor holding bf16 bits -> the same values as fp32 (the bits shifted to the upper half)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    if handle.get_element_ty() != tl.bfloat16:
        return handle
    return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


def patch_interpreter_bf16_dot() -> bool:
    """Apply the patch when the probe finds the bug; returns whether it is applied. Idempotent."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "widens_bf16", False) or not interpreter_bf16_dot_is_wrong():
        return getattr(builder.create_dot, "widens_bf16", False)
    original = builder.create_dot

    def create_dot(self, a, b, d, *args, **kwargs):
        return original(self, _widen_bf16(a), _widen_bf16(b), d, *args, **kwargs)

    create_dot.widens_bf16, create_dot.original = True, original
    builder.create_dot = create_dot
    return True


# ---- fp32 -> bf16 casts under the Triton interpreter ----
# The interpreter's cast from fp32 to bf16 (tl.store into a bf16 tensor, .to(tl.bfloat16)) drops the low 16 bits
# (truncation, an error up to 1 bf16 ulp = 0.8 %), where a GPU rounds to nearest even (half an ulp). That doubles
# the measured bf16 error of every Triton kernel and widens its tolerance band. Same remedy as the dot: a probe,
# and while it finds truncation, the cast rounds through torch (round-to-nearest-even, as the hardware).

def interpreter_bf16_cast_truncates() -> bool:
    """Store fp32 values just above the midpoint between two bf16 numbers into a bf16 tensor under the interpreter."""
    import triton
    import triton.language as tl

    @triton.jit
    def _to_bf16(x_ptr, out_ptr):
        offs = tl.arange(0, 16)
        tl.store(out_ptr + offs, tl.load(x_ptr + offs))

    x = 1.0 + (torch.arange(16) + 1) * 2.0 ** -9 + 2.0 ** -12  # mostly above a rounding midpoint
    out = torch.empty(16, dtype=torch.bfloat16)
    _to_bf16[(1,)](x.float(), out)
    return not torch.equal(out, x.float().to(torch.bfloat16))


def patch_interpreter_bf16_cast() -> bool:
    """Round fp32 -> bf16 casts to nearest even when the probe finds truncation; returns whether applied."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, "rounds_bf16", False) or not interpreter_bf16_cast_truncates():
        return getattr(builder.cast_impl, "rounds_bf16", False)
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            values = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits, tl.bfloat16)
        return original(self, src, dst_type)

    cast_impl.rounds_bf16, cast_impl.original = True, original
    builder.cast_impl = cast_impl  # create_fp_trunc and the other casts call self.cast_impl
    return True


INTERPRETER_BF16_DOT_PATCHED = INTERPRETER_BF16_CAST_PATCHED = False
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    try:
        import triton  # noqa: F401
    except ImportError:  # no triton: the triton backend is skipped anyway
        pass
    else:
        INTERPRETER_BF16_DOT_PATCHED = patch_interpreter_bf16_dot()
        INTERPRETER_BF16_CAST_PATCHED = patch_interpreter_bf16_cast()


@pytest.fixture
def interpreter_bf16_cast():
    """(patched, probe): whether the fp32 -> bf16 rounding patch is applied, and the probe (True while casts truncate)."""
    return INTERPRETER_BF16_CAST_PATCHED, interpreter_bf16_cast_truncates


@pytest.fixture
def interpreter_bf16_dot():
    """(patched, probe): whether the bf16-dot patch is applied, and the probe (True while a bf16 dot is wrong)."""
    return INTERPRETER_BF16_DOT_PATCHED, interpreter_bf16_dot_is_wrong

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

