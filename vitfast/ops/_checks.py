"""Argument validation shared by the ops: one place, one message format.

Errors name the argument, what was expected and what arrived, e.g.
``keep_idx must be int64 [B, K] with values in [0, 64), got float32 [8, 16]``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
Dim = Union[int, str, None]  # an int fixes the size; a str names a size that must agree across arguments


def describe(tensor) -> str:
    if not isinstance(tensor, torch.Tensor):
        return type(tensor).__name__
    return f"{str(tensor.dtype).replace('torch.', '')} {list(tensor.shape)} on {tensor.device}"


class Checker:
    """Checks the arguments of one call; named sizes (``"B"``, ``"D"``) must agree across arguments."""

    def __init__(self, op_name: str):
        self.op_name = op_name
        self.sizes = {}

    def fail(self, message: str):
        raise ValueError(f"vitfast.ops.{self.op_name}: {message}")

    def tensor(
        self,
        name: str,
        value,
        shape: Sequence[Dim],
        *,
        dtypes: Sequence[torch.dtype] = FLOATING,
        device: Optional[torch.device] = None,
        value_range: Optional[Tuple[int, int]] = None,
    ) -> torch.Tensor:
        """Check type, rank, named sizes, dtype, device and (for index tensors) the value range."""
        dims = ", ".join(str(s) for s in shape)
        dtype_names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        range_text = f" with values in [{value_range[0]}, {value_range[1]})" if value_range else ""
        expected = f"{dtype_names} [{dims}]{range_text}"
        if not isinstance(value, torch.Tensor):
            self.fail(f"{name} must be a tensor {expected}, got {describe(value)}")
        if value.dim() != len(shape) or value.dtype not in dtypes:
            self.fail(f"{name} must be {expected}, got {describe(value)}")
        for axis, (want, got) in enumerate(zip(shape, value.shape)):
            if isinstance(want, int) and want != got:
                self.fail(f"{name} must be {expected}, got {describe(value)} (size {got} on axis {axis})")
            if isinstance(want, str):
                bound = self.sizes.setdefault(want, (got, name))
                if bound[0] != got:
                    self.fail(f"{name} must be {expected} with {want} = {bound[0]} (from {bound[1]}), "
                              f"got {describe(value)}")
        if device is not None and value.device != device:
            self.fail(f"{name} must be on {device} like the other inputs, got {describe(value)}")
        if value_range is not None and value.numel() > 0 and not _tracing(value):
            if value.device.type != "cpu":
                # No host sync on accelerators: an asynchronous device assert (the error surfaces at the next sync).
                inside = (value >= value_range[0]).all() & (value < value_range[1]).all()
                torch._assert_async(inside, f"vitfast.ops.{self.op_name}: {name} must be {expected}")
                return value
            low, high = int(value.min()), int(value.max())
            if low < value_range[0] or high >= value_range[1]:
                self.fail(f"{name} must be {expected}, got values in [{low}, {high}]")
        return value

    def same_dtype(self, reference_name: str, reference: torch.Tensor, **others) -> None:
        for name, value in others.items():
            if value is not None and value.dtype != reference.dtype:
                self.fail(f"{name} must have the dtype of {reference_name} ({reference.dtype}), got {describe(value)}")

    def finite(self, **tensors) -> None:
        """Opt-in NaN/Inf check (costs a device sync); used where a NaN would silently poison training."""
        for name, value in tensors.items():
            if value is not None and not _tracing(value) and not torch.isfinite(value).all():
                self.fail(f"{name} contains NaN or Inf")


def _tracing(value: torch.Tensor) -> bool:
    """Data-dependent checks are skipped on fake/meta tensors (torch.compile tracing)."""
    return value.device.type == "meta" or isinstance(value, torch._subclasses.FakeTensor) or torch.compiler.is_compiling()
