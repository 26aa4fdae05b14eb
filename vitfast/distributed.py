"""torchrun support: process group setup, and metric reduction across ranks.

Under ``torchrun --nproc_per_node=N`` the environment carries RANK / WORLD_SIZE / LOCAL_RANK; the
backend is NCCL on GPU and gloo on CPU. Without torchrun everything degrades to one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the torchrun process group if launched by torchrun; otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def mean_over_ranks(values: Dict[str, float], info: DistInfo) -> Dict[str, float]:
    """Average scalar metrics over ranks (every rank gets the result)."""
    if not info.enabled or not values:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return {k: v / info.world_size for k, v in zip(keys, tensor.cpu().tolist())}


def world_size() -> int:
    """Processes in the default group (1 without torch.distributed): for code that has no DistInfo (modules)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _check_equal_rows(x: torch.Tensor, what: str) -> None:
    """all_gather needs the same row count on every rank: say so instead of hanging or failing inside the backend."""
    count = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    counts = [torch.empty_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    found = [int(c) for c in counts]
    if len(set(found)) > 1:
        raise ValueError(f"{what}: every rank must hold the same number of rows, got {found} (rank order)")


def _all_gather_rows(x: torch.Tensor, what: str) -> torch.Tensor:
    _check_equal_rows(x, what)
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` [B, ...] of every rank concatenated in rank order [world·B, ...] (equal B everywhere; no gradient:
    a loss that needs one uses :func:`gather_rows_with_grad`)."""
    return x if world_size() == 1 else _all_gather_rows(x, "gather_rows")


class _GatherRowsWithGrad(torch.autograd.Function):
    """All-gather whose backward is right: every rank's loss may use every rank's rows, so the gradient of this
    rank's rows is the sum over ranks of the gradients of the gathered tensor (all-reduce), sliced to this rank."""

    @staticmethod
    def forward(ctx, x):
        ctx.rows = x.shape[0]
        return _all_gather_rows(x, "gather_rows_with_grad")

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sum: DDP then averages the parameter gradients over ranks, as for any loss
        start = rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_rows_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``gather_rows`` with a gradient: [B, ...] -> [world·B, ...] in rank order; the identity on one process."""
    if world_size() == 1:
        return x
    return _GatherRowsWithGrad.apply(x)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
