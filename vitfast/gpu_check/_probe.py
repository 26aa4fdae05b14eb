"""Does the Triton interpreter's ``tl.dot`` get bf16 right? (upstream Triton issue #11584: it multiplies the raw
bit patterns). Imported only under TRITON_INTERPRET=1, where a wrong answer means: skip bf16 Triton rows."""
import torch
import triton
import triton.language as tl


@triton.jit
def _dot_kernel(a_ptr, b_ptr, out_ptr):
    offs = tl.arange(0, 16)
    a = tl.load(a_ptr + offs[:, None] * 16 + offs[None, :])
    b = tl.load(b_ptr + offs[:, None] * 16 + offs[None, :])
    tl.store(out_ptr + offs[:, None] * 16 + offs[None, :], tl.dot(a, b))


def interpreter_bf16_dot_ok() -> bool:
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=gen).to(torch.bfloat16) for _ in range(2))
    out = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, out)
    return torch.allclose(out, a.float() @ b.float(), rtol=1e-2, atol=1e-2)
