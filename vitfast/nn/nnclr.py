"""NNCLR loss with a global feature queue (Dwibedi et al. 2021; MAE-CT, docs/methods.md §6.2).

    criterion = NNCLRLoss(dim=256, queue_size=65536, temperature=0.15, topk=20)
    loss = criterion((p0, p1), (z0, z1), ids, generator)     # p: predictions [B, d], z: keys [B, d], ids [B] int64

Per view v, z^v = normalise(keys[v]) (no gradient: MAE-CT's keys are the EMA projector's outputs) and nn(z^v) is
one of the ``topk`` queue entries most similar to z^v, entries with the image's own dataset id excluded, drawn
uniformly with ``generator`` (``vitfast.ops.nn_topk``; topk = 1: the nearest one). With the predictions P^v
gathered over all ranks *with gradient*,

    loss = 1/2 CE(nn(z^1) P^0ᵀ / τ, diagonal) + 1/2 CE(nn(z^0) P^1ᵀ / τ, diagonal)

(``vitfast.ops.contrastive_loss(nn_z1, p0, positives="diagonal", gather_distributed=True)``: rank r's anchors match
the pool rows r·B ... r·B + B − 1; the mean over this rank's anchors, so the mean over ranks is the one-process
loss).
After the lookup, view 0's keys and ids enter the FIFO queue, gathered over ranks in rank order (``FeatureQueue``).

Start (a deliberate difference): MAE-CT's code starts from a queue of random unit vectors (ids −1), so its first
neighbours are noise. Here, while the queue is not yet full, the lookup searches the queue's entries *plus this
step's view-0 keys of the whole global batch* (gathered in rank order, own id excluded), so every neighbour is a real
feature from the first step on. Once the queue is full the lookup is the paper's (queue only). The rule depends only
on the queue's fill count and the gathered batch, so it is deterministic and the same on 1 and on N ranks; it needs a
global batch of at least topk + 1 images at the first step (``nn_topk`` says so otherwise).

The queue is a buffer (it travels with ``state_dict``: an exact resume, and MAE-CT's stage ``ct`` starts from the
queue of stage ``head``). Nothing here depends on the batch composition beyond the keys, so the loss of 2 ranks × B/2
is the loss of 1 process × B when the draws agree (k = 1 always; tests/test_nnclr_distributed.py).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..distributed import gather_rows
from .loss_state import FeatureQueue

__all__ = ["NNCLRLoss"]


class NNCLRLoss(nn.Module):
    """Symmetric NNCLR InfoNCE with nearest neighbours from a global FIFO queue (see the module doc)."""

    def __init__(self, dim: int = 256, queue_size: int = 65536, temperature: float = 0.15, topk: int = 1):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"NNCLRLoss: temperature must be > 0, got {temperature!r}")
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
            raise ValueError(f"NNCLRLoss: topk must be a positive int, got {topk!r}")
        self.temperature, self.topk = float(temperature), topk
        self.queue = FeatureQueue(queue_size, dim)

    @torch.no_grad()
    def support(self, z0: Tensor, ids: Tensor) -> Tuple[Tensor, Tensor]:
        """What the lookup searches: the queue's rows, plus the global batch's view-0 keys while it is not full."""
        features, queue_ids = self.queue.contents()
        if len(self.queue) < self.queue.size:
            features = torch.cat([features, gather_rows(z0).to(features.dtype)])
            queue_ids = torch.cat([queue_ids, gather_rows(ids)])
        return features, queue_ids

    @torch.no_grad()
    def neighbours(self, z: Tensor, ids: Tensor, support: Tensor, support_ids: Tensor,
                   generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
        """nn(z) [B, d] (rows of ``support``) and their cosine similarity to z [B]."""
        index, similarity = ops.nn_topk(z.to(support.dtype), support, k=self.topk, queue_ids=support_ids,
                                        query_ids=ids, generator=generator)
        return support[index], similarity

    def forward(self, predictions: Sequence[Tensor], keys: Sequence[Tensor], ids: Tensor,
                generator: Optional[torch.Generator] = None) -> Tensor:
        """predictions (p0, p1) [B, d] (with gradient), keys (z0, z1) [B, d] (detached here), ids [B] int64 dataset
        ids of this rank's images -> the loss []; then view 0's keys enter the queue. ``self.last_similarity``: the
        mean cosine similarity of the drawn neighbours (a metric)."""
        if len(predictions) != 2 or len(keys) != 2:
            raise ValueError(f"NNCLRLoss: give two views of predictions and keys, got {len(predictions)} and "
                             f"{len(keys)}")
        if ids.dtype != torch.int64 or ids.shape != keys[0].shape[:1]:
            raise ValueError(f"NNCLRLoss: ids must be int64 [{keys[0].shape[0]}], got {ids.dtype} {tuple(ids.shape)}")
        z0, z1 = (F.normalize(z.detach().float(), dim=1) for z in keys)
        support, support_ids = self.support(z0, ids)
        nn1, similarity1 = self.neighbours(z1, ids, support, support_ids, generator)
        nn0, similarity0 = self.neighbours(z0, ids, support, support_ids, generator)
        p0, p1 = predictions
        loss = 0.5 * (ops.contrastive_loss(nn1, p0.float(), temperature=self.temperature, positives="diagonal",
                                           gather_distributed=True)
                      + ops.contrastive_loss(nn0, p1.float(), temperature=self.temperature, positives="diagonal",
                                             gather_distributed=True))
        self.last_similarity = 0.5 * (similarity0.mean() + similarity1.mean()).item()
        self.queue.push(z0, ids)
        return loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, topk={self.topk}, queue_size={self.queue.size}"
