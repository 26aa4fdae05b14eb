"""Batches of an in-memory ``ImageDataset`` on the training device: reproducible, resumable, sharded.

    loader = BatchLoader(splits["train"], 128, seed=0, device="cuda", rank=rank, world_size=world)
    loader.load_state_dict(checkpoint["loader"])          # optional: resume mid-epoch
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)                           # keeps a restored mid-epoch position
        for images, labels, indices in loader:            # uint8 [b, C, H, W], int64 [b], int64 [b], on device
            ...
            checkpoint["loader"] = loader.state_dict()    # {"epoch", "batch"}: the next batch to yield

Order: epoch e is ``randperm(N)`` from a CPU generator seeded with a hash of (seed, e) — the same on
every rank and every device type, independent of anything else the run draws. ``batch_size`` is
**per rank**: global batch k is ``perm[k·G : (k+1)·G]`` with G = batch_size · world_size, and rank r
takes the contiguous slice ``[r·batch_size, (r+1)·batch_size)`` of it, so the ranks' batches
partition the global batch and 2 ranks × B see exactly the images of 1 rank × 2B.

``repeats`` = R > 1 is repeated augmentation as the small-data ViT release samples it (docs/methods.md §5.2):
an epoch visits R·N ids, the concatenation of R permutations (pass 0 is the R = 1 order; pass k > 0 is
seeded with (seed, epoch, k)), so each image comes R times per epoch, each time freshly augmented, and
an epoch has R times the batches. Global batches run across pass boundaries, as the release's sampler.

``drop_last=True`` (training): R·N // G batches per epoch, every one full. ``drop_last=False``
(evaluation): ceil(N / G) batches; the last global batch is split as evenly as possible over the
ranks (``tensor_split``), so a rank may get a smaller, even empty, last batch — every rank yields the
same number of batches.

Images, labels and ids are moved to the device once (pinned host memory first on CUDA), when they
fit: ``preload=None`` preloads up to 4 GiB; otherwise batches are gathered on the host and copied
asynchronously from pinned memory.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..config import UserError
from .datasets import ImageDataset

__all__ = ["BatchLoader", "epoch_permutation"]

_PRELOAD_LIMIT_BYTES = 4 << 30


def epoch_permutation(num_items: int, seed: int, epoch: int, repeat: int = 0) -> Tensor:
    """Pass ``repeat`` of epoch ``epoch``: int64 [num_items] on the CPU, a pure function of (seed, epoch, repeat)."""
    key = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch)] + ([int(repeat)] if repeat else [])  # pass 0: the old order
    state = np.random.SeedSequence(key).generate_state(2, np.uint32)
    generator = torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))
    return torch.randperm(num_items, generator=generator)


class BatchLoader:
    """Iterates over (images uint8 [b, C, H, W], labels int64 [b], dataset ids int64 [b]) on ``device``."""

    def __init__(self, dataset: ImageDataset, batch_size: int, *, shuffle: bool = True, drop_last: bool = True,
                 seed: int = 0, device: Union[str, torch.device] = "cpu", rank: int = 0, world_size: int = 1,
                 preload: Optional[bool] = None, repeats: int = 1):
        if int(repeats) != repeats or repeats < 1:
            raise ValueError(f"BatchLoader: repeats must be an integer >= 1, got {repeats}")
        if batch_size < 1:
            raise ValueError(f"BatchLoader: batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"BatchLoader: need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.dataset = dataset
        self.batch_size, self.shuffle, self.drop_last = int(batch_size), shuffle, drop_last
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.device = torch.device(device)
        self.global_batch = self.batch_size * self.world_size
        self.repeats = int(repeats)
        if drop_last and self.repeats * len(dataset) < self.global_batch:
            raise UserError(f"{dataset.name} has {len(dataset)} training images, fewer than one global batch of "
                             f"{self.global_batch} (batch_size {batch_size} x world_size {world_size}) with "
                             f"drop_last=True; lower the batch size")
        if preload is None:
            preload = self.device.type == "cpu" or dataset.images.nbytes <= _PRELOAD_LIMIT_BYTES
        self.preload = preload
        images, labels = dataset.images, dataset.labels
        if self.device.type == "cuda":
            images, labels = images.pin_memory(), labels.pin_memory()
        if preload:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
        self._images, self._labels = images, labels
        self.epoch, self.batch = 0, 0

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        n = len(self.dataset) * self.repeats
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    def set_epoch(self, epoch: int) -> None:
        """Go to the start of ``epoch``, unless the loader is already in it (e.g. restored mid-epoch)."""
        if int(epoch) != self.epoch:
            self.epoch, self.batch = int(epoch), 0

    def state_dict(self) -> Dict[str, int]:
        """{"epoch", "batch"}: the position of the next batch (batches already yielded in this epoch)."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if not 0 <= batch <= len(self):
            raise ValueError(f"BatchLoader.load_state_dict: batch {batch} is outside [0, {len(self)}] for this "
                             f"dataset and batch size")
        self.epoch, self.batch = epoch, batch

    def order(self, epoch: int) -> Tensor:
        """Dataset ids of ``epoch`` in visiting order (before sharding), int64 [repeats·N] on the CPU."""
        n = len(self.dataset)
        passes = [epoch_permutation(n, self.seed, epoch, k) if self.shuffle else torch.arange(n)
                  for k in range(self.repeats)]
        return passes[0] if self.repeats == 1 else torch.cat(passes)

    def _shard(self, order: Tensor, index: int) -> Tensor:
        chunk = order[index * self.global_batch:(index + 1) * self.global_batch]
        if chunk.numel() == self.global_batch:
            return chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return torch.tensor_split(chunk, self.world_size)[self.rank]

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
        order = self.order(self.epoch)
        if self.preload:
            order = order.to(self.device, non_blocking=True)
        while self.batch < len(self):
            ids = self._shard(order, self.batch)
            images, labels = self._images[ids], self._labels[ids]
            if not self.preload:
                if self.device.type == "cuda":
                    images, labels = images.pin_memory(), labels.pin_memory()
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                ids = ids.to(self.device, non_blocking=True)
            self.batch += 1
            yield images, labels, ids
        self.epoch, self.batch = self.epoch + 1, 0
