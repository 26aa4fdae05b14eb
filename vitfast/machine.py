"""What this machine is: the CPU's model and the instruction sets that decide its fp32 / bf16 speed, the GPU if any.

Benchmarks and the results table name the machine with ``describe()``; the engine warns with ``cpu_bf16_hardware()``
before a bf16 run on a CPU that has no bf16 instructions (there bf16 matmuls are emulated, far slower than fp32).
"""
from __future__ import annotations

import os
import platform
from typing import Optional, Set


def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> Set[str]:
    return set(_cpuinfo_field("flags").split())


def cpu_bf16_hardware() -> Optional[str]:
    """The CPU's bf16 matrix instructions ("AMX", "AVX-512 BF16"), or None when it has neither."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16"
    return None


def describe() -> str:
    """e.g. 'AMD EPYC, 2 cores (AVX2, no bf16 hardware), no GPU, torch 2.14.1'."""
    import torch  # noqa: PLC0415 (callers that only need the CPU do not load torch)
    flags = cpu_flags()
    isa = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f")) if flag in flags]
    isa.append(cpu_bf16_hardware() or "no bf16 hardware")
    gpu = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    return f"{cpu_model()}, {os.cpu_count()} cores ({', '.join(isa)}), {gpu}, torch {torch.__version__}"
