"""Backend selection shared by every fused op.

Each op declares its backends once, with :func:`declare_backends`: the reference functions, the names of
its C++ schemas, its Triton launchers, and the input dtypes each backend accepts. Which backend runs is
decided once per call, at the Python boundary, from (in order) the ``backend=`` argument, the environment
variable ``VITFAST_BACKEND``, and the default preference for the tensors' device. A backend that cannot run
the call (not built, not for this device, or not for this dtype: Triton kernels compute in fp32, so most
do not take float64) falls back to the first backend of the device's preference that can, with a warning
once per (op, wanted, chosen, reason): never silently. The reference takes every floating dtype on every
device, so float64 always runs somewhere.

Backends:
  ``triton``  Triton kernels in ``vitfast.kernels`` (CUDA tensors, or CPU tensors under
              ``TRITON_INTERPRET=1``, which is how the tests run them without a GPU).
  ``cuda``    CUDA C++ in ``vitfast._C`` (CUDA tensors; present when the extension was built with CUDA).
  ``cpu``     C++ in ``vitfast._C`` (CPU tensors; always built).
  ``torch``   the plain-PyTorch reference (any device; the oracle of every test).
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch

from ._checks import FLOATING

BACKENDS = ("triton", "cuda", "cpu", "torch")
ENV_VAR = "VITFAST_BACKEND"
NO_FLOAT64 = (torch.float16, torch.bfloat16, torch.float32)  # kernels that compute in fp32

# Default preference per device type: the fastest first, the reference last.
_PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled extension ``vitfast._C`` (which registers ``torch.ops.vitfast_C``), or None."""
    try:
        return importlib.import_module("vitfast._C")
    except ImportError as error:  # a source checkout without a build: the torch backend still works
        warnings.warn(f"vitfast._C is not built ({error}); only the torch and triton backends are available")
        return None


@functools.lru_cache(maxsize=None)
def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _has_kernel(schema_name: str, dispatch_key: str) -> bool:
    if extension() is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"vitfast_C::{schema_name}", dispatch_key)
    except RuntimeError:  # the schema is not declared in this build
        return False


class Implementation(NamedTuple):
    forward: Callable
    backward: Callable


@dataclass(frozen=True, eq=False)
class OpBackends:
    """The backends of one op (build it with :func:`declare_backends`).

    ``reference``: (forward, backward) in plain PyTorch: the ``torch`` backend (backward None: an op without one).
    ``native``:    (forward, backward) schema names in ``torch.ops.vitfast_C``; ``cpu`` / ``cuda`` run where
                   the forward schema has a kernel for the CPU / CUDA dispatch key.
    ``triton``:    (module, forward, backward): the launchers, imported on first use (triton only then).
    ``dtypes``:    backend name -> the input dtypes it accepts; the op has exactly the backends named here.
    """

    op_name: str
    reference: Tuple[Callable, Callable]
    dtypes: Mapping[str, Tuple[torch.dtype, ...]]
    native: Optional[Tuple[str, str]] = None
    triton: Optional[Tuple[str, str, str]] = None

    def __post_init__(self):
        for name in self.dtypes:
            if name not in BACKENDS:
                raise ValueError(f"{self.op_name}: unknown backend {name!r}; expected one of {BACKENDS}")
        if set(self.dtypes.get("torch", ())) != set(FLOATING):
            raise ValueError(f"{self.op_name}: the torch reference must take every floating dtype")
        if ("cpu" in self.dtypes or "cuda" in self.dtypes) and self.native is None:
            raise ValueError(f"{self.op_name}: the cpu/cuda backends need native=(forward, backward) schema names")
        if "triton" in self.dtypes and self.triton is None:
            raise ValueError(f"{self.op_name}: the triton backend needs triton=(module, forward, backward)")

    def runs_on(self, name: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> bool:
        """Whether backend ``name`` is declared and installed for this op, runs on ``device`` and takes ``dtype``."""
        if name not in self.dtypes or (dtype is not None and dtype not in self.dtypes[name]):
            return False
        if name == "torch":
            return True
        if name in ("cpu", "cuda"):
            return device.type == name and _has_kernel(self.native[0], name.upper())
        # triton
        on_device = device.type == "cuda" or (device.type == "cpu" and triton_interpreter())
        return on_device and _triton_importable()

    def available(self) -> List[str]:
        """Backends of this op that can run on this machine now (on some device it has)."""
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        return [n for n in BACKENDS if any(self.runs_on(n, d) for d in devices)]

    def needing_a_device(self) -> Dict[str, str]:
        """Backends of this op that are built or installed but cannot run here now: name -> what they need."""
        runnable, missing = self.available(), {}
        if "cuda" in self.dtypes and "cuda" not in runnable and _has_kernel(self.native[0], "CUDA"):
            missing["cuda"] = "built; needs a CUDA GPU (none is visible)"
        if "triton" in self.dtypes and "triton" not in runnable and _triton_importable():
            missing["triton"] = "installed; needs a CUDA GPU (or TRITON_INTERPRET=1: the slow CPU interpreter, for tests)"
        return missing

    def select(self, device: torch.device, dtype: torch.dtype, requested: Optional[str] = None) -> str:
        """Resolve the backend for a call on ``device`` with inputs of ``dtype``; warn once when falling back."""
        return _select(self.op_name, device.type, dtype, requested)

    def __call__(self, name: str) -> Implementation:
        """The forward/backward functions of backend ``name``."""
        if name == "torch":
            return Implementation(*self.reference)
        if name in ("cpu", "cuda"):  # one schema; the dispatcher picks the CPU or CUDA kernel by device
            extension()
            return Implementation(*(getattr(torch.ops.vitfast_C, schema) if schema else None for schema in self.native))
        module = importlib.import_module(self.triton[0])
        return Implementation(*(getattr(module, name) if name else None for name in self.triton[1:]))


_REGISTRY: Dict[str, OpBackends] = {}


def declare_backends(op_name: str, **declaration) -> OpBackends:
    """Declare (and register) the backends of an op; see :class:`OpBackends` for the fields."""
    table = OpBackends(op_name, **declaration)
    _REGISTRY[op_name] = table
    return table


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _assume_constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result`` without its ``import torch._dynamo`` (2 s of every ``import vitfast``):
    the same marker, which torch.compile reads when it traces the call. tests/ops/test_backend_selection.py checks that
    it is what the public decorator sets."""
    fn._dynamo_marked_constant = True
    return fn


# Under torch.compile the choice is made once while tracing and baked into the graph.
@_assume_constant_result
def _select(op_name: str, device_type: str, dtype: torch.dtype, requested: Optional[str]) -> str:
    table = _REGISTRY[op_name]
    device = torch.device(device_type)
    preference = _PREFERENCE.get(device_type, ("torch",))
    requested = requested or os.environ.get(ENV_VAR) or None
    if requested is not None:
        requested = requested.strip().lower()
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} (argument or {ENV_VAR}), got {requested!r}")
        wanted = requested
    else:
        wanted = next((n for n in preference if table.runs_on(n, device)), "torch")
    if table.runs_on(wanted, device, dtype):
        return wanted
    chosen = next((n for n in preference if table.runs_on(n, device, dtype)), "torch")
    if table.runs_on(wanted, device):
        reason = f"does not take {_dtype_name(dtype)} inputs"
    else:
        reason = f"is not available for {device_type} tensors here"
    _warn_fallback(op_name, wanted, chosen, reason)
    return chosen


@functools.lru_cache(maxsize=None)
def _warn_fallback(op_name: str, wanted: str, chosen: str, reason: str) -> None:
    warnings.warn(
        f"vitfast.ops.{op_name}: backend {wanted!r} {reason}; falling back to {chosen!r} "
        f"(vitfast.ops.available_backends() lists what runs here)",
        RuntimeWarning,
        stacklevel=5,
    )


def _tables(op: Optional[str]) -> List[OpBackends]:
    if op is None:
        return list(_REGISTRY.values())
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(_REGISTRY)}")
    return [_REGISTRY[op]]


def available_backends(op: Optional[str] = None) -> List[str]:
    """Backends that can run on this machine now: for one op, or those any op offers (what is built but needs a
    device that is not here is listed by :func:`backends_needing_a_device`)."""
    found = {n for table in _tables(op) for n in table.available()}
    return [n for n in BACKENDS if n in found]


def backends_needing_a_device(op: Optional[str] = None) -> Dict[str, str]:
    """Backends built or installed on this machine that cannot run now, with what they need (e.g. the ``cuda``
    backend of a CUDA build on a machine without a GPU)."""
    runnable = available_backends(op)
    found = {}
    for table in _tables(op):
        for name, need in table.needing_a_device().items():
            if name not in runnable:
                found.setdefault(name, need)
    return {n: found[n] for n in BACKENDS if n in found}
