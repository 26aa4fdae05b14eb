"""State that a loss carries from step to step: DINO's centre and the NNCLR / MAE-CT feature queue.

    centre = MomentumCentre(dim=1024, momentum=0.9)     # buffer centre [1, K], zeros at the start
    centre.update(teacher_logits.mean(0), count=B)       # c <- m·c + (1 - m)·(mean over the global batch)
    queue = FeatureQueue(size=65536, dim=256)            # buffers features [Q, d], ids [Q] (-1 = empty)
    queue.push(z0.detach(), ids)                         # FIFO; the rows of every rank, in rank order
    keys, key_ids = queue.contents()                     # the filled part: [n, d], [n]

Both are ``nn.Module`` s whose state is buffers, so it travels with the method's ``state_dict`` (an
exact resume restores it) and with ``.to(device)``. Under ``torch.distributed`` the centre update
averages over all ranks and the queue receives the rows of all ranks, so every rank holds the same
state (docs/methods.md §5.1 and §6.2). Neither carries gradients: updates run under ``no_grad``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..distributed import gather_rows, world_size

__all__ = ["MomentumCentre", "FeatureQueue"]


class MomentumCentre(nn.Module):
    """An exponential moving average of the batch mean of some outputs (DINO's teacher centre)."""

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"MomentumCentre: dim must be a positive int, got {dim!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"MomentumCentre: momentum must be in [0, 1], got {momentum!r}")
        self.momentum = momentum
        self.register_buffer("centre", torch.zeros(1, dim))

    @torch.no_grad()
    def update(self, batch_mean: Tensor, count: int = 1) -> None:
        """``batch_mean`` [K] (or [1, K]): this rank's mean over ``count`` rows.

        The global mean weights every rank by its ``count`` (all-reduce of sum and count), so unequal
        per-rank batches give the same centre as one process holding the whole batch.
        """
        mean = batch_mean.detach().reshape(1, -1)
        if mean.shape != self.centre.shape:
            raise ValueError(f"MomentumCentre.update: batch_mean must have {self.centre.shape[1]} values, "
                             f"got shape {tuple(batch_mean.shape)}")
        total = torch.cat([mean.float().flatten() * count, mean.new_full((1,), float(count), dtype=torch.float32)])
        if world_size() > 1:
            dist.all_reduce(total)
        global_mean = (total[:-1] / total[-1]).view_as(self.centre).to(self.centre.dtype)
        self.centre.mul_(self.momentum).add_(global_mean, alpha=1.0 - self.momentum)


class FeatureQueue(nn.Module):
    """A first-in-first-out queue of ``size`` feature rows [size, dim] with the dataset id of each row."""

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"FeatureQueue: {name} must be a positive int, got {value!r}")
        self.register_buffer("features", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.int64))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.int64))  # next row to overwrite
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64))

    @property
    def size(self) -> int:
        return self.features.shape[0]

    def __len__(self) -> int:
        return int(self.filled)

    @torch.no_grad()
    def push(self, features: Tensor, ids: Tensor) -> None:
        """Append ``features`` [B, dim] and ``ids`` [B] int64 of every rank (rank 0's first); the oldest rows go."""
        if features.ndim != 2 or features.shape[1] != self.features.shape[1]:
            raise ValueError(f"FeatureQueue.push: features must be [B, {self.features.shape[1]}], "
                             f"got {tuple(features.shape)}")
        if ids.shape != features.shape[:1] or ids.dtype != torch.int64:
            raise ValueError(f"FeatureQueue.push: ids must be int64 [{features.shape[0]}], "
                             f"got {ids.dtype} {tuple(ids.shape)}")
        features, ids = gather_rows(features.detach()), gather_rows(ids.detach())
        if features.shape[0] >= self.size:  # only the newest rows survive
            features, ids = features[-self.size:], ids[-self.size:]
        rows = (self.pointer + torch.arange(features.shape[0], device=self.ids.device)) % self.size
        self.features[rows] = features.to(self.features.dtype)
        self.ids[rows] = ids
        self.pointer.copy_((self.pointer + features.shape[0]) % self.size)
        self.filled.copy_(torch.clamp(self.filled + features.shape[0], max=self.size))

    def contents(self) -> Tuple[Tensor, Tensor]:
        """The filled rows: features [n, dim] and ids [n] (n = len(self); storage order, not age order)."""
        n = int(self.filled)
        return self.features[:n], self.ids[:n]

