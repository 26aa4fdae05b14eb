"""Two mends for running the Triton kernels under Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors), so
that its bf16 results are those a GPU computes, and a speed-up (3.). Used by the test suite (tests/conftest.py) and by
``python -m vitfast.gpu_check --smoke``; never on a GPU (there is no interpreter there).

1. ``tl.dot`` of bf16 operands: the interpreter holds bf16 tensors as their raw uint16 bit patterns and hands
   them to np.matmul unchanged, so a bf16 dot multiplies integers (off by ~1e10; upstream Triton issue #11584).
   Mended by widening bf16 operands to fp32 first (exact: a bf16 is the upper half of an fp32), as tensor cores do.
2. fp32 -> bf16 casts (``tl.store`` into a bf16 tensor, ``.to(tl.bfloat16)``): the interpreter drops the low 16
   bits (truncation, up to 1 bf16 ulp = 0.8 %) where a GPU rounds to nearest even (half an ulp). Truncation doubles
   the measured bf16 error of every kernel. Mended by rounding through torch (round to nearest even).
3. ``tl.sort`` / ``tl.topk`` (nn_topk) spend minutes in the interpreter's per-element reduce of ``xor_sum``:
   its pairwise uses are computed by max ^ min instead (exact), see speed_up_sort.

Each mend (1., 2.) is applied only while a probe (a tiny kernel) finds the bug, so it switches itself off on a Triton that
is fixed. triton is imported inside the functions: importing this module does not need triton.
"""
from __future__ import annotations

import torch


def bf16_dot_is_wrong() -> bool:
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


def bf16_cast_truncates() -> bool:
    """Store fp32 values just above the midpoint between two bf16 numbers into a bf16 tensor under the interpreter."""
    import triton
    import triton.language as tl

    @triton.jit
    def _to_bf16(x_ptr, out_ptr):
        offs = tl.arange(0, 16)
        tl.store(out_ptr + offs, tl.load(x_ptr + offs))

    x = (1.0 + (torch.arange(16) + 1) * 2.0 ** -9 + 2.0 ** -12).float()  # above a rounding midpoint
    out = torch.empty(16, dtype=torch.bfloat16)
    _to_bf16[(1,)](x, out)
    return not torch.equal(out, x.to(torch.bfloat16))


def _widen_bf16(handle):
    """An interpreter tensor holding bf16 bits -> the same values as fp32 (the bits shifted to the upper half)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    if handle.get_element_ty() != tl.bfloat16:
        return handle
    return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


def mend_bf16_dot() -> bool:
    """Apply mend 1 when its probe finds the bug; returns whether it is applied. Idempotent."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "widens_bf16", False) or not bf16_dot_is_wrong():
        return getattr(builder.create_dot, "widens_bf16", False)
    original = builder.create_dot

    def create_dot(self, a, b, d, *args, **kwargs):
        return original(self, _widen_bf16(a), _widen_bf16(b), d, *args, **kwargs)

    create_dot.widens_bf16, create_dot.original = True, original
    builder.create_dot = create_dot
    return True


def mend_bf16_cast() -> bool:
    """Apply mend 2 when its probe finds truncation; returns whether it is applied. Idempotent."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, "rounds_bf16", False) or not bf16_cast_truncates():
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


def speed_up_sort() -> bool:
    """Not a mend of results, a speed-up: tl.sort / tl.topk swap pairs with ``xor_sum`` over axes of size 2, which
    the interpreter reduces by calling the combine function per element in Python (17 s for one tl.topk of a
    [32, 64] tile; nn_topk's kernel runs many). Over two elements x ^ y = max ^ min, two builtin (numpy) reductions:
    exact, 30x faster. Other axis sizes keep the original. Idempotent; returns whether it is applied."""
    import triton
    import triton.language as tl
    import triton.language.standard as standard

    global _original_xor_sum  # a global: the interpreter runs jit functions without their closure
    if getattr(standard.xor_sum, "pairs_by_max_min", False):
        return True
    _original_xor_sum = standard.xor_sum

    @triton.jit
    def xor_sum(input, axis=None, keep_dims=False):
        if axis is not None and input.shape[axis] == 2:
            return tl.max(input, axis, keep_dims=keep_dims) ^ tl.min(input, axis, keep_dims=keep_dims)
        return _original_xor_sum(input, axis, keep_dims=keep_dims)

    xor_sum.pairs_by_max_min, xor_sum.original = True, _original_xor_sum
    standard.xor_sum = xor_sum  # the sort's compare-and-swap looks it up in that module's globals
    return True


def mend() -> dict:
    """Apply both mends where needed: {"bf16_dot": applied, "bf16_cast": applied}, and the sort speed-up. Call under
    TRITON_INTERPRET=1."""
    speed_up_sort()
    return {"bf16_dot": mend_bf16_dot(), "bf16_cast": mend_bf16_cast()}
