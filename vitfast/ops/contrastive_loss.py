"""contrastive_loss: NT-Xent (SimCLR), InfoNCE (MoCo v3, NNCLR) and SupCon in one op, without the B x M logits.

    loss = contrastive_loss(q, k, temperature=0.2, positives="diagonal", scale=2 * 0.2)     # MoCo v3 (one direction)
    loss = contrastive_loss(z1, z2, temperature=0.5, positives="ntxent")                     # SimCLR
    loss = contrastive_loss(z1, z2, temperature=0.1, positives="labels", labels=y)          # SupCon, two views

Math (docs/methods.md §7). Rows are L2-normalised first (``normalize=True``; in fp32, then rounded once to the input
dtype, so that the normalisation's backward is formed in fp32 too); every similarity is
s = <anchor, pool row> / temperature. Each anchor a has a pool of columns A(a) (every pool row except, where the anchor
is itself in the pool, its own row) and positives P(a) ⊂ A(a):

    L_a  = mean_{p in P(a)} [ log sum_{j in A(a)} exp(s_aj) - s_ap ]      (0 when P(a) is empty: never NaN)
    loss = scale * mean over the anchors of L_a

    positives="diagonal"  InfoNCE: anchors q [B, D], pool k [B, D] (gathered: every rank's k); the positive of query i
                          is key i of this rank (rank r's queries match keys r*B ... r*B + B - 1); nothing excluded.
    positives="ntxent"    NT-Xent: views q, k [B, D]; anchors and pool are both views (2B rows); the positive of a row
                          is the other view of the same image; the row itself is excluded from its softmax.
    positives="labels"    SupCon: rows q [B, D] (and the second view k [B, D], same labels) with labels [B] int64;
                          positives are the other rows with the same label, across views; the row itself is excluded.
                          SupCon's tau / tau_base factor is ``scale`` (``SupConLoss`` passes it).

``gather_distributed=True`` (under torch.distributed, gloo on CPU or NCCL on GPU) makes the pool the rows of every
rank, in rank order, through a gather whose backward sums the incoming gradients over ranks and returns this rank's
slice (``vitfast.distributed.gather_rows_with_grad``). The loss is the mean over this rank's anchors: averaged over
ranks (as DDP averages gradients) it is the loss of one process holding the whole batch, and so are the gradients.
Every rank must hold the same number of rows.

Kernel-level form (what every backend computes; the public function builds it): anchors [A, D], pool [M, D] (one
dtype), anchor_labels [A], pool_labels [M], anchor_self [A] int64 (the pool row of the anchor itself, -1 if none):

    allowed(a, j)  = j != anchor_self[a]
    positive(a, j) = allowed(a, j) and pool_labels[j] == anchor_labels[a]
    s_aj           = inv_temperature * <anchors[a], pool[j]>          (accumulated in fp32; fp64 for fp64 inputs)
    lse_a          = log sum_{allowed j} exp(s_aj);  n_a = #positives;  S_a = sum_{positive j} s_aj
    loss           = loss_scale * sum_{a: n_a > 0} (lse_a - S_a / n_a)   (loss_scale = scale / A)

Forward returns (loss [], lse [A], n [A] int32); lse is 0 where n_a = 0 (such an anchor adds nothing, also to the
gradient). The backward recomputes s tile by tile from the saved lse and n:

    d s_aj   = grad * loss_scale * [n_a > 0] * (allowed(a, j) * exp(s_aj - lse_a) - positive(a, j) / n_a)
    d anchor = inv_temperature * sum_j d s_aj pool[j];   d pool[j] = inv_temperature * sum_a d s_aj anchors[a]

Memory: O((A + M) * D); no backend stores the [A, M] logits (the torch reference does: it is the spec).

Backends: ``triton`` (vitfast.kernels.contrastive_loss; CUDA, or CPU under TRITON_INTERPRET=1), ``cpu``
(vitfast._C) and ``torch`` (the reference below). Choose with ``backend=`` or VITFAST_BACKEND.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributed import gather_rows, gather_rows_with_grad, rank, world_size
from ._backend import NO_FLOAT64, declare_backends
from ._checks import FLOATING, Checker, accumulation_dtype

__all__ = ["contrastive_loss", "contrastive_loss_reference", "POSITIVES"]

POSITIVES = ("diagonal", "ntxent", "labels")


def contrastive_loss_reference(q: Tensor, k: Optional[Tensor] = None, *, temperature: float,
                               positives: str = "diagonal", labels: Optional[Tensor] = None, normalize: bool = True,
                               scale: float = 1.0) -> Tensor:
    """The spec, written as the papers' code computes it (one process, dense logits): see the module doc."""
    dtype = accumulation_dtype(q.dtype)
    q = F.normalize(q, dim=1) if normalize else q
    k = (F.normalize(k, dim=1) if normalize else k) if k is not None else None
    q, k = q.to(dtype), (k.to(dtype) if k is not None else None)
    if positives == "diagonal":
        logits = q @ k.T / temperature
        return scale * F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))
    z = torch.cat([q, k]) if k is not None else q
    own = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(own, float("-inf"))
    if positives == "ntxent":
        batch = q.shape[0]
        partner = (torch.arange(2 * batch, device=z.device) + batch) % (2 * batch)
        return scale * F.cross_entropy(logits, partner)
    y = torch.cat([labels, labels]) if k is not None else labels
    positive = (y[:, None] == y[None, :]) & ~own
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    count = positive.sum(1)
    mean_log_prob = torch.where(positive, log_prob, 0.0).sum(1) / count.clamp_min(1)
    return -scale * mean_log_prob.mean()  # an anchor without positives adds 0


# ---- the kernel-level reference: the torch backend ----

def _similarities_and_masks(anchors, pool, anchor_labels, pool_labels, anchor_self, inv_temperature):
    """(s [A, M] in the accumulation dtype, allowed [A, M] bool, positive [A, M] bool)."""
    dtype = accumulation_dtype(anchors.dtype)
    s = (anchors.to(dtype) @ pool.to(dtype).T) * inv_temperature
    columns = torch.arange(pool.shape[0], device=pool.device)
    allowed = columns[None, :] != anchor_self[:, None]
    positive = allowed & (pool_labels[None, :] == anchor_labels[:, None])
    return s, allowed, positive


def _reference_forward(anchors, pool, anchor_labels, pool_labels, anchor_self, inv_temperature, loss_scale):
    s, allowed, positive = _similarities_and_masks(anchors, pool, anchor_labels, pool_labels, anchor_self,
                                                   inv_temperature)
    count = positive.sum(1)
    has = count > 0
    lse = torch.where(has, torch.logsumexp(s.masked_fill(~allowed, float("-inf")), dim=1), 0.0)
    positive_sum = torch.where(positive, s, 0.0).sum(1)
    per_anchor = torch.where(has, lse - positive_sum / count.clamp_min(1), 0.0)
    return loss_scale * per_anchor.sum(), lse, count.to(torch.int32)


def _reference_backward(grad_loss, anchors, pool, anchor_labels, pool_labels, anchor_self, lse, count,
                        inv_temperature, loss_scale, output_mask):
    """Closed-form gradients from the saved lse and counts (the tests hold them against autograd)."""
    s, allowed, positive = _similarities_and_masks(anchors, pool, anchor_labels, pool_labels, anchor_self,
                                                   inv_temperature)
    weight = (grad_loss.to(s.dtype) * loss_scale) * (count > 0).to(s.dtype)  # [A]
    softmax = torch.where(allowed, torch.exp(s - lse[:, None].to(s.dtype)), 0.0)
    target = positive.to(s.dtype) / count.clamp_min(1).to(s.dtype)[:, None]
    d_s = (softmax - target) * (weight * inv_temperature)[:, None]
    d_anchors = (d_s @ pool.to(s.dtype)).to(anchors.dtype) if output_mask[0] else None
    d_pool = (d_s.T @ anchors.to(s.dtype)).to(pool.dtype) if output_mask[1] else None
    return d_anchors, d_pool


BACKENDS = declare_backends(
    "contrastive_loss",
    reference=(_reference_forward, _reference_backward),
    native=("contrastive_loss_forward", "contrastive_loss_backward"),
    triton=("vitfast.kernels.contrastive_loss", "contrastive_loss_forward", "contrastive_loss_backward"),
    dtypes={"triton": NO_FLOAT64, "cpu": FLOATING, "torch": FLOATING},
)


# ---- torch.library registration: autograd, torch.compile and opcheck ----

@torch.library.custom_op("vitfast::contrastive_loss", mutates_args=())
def _contrastive_loss_op(anchors: Tensor, pool: Tensor, anchor_labels: Tensor, pool_labels: Tensor,
                         anchor_self: Tensor, inv_temperature: float, loss_scale: float, backend: str
                         ) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss [] accumulation dtype, lse [A] accumulation dtype, positives per anchor [A] int32)."""
    # Autocast stays on inside a custom op: it would run the reference's fp32 matmuls in bf16 / fp16.
    with torch.autocast(anchors.device.type, enabled=False):
        loss, lse, count = BACKENDS(backend).forward(anchors, pool, anchor_labels, pool_labels, anchor_self,
                                                     inv_temperature, loss_scale)
    return loss, lse, count


@_contrastive_loss_op.register_fake
def _(anchors, pool, anchor_labels, pool_labels, anchor_self, inv_temperature, loss_scale, backend):
    dtype = accumulation_dtype(anchors.dtype)
    return (anchors.new_empty((), dtype=dtype), anchors.new_empty(anchors.shape[:1], dtype=dtype),
            anchors.new_empty(anchors.shape[:1], dtype=torch.int32))


@torch.library.custom_op("vitfast::contrastive_loss_backward", mutates_args=())
def _contrastive_loss_backward_op(grad_loss: Tensor, anchors: Tensor, pool: Tensor, anchor_labels: Tensor,
                                  pool_labels: Tensor, anchor_self: Tensor, lse: Tensor, count: Tensor,
                                  inv_temperature: float, loss_scale: float, output_mask: List[bool], backend: str
                                  ) -> Tuple[Tensor, Tensor]:
    with torch.autocast(anchors.device.type, enabled=False):
        grads = BACKENDS(backend).backward(grad_loss.contiguous(), anchors, pool, anchor_labels, pool_labels,
                                           anchor_self, lse, count, inv_temperature, loss_scale, list(output_mask))
    # A custom op returns tensors only: an unneeded gradient travels as an empty tensor.
    return tuple(g if g is not None and needed else anchors.new_empty(0) for g, needed in zip(grads, output_mask))


@_contrastive_loss_backward_op.register_fake
def _(grad_loss, anchors, pool, anchor_labels, pool_labels, anchor_self, lse, count, inv_temperature, loss_scale,
      output_mask, backend):
    return tuple(t.new_empty(t.shape if needed else (0,)) for t, needed in zip((anchors, pool), output_mask))


def _setup_context(ctx, inputs, output):
    anchors, pool, anchor_labels, pool_labels, anchor_self, inv_temperature, loss_scale, backend = inputs
    ctx.save_for_backward(anchors, pool, anchor_labels, pool_labels, anchor_self, output[1], output[2])
    ctx.inv_temperature, ctx.loss_scale, ctx.backend = inv_temperature, loss_scale, backend
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_loss, *unused_grads):
    anchors, pool, anchor_labels, pool_labels, anchor_self, lse, count = ctx.saved_tensors
    output_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    if not any(output_mask) or grad_loss is None:
        return (None,) * 8
    d_anchors, d_pool = _contrastive_loss_backward_op(grad_loss, anchors, pool, anchor_labels, pool_labels,
                                                      anchor_self, lse, count, ctx.inv_temperature, ctx.loss_scale,
                                                      output_mask, ctx.backend)
    return (d_anchors if output_mask[0] else None, d_pool if output_mask[1] else None) + (None,) * 6


_contrastive_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public function ----

def _layout(q: Tensor, k: Optional[Tensor], positives: str, labels: Optional[Tensor], gather: bool):
    """(anchors, pool, anchor_labels, pool_labels, anchor_self) of the kernel-level form for this rank."""
    here, world = (rank(), world_size()) if gather else (0, 1)
    batch, device = q.shape[0], q.device
    gather_views = gather_rows_with_grad if gather else (lambda x: x)  # the features, with their gradient
    local_ids = here * batch + torch.arange(batch, device=device)  # this rank's rows in the gathered batch
    if positives == "diagonal":
        pool_labels = torch.arange(world * batch, device=device)
        return q, gather_views(k), local_ids, pool_labels, torch.full_like(local_ids, -1)
    views = [q] if k is None else [q, k]
    if positives == "ntxent":
        row_labels, pool_row_labels = local_ids, torch.arange(world * batch, device=device)
    else:
        row_labels = labels
        pool_row_labels = gather_rows(labels) if gather else labels  # integers: no gradient
    anchors = torch.cat(views) if len(views) > 1 else q
    pool = torch.cat([gather_views(v) for v in views]) if len(views) > 1 else gather_views(q)
    anchor_labels = torch.cat([row_labels] * len(views))
    pool_labels = torch.cat([pool_row_labels] * len(views))
    anchor_self = torch.cat([view * world * batch + local_ids for view in range(len(views))])
    return anchors, pool, anchor_labels, pool_labels, anchor_self


def _normalize(x: Tensor) -> Tensor:
    """Unit rows in x's dtype, computed in the accumulation dtype: the rows are rounded once, and the gradient
    through the normalisation (a difference of nearly equal terms) is formed in fp32, not in fp16 / bf16."""
    return F.normalize(x.to(accumulation_dtype(x.dtype)), dim=1).to(x.dtype)


def contrastive_loss(q: Tensor, k: Optional[Tensor] = None, *, temperature: float, positives: str = "diagonal",
                     labels: Optional[Tensor] = None, normalize: bool = True, scale: float = 1.0,
                     gather_distributed: bool = False, backend: Optional[str] = None) -> Tensor:
    """Contrastive loss of anchors against a pool (see the module doc): a 0-d tensor, float32 (float64 for float64
    inputs). q, k [B, D] fp16 / bf16 / fp32 / fp64 (autocast casts them to its dtype); labels [B] int64."""
    check = Checker("contrastive_loss")
    if positives not in POSITIVES:
        check.fail(f"positives must be one of {POSITIVES}, got {positives!r}")
    q = check.tensor("q", q, ("B", "D"))
    device = q.device
    if k is not None:
        check.tensor("k", k, ("B", "D"), device=device)
    elif positives != "labels":
        check.fail(f'positives="{positives}" needs k (the keys / the second view) [B, D]')
    if q.shape[0] == 0 or q.shape[1] == 0:
        check.fail(f"q must have at least one row and one feature, got {list(q.shape)}")
    if positives == "labels":
        if labels is None:
            check.fail('positives="labels" needs labels [B] int64')
        check.tensor("labels", labels, ("B",), dtypes=(torch.int64,), device=device)
    elif labels is not None:
        check.fail(f'labels are only used with positives="labels", not "{positives}"')
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        check.fail(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        check.fail(f"scale must be a finite number, got {scale!r}")
    gather = bool(gather_distributed) and world_size() > 1

    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        q, k = q.to(dtype), (k.to(dtype) if k is not None else None)
    check.same_dtype("q", q, k=k)
    if normalize:
        q, k = _normalize(q), (_normalize(k) if k is not None else None)

    anchors, pool, anchor_labels, pool_labels, anchor_self = _layout(q, k, positives, labels, gather)
    chosen = BACKENDS.select(device, q.dtype, backend)
    loss, _, _ = _contrastive_loss_op(anchors.contiguous(), pool.contiguous(), anchor_labels.contiguous(),
                                      pool_labels.contiguous(), anchor_self.contiguous(), 1.0 / float(temperature),
                                      float(scale) / anchors.shape[0], chosen)
    return loss
