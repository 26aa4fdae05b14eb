"""Contrastive loss modules over the fused op, with the arguments users know from the peer libraries, and exact
full-batch contrastive gradients in micro-batches.

    NTXentLoss(temperature=0.5)(z0, z1)                        # SimCLR: [B, D] each
    InfoNCELoss(temperature=0.2, scale=2 * 0.2)(q, k)          # MoCo v3 (one direction): [B, D] each
    SupConLoss(temperature=0.1, base_temperature=0.07)(features, labels)   # [B, D] or [B, n_views, D], labels [B]

Each is a thin wrapper over :func:`vitfast.ops.contrastive_loss` (docs/methods.md §7): rows are L2-normalised
inside (features the caller normalised already give the same loss, and the same gradients with respect to the
un-normalised features); ``gather_distributed=True`` makes every rank's rows the pool, with right gradients.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..distributed import rank, world_size
from ..ops.contrastive_loss import contrastive_loss

__all__ = ["NTXentLoss", "InfoNCELoss", "SupConLoss", "cached_contrastive_backward"]


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent over two views z0, z1 [B, D]: 2B anchors, the positive of a row is the other view of its
    image, every other row of the (gathered) 2B-row pool is a negative. Returns a 0-d fp32 (fp64) loss."""

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = False, normalize: bool = True,
                 backend: Optional[str] = None):
        super().__init__()
        self.temperature, self.gather_distributed = temperature, gather_distributed
        self.normalize, self.backend = normalize, backend

    def forward(self, z0: Tensor, z1: Tensor) -> Tensor:
        return contrastive_loss(z0, z1, temperature=self.temperature, positives="ntxent", normalize=self.normalize,
                                gather_distributed=self.gather_distributed, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"


class InfoNCELoss(nn.Module):
    """InfoNCE of queries q [B, D] against keys k [B, D] (gathered over ranks with ``gather_distributed``): the
    positive of query i is key i of its own rank. ``scale`` multiplies the loss (MoCo v3: 2 * temperature)."""

    def __init__(self, temperature: float = 0.2, gather_distributed: bool = False, scale: float = 1.0,
                 normalize: bool = True, backend: Optional[str] = None):
        super().__init__()
        self.temperature, self.gather_distributed, self.scale = temperature, gather_distributed, scale
        self.normalize, self.backend = normalize, backend

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        return contrastive_loss(q, k, temperature=self.temperature, positives="diagonal", normalize=self.normalize,
                                scale=self.scale, gather_distributed=self.gather_distributed, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}, scale={self.scale}"


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020, "all" contrast mode), times temperature / base_temperature.

    features: [B, D] (one view per row) or [B, n_views, D] as in the SupCon reference code; labels [B] int64.
    Every view of every image is an anchor; its positives are the other views with the same label, across views
    and (``gather_distributed``) ranks; an anchor without any positive adds 0. labels=None: each image is its own
    class (the SimCLR special case of the reference code). The reference code's explicit ``mask`` and
    ``contrast_mode="one"`` are not offered."""

    def __init__(self, temperature: float = 0.1, base_temperature: float = 0.07, gather_distributed: bool = False,
                 normalize: bool = True, backend: Optional[str] = None):
        super().__init__()
        self.temperature, self.base_temperature = temperature, base_temperature
        self.gather_distributed, self.normalize, self.backend = gather_distributed, normalize, backend

    def forward(self, features: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        if not isinstance(features, Tensor) or features.dim() not in (2, 3):
            raise ValueError(f"SupConLoss: features must be [B, D] or [B, n_views, D], got "
                             f"{list(features.shape) if isinstance(features, Tensor) else type(features).__name__}")
        if labels is None:  # unique over the gathered batch: rank r's images are r*B ... r*B + B - 1
            offset = rank() * features.shape[0] if self.gather_distributed and world_size() > 1 else 0
            labels = offset + torch.arange(features.shape[0], device=features.device)
        views = [features] if features.dim() == 2 else list(features.unbind(1))
        # Two views map to the op's (q, k); any other count stacks the views as rows of q, labels repeated
        # (the mean over anchors does not depend on their order).
        q, k = (views[0], views[1]) if len(views) == 2 else (torch.cat(views), None)
        row_labels = labels if len(views) <= 2 else labels.repeat(len(views))
        return contrastive_loss(q, k, temperature=self.temperature, positives="labels", labels=row_labels,
                                normalize=self.normalize, scale=self.temperature / self.base_temperature,
                                gather_distributed=self.gather_distributed, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
                f"gather_distributed={self.gather_distributed}")


# ---- exact full-batch contrastive gradients in micro-batches (gradient caching) ----

Embeddings = Union[Tensor, Tuple[Tensor, ...]]


def _as_tuple(out: Embeddings) -> Tuple[Tensor, ...]:
    return (out,) if isinstance(out, Tensor) else tuple(out)


class _RngState:
    """The CPU (and, once CUDA is initialised, every GPU's) random state, to replay a micro-batch's dropout /
    drop-path draws when it is embedded the second time."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def cached_contrastive_backward(embed: Callable[..., Embeddings], micro_batches: Sequence,
                                loss_fn: Callable[..., Tensor], model: Optional[nn.Module] = None) -> Tensor:
    """Backward of a contrastive loss over the WHOLE batch, computed in micro-batches; returns the loss (detached).

    The contrastive pool must be the whole batch (gathered over ranks) even when the batch does not fit in memory
    at once (docs/methods.md §4.3): summing per-micro-batch losses would shrink the pool and change the loss. The
    loss is not a sum over micro-batches, but the encoder is applied row by row, so (gradient caching):

      1. embed every micro-batch without autograd and concatenate: E = [E_1; ...; E_n] (per output);
      2. loss = loss_fn(*E) with E as leaves, backward: dL/dE (the pool is the whole batch; under
         ``gather_distributed`` the gather's backward brings every rank's part);
      3. re-embed each micro-batch with autograd and backward its slice of dL/dE into the parameters.

    The parameter gradients equal those of ``loss_fn(*embed(whole batch)).backward()`` (up to rounding), at the
    memory of one micro-batch's activations plus the [B, D] embeddings, for one extra forward pass. Each
    micro-batch's random state is saved and replayed, so dropout / drop-path draw the same masks in both passes.
    Modules whose training forward depends on the rest of the batch (BatchNorm's batch statistics) see one
    micro-batch at a time in both passes, as in any accumulation (BatchNorm's running statistics update twice).

    embed(micro_batch) -> Tensor [b, D] or a tuple of them (e.g. the two views' projections); micro_batches: the
    inputs, in batch order; loss_fn(*embeddings) -> 0-d loss of the concatenated [B, D] embeddings. ``model``: a
    DistributedDataParallel module whose ``no_sync`` is entered for every micro-batch but the last (gradients are
    then all-reduced once).
    """
    if len(micro_batches) == 0:
        raise ValueError("cached_contrastive_backward: micro_batches is empty")
    states: List[_RngState] = []
    cached: List[Tuple[Tensor, ...]] = []
    with torch.no_grad():
        for chunk in micro_batches:
            states.append(_RngState())
            cached.append(_as_tuple(embed(chunk)))
    after = _RngState()
    leaves = [torch.cat(parts).requires_grad_() for parts in zip(*cached)]
    loss = loss_fn(*leaves)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]

    start = 0
    for index, (chunk, state, parts) in enumerate(zip(micro_batches, states, cached)):
        rows = parts[0].shape[0]
        state.restore()
        last = index == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            outputs = _as_tuple(embed(chunk))
            torch.autograd.backward(outputs, [g[start:start + rows] for g in grads])
        start += rows
    after.restore()  # the random state continues as after one pass over the batch
    return loss.detach()
