"""The sections of gpu_check: accuracy against float64, bitwise repeatability, timings and peak memory.

Each section returns a list of JSON-able rows; a row with ``"ok": False`` is a failure (timings never fail).
"""
from __future__ import annotations

import contextlib
import importlib
import time
import warnings
from typing import Dict, List, Optional

import torch
from torch import Tensor

from vitfast import ops

from . import measure
from .cases import CASES, DTYPES, TOLERANCES, OpCase, as_float64


def compare(actual: Tensor, expected: Tensor, dtype_name: str) -> dict:
    """Normwise error max|actual - expected| / max|expected| (absolute where expected is all zero) against the
    dtype's band; ``ratio`` = error / band (ok when <= 1). Non-finite values fail."""
    band = TOLERANCES[dtype_name]
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        return {"ok": False, "error": f"shape {list(a.shape)} != expected {list(e.shape)}"}
    if e.numel() == 0:
        return {"ok": True, "error_normwise": 0.0, "ratio": 0.0}
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(e).all())):
        return {"ok": False, "error_normwise": None, "ratio": float("inf"), "note": "non-finite values"}
    scale = e.abs().max().item()
    error = (a - e).abs().max().item()
    if scale > 0:
        error /= scale
    elif error > 0:  # an all-zero expectation must be met exactly
        return {"ok": False, "error_normwise": error, "max_abs_expected": 0.0, "ratio": float("inf")}
    return {"ok": error <= band, "error_normwise": error, "max_abs_expected": scale, "ratio": error / band}


@contextlib.contextmanager
def matmul_precision(dtype_name: str):
    """fp32 runs at torch's default "highest" (IEEE fp32 dots); "tf32" at "high" (the kernels' TF32 path)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if dtype_name == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def call_backend(case: OpCase, backend: str):
    """``fused`` pinned to ``backend``; a fallback to another backend (it would warn) is an error."""

    def fn(x):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*falling back.*")
            return case.fused(x, backend)

    return fn


def backend_takes(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``backend`` runs ``op`` for ``dtype`` inputs on ``device`` without falling back (its declaration)."""
    table = importlib.import_module(f"vitfast.ops.{op}").BACKENDS
    try:
        return table.runs_on(backend, device, dtype)
    except TypeError:  # a declaration without dtypes
        return table.runs_on(backend, device)


def backends_for(op: str, device: torch.device) -> List[str]:
    """The fused backends to check for ``op`` on ``device``: triton and cuda on a GPU; triton and cpu on the CPU."""
    wanted = ("triton", "cuda") if device.type == "cuda" else ("triton", "cpu")
    return [b for b in wanted if b in ops.available_backends(op)]


def accuracy(device, shapes_of, dtypes) -> List[dict]:
    """Every op x backend x dtype x shape: output and every gradient against autograd of the float64 reference."""
    rows = []
    for op, case in CASES.items():
        for shape in shapes_of(case):
            for dtype_name in dtypes:
                x = case.inputs(shape, DTYPES[dtype_name], device)
                x64 = as_float64(x, case.floating)
                reference = None
                for backend in backends_for(op, device):
                    row = dict(op=op, shape=shape, dtype=dtype_name, backend=backend)
                    if not backend_takes(op, backend, device, DTYPES[dtype_name]):
                        reason = f"{backend} does not take {dtype_name} inputs (its declaration)"
                        rows.append({**row, "ok": None, "skipped": reason})
                        continue
                    try:
                        with matmul_precision(dtype_name):
                            out, grads, grad_out = measure.run_step(call_backend(case, backend), x, case.grads,
                                                                    lambda o: case.upstream(o, x))
                        if reference is None:  # once per (shape, dtype): every backend gets the same upstream
                            reference = measure.run_step(case.reference, x64, case.grads,
                                                         lambda o, g=grad_out: g.to(o.dtype).expand_as(o))
                        ref_out, ref_grads, _ = reference
                        tensors = {"output": compare(out, ref_out, dtype_name)}
                        tensors.update({f"d_{n}": compare(grads[n], ref_grads[n], dtype_name) for n in case.grads})
                        rows.append({**row, "ok": all(t["ok"] for t in tensors.values()), "tensors": tensors})
                    except Exception as error:  # a crash is a failure of that row, the others still run
                        rows.append({**row, "ok": False, "error": f"{type(error).__name__}: {error}"})
    return rows


def _bits(t: Tensor) -> Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8)


def repeatability(device, shapes_of, dtypes, runs: int = 10) -> List[dict]:
    """``runs`` forward+backward passes on the same inputs give bitwise the same output and gradients."""
    rows = []
    for op, case in CASES.items():
        shape = shapes_of(case)[0]
        for dtype_name in dtypes:
            x = case.inputs(shape, DTYPES[dtype_name], device)
            for backend in backends_for(op, device):
                row = dict(op=op, shape=shape, dtype=dtype_name, backend=backend, runs=runs)
                if not backend_takes(op, backend, device, DTYPES[dtype_name]):
                    rows.append({**row, "ok": None, "skipped": f"{backend} does not take {dtype_name} inputs"})
                    continue
                try:
                    with matmul_precision(dtype_name):
                        results = [measure.run_step(call_backend(case, backend), x, case.grads,
                                                    lambda o: case.upstream(o, x)) for _ in range(runs)]
                    first = [results[0][0]] + [results[0][1][n] for n in case.grads]
                    differing = set()
                    for out, grads, _ in results[1:]:
                        for name, a, b in zip(["output"] + [f"d_{n}" for n in case.grads],
                                              first, [out] + [grads[n] for n in case.grads]):
                            if not torch.equal(_bits(a), _bits(b)):
                                differing.add(name)
                    rows.append({**row, "ok": not differing, "differing": sorted(differing)})
                except Exception as error:
                    rows.append({**row, "ok": False, "error": f"{type(error).__name__}: {error}"})
    return rows


def timings(device, shapes_of, dtypes, rounds: int, compile_backend: Optional[str] = None,
            deadline: float = float("inf")) -> List[dict]:
    """Fused (every backend) vs the eager reference vs torch.compile(reference): time and peak above the floor.
    Dtype by dtype (the first one first); cases that would start after ``deadline`` (time.time()) are skipped."""
    rows = []
    for dtype_name in dtypes:
        for op, case in CASES.items():
            for shape in shapes_of(case):
                if time.time() > deadline:
                    rows.append(dict(op=op, shape=shape, dtype=dtype_name, ok=None,
                                     skipped="time budget spent (--budget-s)"))
                    continue
                rows.extend(time_case(case, shape, dtype_name, device, rounds, compile_backend))
    return rows


def implementations(case: OpCase, device, dtype: torch.dtype) -> Dict[str, object]:
    """name -> callable on an input dict: each fused backend, the eager reference, torch.compile(reference)."""
    impls = {f"vitfast-{b}": call_backend(case, b) for b in backends_for(case.name, device)
             if (device.type == "cuda" or b != "triton")  # the interpreter's time means nothing
             and backend_takes(case.name, b, device, dtype)}
    impls["eager reference"] = case.reference
    impls["torch.compile(reference)"] = "compile"
    return impls


def time_case(case: OpCase, shape: str, dtype_name: str, device, rounds: int,
              compile_backend: Optional[str] = None, grads=None) -> List[dict]:
    """Rows for one (op, shape, dtype): every implementation, with the floor of the step."""
    grads = case.bench_grads if grads is None else grads
    x = case.inputs(shape, DTYPES[dtype_name], device)
    upstream = lambda o: case.upstream(o, x)  # noqa: E731
    floor_peak = measure.peak_bytes(measure.floor_step(x, grads), device)
    floor_bytes = measure.tensor_bytes([x[n] for n in grads] * 2 + [v for k, v in x.items()
                                       if isinstance(v, Tensor) and k not in grads])
    rows = []
    for name, fn in implementations(case, device, DTYPES[dtype_name]).items():
        row = dict(op=case.name, shape=shape, dtype=dtype_name, implementation=name, device=str(device))
        try:
            with matmul_precision(dtype_name):
                if fn == "compile":
                    torch._dynamo.reset()  # a fresh cache per case: no silent eager fallback at the recompile limit
                    fn = torch.compile(case.reference, **({"backend": compile_backend} if compile_backend else {}))
                step = measure.make_step(fn, x, grads, upstream)
                samples = measure.time_ms(step, device, rounds, warmup=2)
                peak = measure.peak_bytes(step, device)
            rows.append({**row, **measure.summary(samples), "peak_above_floor_bytes": peak - floor_peak,
                         "floor_bytes": floor_bytes})
        except Exception as error:
            rows.append({**row, "error": f"{type(error).__name__}: {error}"})
    return rows
