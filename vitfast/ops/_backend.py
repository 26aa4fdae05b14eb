"""Backend selection shared by every fused op.

Each op owns a :class:`Backends` table mapping a backend name to an implementation object with
``forward(...)`` and ``backward(...)``. Which backend runs is decided once per call, at the Python
boundary, from (in order) the ``backend=`` argument, the environment variable ``VITFAST_BACKEND``,
and the default preference for the tensors' device. A requested backend that cannot run here falls
back to the next usable one with a warning, once per (op, requested, chosen) triple — never silently.

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
from typing import Callable, Dict, List, Optional

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")
ENV_VAR = "VITFAST_BACKEND"

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


class Backends:
    """The backend table of one op.

    ``native``: name of the op's schema in ``vitfast_C`` that the C++ backends implement
    (``cpu`` and ``cuda`` are available when that schema has a kernel for the CPU / CUDA key).
    ``triton``: dotted module path of the op's Triton launchers.
    """

    def __init__(self, op_name: str, *, native: Optional[str] = None, triton: Optional[str] = None):
        self.op_name = op_name
        self.native = native
        self.triton_module = triton
        self.impls: Dict[str, object] = {}

    def register(self, name: str, impl: object) -> None:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
        self.impls[name] = impl

    def runs_on(self, name: str, device: torch.device) -> bool:
        """Whether backend ``name`` is installed for this op and can run on tensors of ``device``."""
        if name not in self.impls:
            return False
        if name == "torch":
            return True
        if name == "cpu":
            return device.type == "cpu" and self.native is not None and _has_kernel(self.native, "CPU")
        if name == "cuda":
            return device.type == "cuda" and self.native is not None and _has_kernel(self.native, "CUDA")
        if name == "triton":
            on_device = device.type == "cuda" or (device.type == "cpu" and triton_interpreter())
            return on_device and _triton_importable()
        return False

    def available(self) -> List[str]:
        """Backends installed for this op on this machine (any device)."""
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        names = [n for n in BACKENDS if any(self.runs_on(n, d) for d in devices)]
        if "cuda" not in names and self.native and _has_kernel(self.native, "CUDA"):
            names.append("cuda")  # built, though no GPU is visible now
        return names

    def select(self, device: torch.device, requested: Optional[str] = None) -> str:
        """Resolve the backend for a call on ``device``; warn once when a request cannot be met."""
        return _select(self.op_name, device.type, requested)

    def __call__(self, name: str):
        return self.impls[name]


# Under torch.compile the choice is made once while tracing and baked into the graph.
@torch.compiler.assume_constant_result
def _select(op_name: str, device_type: str, requested: Optional[str]) -> str:
    table = _REGISTRY[op_name]
    device = torch.device(device_type)
    requested = requested or os.environ.get(ENV_VAR) or None
    if requested is not None:
        requested = requested.strip().lower()
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} (argument or {ENV_VAR}), got {requested!r}")
        if table.runs_on(requested, device):
            return requested
    preference = _PREFERENCE.get(device_type, ("torch",))
    chosen = next((n for n in preference if table.runs_on(n, device)), "torch")
    if requested is not None:
        _warn_fallback(op_name, requested, chosen, device_type)
    return chosen


@functools.lru_cache(maxsize=None)
def _warn_fallback(op_name: str, requested: str, chosen: str, device_type: str) -> None:
    warnings.warn(
        f"vitfast.ops.{op_name}: backend {requested!r} is not available for {device_type} tensors here; "
        f"falling back to {chosen!r} (vitfast.ops.available_backends() lists what is installed)",
        RuntimeWarning,
        stacklevel=5,
    )


_REGISTRY: Dict[str, Backends] = {}


def op_backends(op_name: str, **kwargs) -> Backends:
    """Create and register the backend table of a new op."""
    table = Backends(op_name, **kwargs)
    _REGISTRY[op_name] = table
    return table


def available_backends(op: Optional[str] = None) -> List[str]:
    """Backends usable on this install: for one op, or those any op offers."""
    if op is not None:
        if op not in _REGISTRY:
            raise ValueError(f"unknown op {op!r}; known ops: {sorted(_REGISTRY)}")
        return _REGISTRY[op].available()
    found = {n for table in _REGISTRY.values() for n in table.available()}
    return [n for n in BACKENDS if n in found]


class TritonBackend:
    """Imports an op's Triton launchers lazily: triton is only imported when the backend is used."""

    def __init__(self, module: str, forward: str, backward: str):
        self.module, self.forward_name, self.backward_name = module, forward, backward

    @functools.cached_property
    def _module(self):
        return importlib.import_module(self.module)

    def forward(self, *args, **kwargs):
        return getattr(self._module, self.forward_name)(*args, **kwargs)

    def backward(self, *args, **kwargs):
        return getattr(self._module, self.backward_name)(*args, **kwargs)


class NativeBackend:
    """The C++ ops of ``vitfast._C``; the dispatcher picks the CPU or CUDA kernel by device."""

    def __init__(self, forward: str, backward: str):
        self.forward_name, self.backward_name = forward, backward

    def forward(self, *args, **kwargs):
        extension()
        return getattr(torch.ops.vitfast_C, self.forward_name)(*args, **kwargs)

    def backward(self, *args, **kwargs):
        extension()
        return getattr(torch.ops.vitfast_C, self.backward_name)(*args, **kwargs)


def function_backend(forward: Callable, backward: Callable):
    """A backend made of two plain functions (the reference)."""
    return type("FunctionBackend", (), {"forward": staticmethod(forward), "backward": staticmethod(backward)})()
