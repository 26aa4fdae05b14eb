"""relation_loss: RelViT's pair-relation loss from per-class query/key vectors, without [B, C, N, N] logits.

    q = q_proj(z).view(B, N, 9, d_h)      # z: final-norm patch tokens [B, N, D] (no CLS); d_h = D // 9
    k = k_proj(z).view(B, N, 9, d_h)      # q_proj, k_proj: bias-free nn.Linear(D, 9 * d_h)
    loss, accuracy = vitfast.ops.relation_loss(q, k, positions, grid_size=8, return_accuracy=True)

``q[b, n, c]`` is class c's head: columns c*d_h:(c+1)*d_h of one Linear(D, 9 * d_h), which is RelViT's nine separate
bias-free Linear(D, d_h) query heads stacked (likewise k); d_h = D // 9 as in the released code (h_dim // num_heads).

Math (RelViT, Camporese et al. 2022; docs/methods.md §2.1). Token n of an S x S grid sits at row n // S, column n % S;
``positions[b, i]`` is the grid cell token i came from (shuffled or masked token subsets keep their original cells):

    logit[b, c, i, j]  = <q[b, i, c], k[b, j, c]> / sqrt(d_h)                    (a bias-free bilinear score per class)
    target[b, i, j]    = 3 * (sign(row_i - row_j) + 1) + (sign(col_i - col_j) + 1)  (where token i lies relative to j:
                         0 = left-up, 1 = up, 2 = right-up, 3 = left, 4 = same cell, 5 = right, 6 = left-down, ...)
    loss               = mean over the selected pairs (b, i, j) of cross_entropy(logit[b, :, i, j], target[b, i, j])

All ordered pairs are selected, the diagonal included (RelViT's official loss); ``pair_mask`` ([N, N] or [B, N, N]
bool) selects a subset (e.g. without the diagonal, or sampled pairs) and the mean runs over it; an empty selection
gives loss 0 and accuracy 0. ``label_smoothing`` eps is the standard smoothed cross-entropy,
(1 - eps) * nll + eps * mean_c(-log_softmax_c), as F.cross_entropy and RelViT's ``smooth_rel``.
``return_accuracy=True`` also returns the fraction of selected pairs whose argmax class is the target
(first maximum on ties, as torch.argmax); it carries no gradient.

Targets: computed inside the kernels from ``positions`` (or the identity order 0..N-1 when None), which needs
C = 9 classes. For other class counts (C >= 2) pass explicit ``targets`` [B, N, N] int64 in [0, C) instead;
every backend accepts them (they are an input of B*N*N integers, read tile by tile).

Shapes and dtypes: q, k [B, N, C, d_h] fp16 / bf16 / fp32 / fp64 (one dtype; autocast casts them to its dtype);
positions [B, N] int64 in [0, S*S); targets [B, N, N] int64 in [0, C). The loss (and accuracy) is a 0-d tensor
in float32 (float64 for float64 inputs): every backend accumulates in fp32. Gradients flow to q and k in their dtype.

Memory: the logits [B, C, N, N] are never stored; the backward recomputes them tile by tile. Between forward and
backward the cpu backend keeps nothing per pair; the triton backend keeps each pair's log-sum-exp and target (6 bytes
per pair: 15 MB at B = 64, N = 196) and q, k packed in its layout, so its backward redoes neither.
``relation_logits`` is the dense (materialising) [B, C, N, N] version for small N, inspection and tests.

Backends: ``triton`` (CUDA, or CPU under TRITON_INTERPRET=1), ``cpu`` (vitfast._C) and ``torch`` (the reference
below). There is no CUDA C++ backend for this op: on CUDA tensors ``backend="cuda"`` falls back (with a warning)
to triton. Choose with ``backend=`` or VITFAST_BACKEND.

Not supported from RelViT's released code: ``dropout_rel`` (dropout on the per-pair losses; off by default there).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import NO_FLOAT64, declare_backends
from ._checks import FLOATING, Checker, accumulation_dtype

__all__ = ["relation_loss", "relation_loss_reference", "relation_logits", "relation_targets", "DIRECTION_CLASSES"]

DIRECTION_CLASSES = 9  # RelViT's 3 x 3 board of relative directions


def relation_targets(positions: Tensor, grid_size: int) -> Tensor:
    """targets [B, N, N] int64: where token i lies relative to token j on the grid (0 = left-up ... 8 = right-down)."""
    rows, cols = positions // grid_size, positions % grid_size
    d_row = torch.sign(rows[:, :, None] - rows[:, None, :])
    d_col = torch.sign(cols[:, :, None] - cols[:, None, :])
    return 3 * (d_row + 1) + (d_col + 1)


def relation_logits(q: Tensor, k: Tensor) -> Tensor:
    """logits [B, C, N, N] = <q[b, i, c], k[b, j, c]> / sqrt(d_h). Materialises B*C*N*N values: small N only."""
    return torch.einsum("bicd,bjcd->bcij", q, k) / math.sqrt(q.shape[-1])


def _identity_positions(q: Tensor) -> Tensor:
    return torch.arange(q.shape[1], device=q.device).expand(q.shape[0], -1)


def _reference_parts(q, k, positions, targets, pair_mask, grid_size):
    """(logits [B,C,N,N] and weights [B,N,N] 0/1 in the accumulation dtype, targets [B,N,N], count 0-d int64)."""
    batch, n = q.shape[0], q.shape[1]
    logits = relation_logits(q, k).to(accumulation_dtype(q.dtype))
    if targets is None:
        targets = relation_targets(_identity_positions(q) if positions is None else positions, grid_size)
    if pair_mask is None:
        weights = logits.new_ones(batch, n, n)
        count = torch.tensor(batch * n * n, dtype=torch.int64, device=q.device)
    else:
        weights = pair_mask.expand(batch, n, n).to(logits.dtype)
        count = pair_mask.expand(batch, n, n).sum()
    return logits, targets, weights, count


def relation_loss_reference(
    q: Tensor, k: Tensor, positions: Optional[Tensor] = None, *, grid_size: Optional[int] = None,
    targets: Optional[Tensor] = None, pair_mask: Optional[Tensor] = None, label_smoothing: float = 0.0,
    return_accuracy: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """The spec: dense logits, direction targets with torch.sign, F.cross_entropy, (masked) mean over pairs."""
    logits = relation_logits(q, k).to(accumulation_dtype(q.dtype))  # [B, C, N, N]
    if targets is None:
        if positions is None:
            positions = _identity_positions(q)
        targets = relation_targets(positions, math.isqrt(q.shape[1]) if grid_size is None else grid_size)
    losses = F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="none")  # [B, N, N]
    hits = logits.argmax(1) == targets
    if pair_mask is None:
        loss, accuracy = losses.mean(), hits.float().mean()
    else:
        selected = pair_mask.expand_as(losses)
        count = selected.sum().clamp_min(1)  # an empty selection gives 0, not NaN
        loss, accuracy = losses[selected].sum() / count, hits[selected].sum() / count
    return (loss, accuracy.detach().float()) if return_accuracy else loss


def _reference_forward(q, k, positions, targets, pair_mask, grid_size, label_smoothing):
    logits, targets, weights, count = _reference_parts(q, k, positions, targets, pair_mask, grid_size)
    losses = F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="none")
    denominator = count.clamp_min(1).to(logits.dtype)
    loss = (losses * weights).sum() / denominator
    accuracy = ((logits.argmax(1) == targets).to(logits.dtype) * weights).sum() / denominator
    return loss, accuracy.float(), count


def _reference_backward(grad_loss, count, q, k, positions, targets, pair_mask, grid_size, label_smoothing,
                        output_mask):
    """Closed-form gradients of the reference (tests hold them against autograd through the reference).

    d loss / d logit[b, c, i, j] = w_bij * (softmax_c - y_c) with y = (1 - eps) * onehot(target) + eps / C and
    w = pair weight * grad / count. Custom-op implementations run below the autograd key, so no torch.autograd here.
    """
    logits, targets, weights, _ = _reference_parts(q, k, positions, targets, pair_mask, grid_size)
    classes = logits.shape[1]
    smoothed = F.one_hot(targets, classes).permute(0, 3, 1, 2).to(logits.dtype) * (1.0 - label_smoothing)
    smoothed = smoothed + label_smoothing / classes
    scale = grad_loss.to(logits.dtype) / count.clamp_min(1).to(logits.dtype) / math.sqrt(q.shape[-1])
    d_logits = (logits.softmax(1) - smoothed) * (weights * scale).unsqueeze(1)  # [B, C, N, N]
    d_q = torch.einsum("bcij,bjcd->bicd", d_logits, k.to(logits.dtype)).to(q.dtype) if output_mask[0] else None
    d_k = torch.einsum("bcij,bicd->bjcd", d_logits, q.to(logits.dtype)).to(k.dtype) if output_mask[1] else None
    return d_q, d_k


# No "cuda" backend: on CUDA tensors the triton backend is the fused one (a request for "cuda" falls back loudly).
BACKENDS = declare_backends(
    "relation_loss",
    reference=(_reference_forward, _reference_backward),
    native=("relation_loss_forward", "relation_loss_backward"),
    triton=("vitfast.kernels.relation_loss", "relation_loss_forward", "relation_loss_backward"),
    dtypes={"triton": NO_FLOAT64, "cpu": FLOATING, "torch": FLOATING},
)


# ---- torch.library registration: the op composes with autograd, torch.compile and opcheck ----
# The triton forward also returns what its backward reuses: each pair's log-sum-exp and target, and q, k packed once
# into the kernels' layout (vitfast/kernels/relation_loss.py). Every other backend saves nothing: empty tensors take
# those four places, and its backward is called without them.
_SAVES_STATE = ("triton",)


def _empty_state(q: Tensor, backend: str) -> List[Tensor]:
    if backend in _SAVES_STATE:
        from vitfast.kernels.relation_loss import saved_like  # noqa: PLC0415 (triton is imported when used)
        return saved_like(q)
    return [q.new_empty(0) for _ in range(4)]


@torch.library.custom_op("vitfast::relation_loss", mutates_args=())
def _relation_loss_op(
    q: Tensor, k: Tensor, positions: Optional[Tensor], targets: Optional[Tensor], pair_mask: Optional[Tensor],
    grid_size: int, label_smoothing: float, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss [] accumulation dtype, accuracy [] float32, count [] int64 = number of selected pairs, *state)."""
    loss, accuracy, count, *state = BACKENDS(backend).forward(q, k, positions, targets, pair_mask, grid_size,
                                                              label_smoothing)
    return (loss, accuracy, count, *(state if backend in _SAVES_STATE else _empty_state(q, backend)))


@_relation_loss_op.register_fake
def _(q, k, positions, targets, pair_mask, grid_size, label_smoothing, backend):
    return (q.new_empty((), dtype=accumulation_dtype(q.dtype)), q.new_empty((), dtype=torch.float32),
            q.new_empty((), dtype=torch.int64), *_empty_state(q, backend))


@torch.library.custom_op("vitfast::relation_loss_backward", mutates_args=())
def _relation_loss_backward_op(
    grad_loss: Tensor, count: Tensor, q: Tensor, k: Tensor, positions: Optional[Tensor], targets: Optional[Tensor],
    pair_mask: Optional[Tensor], grid_size: int, label_smoothing: float, output_mask: List[bool], backend: str,
    lse: Tensor, saved_target: Tensor, q_packed: Tensor, k_packed: Tensor,
) -> Tuple[Tensor, Tensor]:
    state = (lse, saved_target, q_packed, k_packed) if backend in _SAVES_STATE else ()
    grads = BACKENDS(backend).backward(grad_loss.contiguous(), count, q, k, positions, targets, pair_mask, grid_size,
                                       label_smoothing, list(output_mask), *state)
    # A custom op returns tensors only: an unneeded gradient travels as an empty tensor.
    return tuple(g if g is not None and needed else q.new_empty(0) for g, needed in zip(grads, output_mask))


@_relation_loss_backward_op.register_fake
def _(grad_loss, count, q, k, positions, targets, pair_mask, grid_size, label_smoothing, output_mask, backend, *state):
    return tuple(t.new_empty(t.shape if needed else (0,)) for t, needed in zip((q, k), output_mask))


def _setup_context(ctx, inputs, output):
    q, k, positions, targets, pair_mask, grid_size, label_smoothing, backend = inputs
    # Inputs, the pair count and the backend's state (the torch / cpu backwards recompute every logit tile from q, k).
    ctx.save_for_backward(q, k, positions, targets, pair_mask, *output[2:])
    ctx.grid_size, ctx.label_smoothing, ctx.backend = grid_size, label_smoothing, backend
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *unused_grads):
    q, k, positions, targets, pair_mask, count, *state = ctx.saved_tensors
    output_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    if not any(output_mask) or grad_loss is None:
        return (None,) * 8
    d_q, d_k = _relation_loss_backward_op(grad_loss, count, q, k, positions, targets, pair_mask, ctx.grid_size,
                                          ctx.label_smoothing, output_mask, ctx.backend, *state)
    return (d_q if output_mask[0] else None, d_k if output_mask[1] else None) + (None,) * 6


_relation_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public function ----

def relation_loss(
    q: Tensor, k: Tensor, positions: Optional[Tensor] = None, *, grid_size: Optional[int] = None,
    targets: Optional[Tensor] = None, pair_mask: Optional[Tensor] = None, label_smoothing: float = 0.0,
    return_accuracy: bool = False, backend: Optional[str] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Mean pair cross-entropy of RelViT's bilinear relation head (see the module doc); ``(loss, accuracy)`` with
    ``return_accuracy``. ``grid_size`` S is required with ``positions``; without positions it defaults to sqrt(N)."""
    check = Checker("relation_loss")
    q = check.tensor("q", q, ("B", "N", "C", "d_h"))
    device = q.device
    check.tensor("k", k, ("B", "N", "C", "d_h"), device=device)
    batch, n, classes, _ = q.shape
    if n == 0 or classes < 2 or q.shape[-1] == 0:
        check.fail(f"q must have N >= 1 tokens, C >= 2 classes and d_h >= 1, got {list(q.shape)}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        check.fail(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if targets is not None:
        if positions is not None:
            check.fail("pass either positions (direction targets computed in the kernel) or targets, not both")
        check.tensor("targets", targets, ("B", "N", "N"), dtypes=(torch.int64,), device=device,
                     value_range=(0, classes))
        grid_size = 0
    else:
        if classes != DIRECTION_CLASSES:
            check.fail(f"direction targets from positions have {DIRECTION_CLASSES} classes, but q has C = {classes}; "
                       f"pass targets [B, N, N] int64 for another class count")
        grid_size = check.grid(positions, grid_size, n, device)
    check.pair_mask(pair_mask, device)

    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        q, k = q.to(dtype), k.to(dtype)
    check.same_dtype("q", q, k=k)

    chosen = BACKENDS.select(device, q.dtype, backend)
    contiguous = lambda t: t.contiguous() if t is not None else None
    loss, accuracy, *_ = _relation_loss_op(q.contiguous(), k.contiguous(), contiguous(positions), contiguous(targets),
                                           contiguous(pair_mask), int(grid_size), float(label_smoothing), chosen)
    return (loss, accuracy) if return_accuracy else loss
