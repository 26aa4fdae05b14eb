"""Triton kernels of vitfast, one module per fused op (installed as the subpackage ``vitfast.kernels``).

Each module holds its ``@triton.jit`` kernels, their launchers (plain functions taking contiguous tensors)
and a module-level ``AOT_SPECS: list[AotSpec]``: every kernel with the signature, constexprs and launch
parameters it is really launched with. ``python -m vitfast.compile_check`` compiles every entry ahead of
time for sm_80 and sm_90 and fails on a compile error, a register spill or missing tensor-core code.
"""
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AotSpec:
    """One kernel variant to compile ahead of time.

    kernel:          the ``@triton.jit`` function.
    signature:       every argument name -> Triton type: ``"*fp16"``, ``"*i64"``, ``"i32"``, ``"constexpr"``.
    constexprs:      values of the ``"constexpr"`` arguments (block sizes, flags, patch size, ...).
    num_warps, num_stages: launch options, taken from the same table the launcher uses.
    variant:         short label for the report, e.g. ``"fp16 p=16"``.
    aligned:         arguments the JIT would specialise as divisible by 16 (pointers from the caching
                     allocator, sizes like D=768), so the AOT code matches what runs.
    tensor_cores:    the kernel must emit tensor-core instructions (mma / wgmma) on every target.
    """

    kernel: Any
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    variant: str = ""
    aligned: tuple = field(default_factory=tuple)
    tensor_cores: bool = False

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return fn.__name__
