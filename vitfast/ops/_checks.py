"""Argument validation and dtype rules shared by the ops: one place, one message format.

Errors name the argument, what was expected and what arrived, e.g.
``keep_idx must be int64 [B, K] with values in [0, 64), got float32 [8, 16]``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
Dim = Union[int, str, None]  # an int fixes the size; a str names a size that must agree across arguments


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and statistics are accumulated in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
                # 3 launches + the assert (clamp, eq, all), not 5 (ge, all, lt, all, and).
                inside = (value.clamp(value_range[0], value_range[1] - 1) == value).all()
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

    def grid(self, positions: Optional[torch.Tensor], grid_size: Optional[int], n: int, device) -> int:
        """Pair-relation ops: validate ``positions`` [B, N] int64 (cells of an S x S grid) and the grid side S
        (required with positions; sqrt(N) without). Returns S."""
        if grid_size is None:
            if positions is not None:
                self.fail("grid_size (the side S of the token grid) is required with positions")
            grid_size = math.isqrt(n)
            if grid_size * grid_size != n:
                self.fail(f"N = {n} tokens is not a square grid; pass grid_size")
        if not isinstance(grid_size, int) or isinstance(grid_size, bool) or grid_size < 1:
            self.fail(f"grid_size must be a positive int, got {grid_size!r}")
        if positions is not None:
            self.tensor("positions", positions, ("B", "N"), dtypes=(torch.int64,), device=device,
                        value_range=(0, grid_size * grid_size))
        elif n > grid_size * grid_size:
            self.fail(f"N = {n} tokens do not fit a {grid_size}x{grid_size} grid; pass positions")
        return grid_size

    def pair_mask(self, pair_mask: Optional[torch.Tensor], device) -> None:
        """Pair-relation ops: ``pair_mask`` is bool [N, N] (shared by the batch) or [B, N, N], or None."""
        if pair_mask is None:
            return
        if not isinstance(pair_mask, torch.Tensor) or pair_mask.dim() == 2:
            self.tensor("pair_mask", pair_mask, ("N", "N"), dtypes=(torch.bool,), device=device)
        else:
            self.tensor("pair_mask", pair_mask, ("B", "N", "N"), dtypes=(torch.bool,), device=device)

    def finite(self, **tensors) -> None:
        """Opt-in NaN/Inf check (costs a device sync); used where a NaN would silently poison training."""
        for name, value in tensors.items():
            if value is not None and not _tracing(value) and not torch.isfinite(value).all():
                self.fail(f"{name} contains NaN or Inf")


def _tracing(value: torch.Tensor) -> bool:
    """Data-dependent checks are skipped on fake/meta tensors (torch.compile tracing)."""
    return value.device.type == "meta" or isinstance(value, torch._subclasses.FakeTensor) or torch.compiler.is_compiling()
