"""relation_mlp_loss: the MLP pair head of RelViT's relation task (and DRLoc-style offsets), without [B, N, N, H].

    u = u_proj(z)                        # z: final-norm patch tokens [B, N, D]; u_proj = nn.Linear(D, H, bias=False)
    v = v_proj(z)                        # v_proj = nn.Linear(D, H) (the pair bias b lives here)
    loss, accuracy = vitfast.ops.relation_mlp_loss(u, v, out.weight, out.bias, positions, grid_size=8,
                                                   return_accuracy=True)         # out = nn.Linear(H, 9)

Math (docs/methods.md §2.5, "generalisation"). Token n of an S x S grid sits at row n // S, column n % S;
``positions[b, i]`` is the grid cell token i came from (None: the identity order 0..N-1):

    h[b, i, j]   = act(u[b, i] + v[b, j])                [H]  (= act(A z_i + B z_j + b))
    out[b, i, j] = weight @ h[b, i, j] + bias            [C_out]
    task "direction" (C_out = 9): cross_entropy(out[b, i, j], target[b, i, j]) with RelViT's direction classes
                     target = 3 * (sign(row_i - row_j) + 1) + (sign(col_i - col_j) + 1)   (as relation_loss)
    task "offset"    (C_out = 2): mean over the two coordinates of (out[b, i, j] - t[b, i, j])^2 with the normalised
                     offset t = ((row_i - row_j) / (S - 1), (col_i - col_j) / (S - 1))      (DRLoc; S = 1 gives t = 0)
    loss         = mean over the selected pairs (b, i, j)

``act`` is "gelu" (the exact erf GELU, F.gelu(approximate="none")) or "relu". All ordered pairs are selected, the
diagonal included; ``pair_mask`` ([N, N] or [B, N, N] bool) selects a subset and the mean runs over it; an empty
selection gives loss 0 (and accuracy 0). ``label_smoothing`` (direction only) is F.cross_entropy's.
``return_accuracy=True`` (direction only) also returns the fraction of selected pairs whose argmax class is the
target (first maximum on ties); it carries no gradient.

Shapes and dtypes: u, v [B, N, H], weight [C_out, H], bias [C_out], one floating dtype (autocast casts all four to
its dtype); positions [B, N] int64 in [0, S*S). The loss (and accuracy) is a 0-d tensor in float32 (float64 for
float64 inputs): every backend computes h and out in fp32. Gradients flow to u, v, weight and bias in their dtype.

Memory: the [B, N, N, H] hidden activations are never stored. The backends walk tiles of query rows i, recompute
the hidden tile in the backward from u and v, and keep nothing per pair between forward and backward.
``relation_mlp_loss_reference`` is the dense (materialising) spec for small N and tests.

Backends: ``cpu`` (vitfast._C: one query row per work item in the forward, one batch element in the backward,
bitwise reproducible across thread counts; its fp32 GELU uses a vectorised erf approximation, abs. error < 1e-6),
``triton`` (vitfast.kernels.relation_mlp_loss: CUDA, or CPU under TRITON_INTERPRET=1; both tasks, fp32 accumulation,
deterministic) and ``torch`` (tile-wise plain PyTorch with closed-form gradients). No CUDA C++ kernel: on CUDA
tensors triton runs (a request for "cuda" falls back loudly). Choose with ``backend=`` or VITFAST_BACKEND.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import NO_FLOAT64, declare_backends
from ._checks import FLOATING, Checker, accumulation_dtype
from .relation_loss import DIRECTION_CLASSES, relation_targets

__all__ = ["relation_mlp_loss", "relation_mlp_loss_reference", "relation_mlp_outputs", "relation_offsets",
           "TASK_OUTPUTS", "ACTIVATIONS"]

TASK_OUTPUTS = {"direction": DIRECTION_CLASSES, "offset": 2}  # C_out per task
ACTIVATIONS = ("gelu", "relu")

# Elements of one [B, Ti, N, H] hidden tile in the torch backend (a few such buffers are alive at once).
_TILE_ELEMENTS = 1 << 21


def _identity_positions(u: Tensor) -> Tensor:
    return torch.arange(u.shape[1], device=u.device).expand(u.shape[0], -1)


def relation_offsets(positions: Tensor, grid_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """offsets [B, N, N, 2]: ((row_i - row_j), (col_i - col_j)) / (S - 1), DRLoc's normalised offset of i from j."""
    rows, cols = positions // grid_size, positions % grid_size
    d_row = rows[:, :, None] - rows[:, None, :]
    d_col = cols[:, :, None] - cols[:, None, :]
    return torch.stack((d_row, d_col), -1).to(dtype) / max(grid_size - 1, 1)


def relation_mlp_outputs(u: Tensor, v: Tensor, weight: Tensor, bias: Tensor, activation: str = "gelu") -> Tensor:
    """out [B, N, N, C_out] = weight @ act(u_i + v_j) + bias. Materialises [B, N, N, H]: small N only."""
    pre = u[:, :, None, :] + v[:, None, :, :]
    hidden = F.gelu(pre) if activation == "gelu" else F.relu(pre)
    return hidden @ weight.T + bias


def relation_mlp_loss_reference(
    u: Tensor, v: Tensor, weight: Tensor, bias: Tensor, positions: Optional[Tensor] = None, *,
    grid_size: Optional[int] = None, task: str = "direction", activation: str = "gelu",
    pair_mask: Optional[Tensor] = None, label_smoothing: float = 0.0, return_accuracy: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """The spec: dense [B, N, N, H] hidden, F.gelu / F.relu, F.cross_entropy or squared error, (masked) mean."""
    opmath = accumulation_dtype(u.dtype)
    out = relation_mlp_outputs(u.to(opmath), v.to(opmath), weight.to(opmath), bias.to(opmath), activation)
    if positions is None:
        positions = _identity_positions(u)
    side = math.isqrt(u.shape[1]) if grid_size is None else grid_size
    if task == "direction":
        targets = relation_targets(positions, side)
        losses = F.cross_entropy(out.permute(0, 3, 1, 2), targets, label_smoothing=label_smoothing,
                                 reduction="none")  # [B, N, N]
        hits = out.argmax(-1) == targets
    else:
        losses = F.mse_loss(out, relation_offsets(positions, side, opmath), reduction="none").mean(-1)
        hits = torch.zeros_like(losses, dtype=torch.bool)
    if pair_mask is None:
        loss, accuracy = losses.mean(), hits.float().mean()
    else:
        selected = pair_mask.expand_as(losses)
        count = selected.sum().clamp_min(1)  # an empty selection gives 0, not NaN
        loss, accuracy = losses[selected].sum() / count, hits[selected].sum() / count
    return (loss, accuracy.detach().float()) if return_accuracy else loss


# ---- the torch backend: tiles of query rows, closed-form gradients ----

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _act(pre: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return pre.clamp_min(0)
    return 0.5 * pre * (1.0 + torch.erf(pre * _INV_SQRT2))


def _act_grad(pre: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return (pre > 0).to(pre.dtype)  # 0 at 0, as autograd through F.relu
    # d/dx x * Phi(x) = Phi(x) + x * phi(x)
    return 0.5 * (1.0 + torch.erf(pre * _INV_SQRT2)) + pre * torch.exp(-0.5 * pre * pre) * _INV_SQRT_2PI


def _tiles(u: Tensor):
    batch, n, hidden = u.shape
    rows = max(1, _TILE_ELEMENTS // max(1, batch * n * hidden))
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def _tile_problem(u, v, weight, bias, positions, pair_mask, grid_size, task, activation, start, stop):
    """(pre, hidden [B,Ti,N,H], out [B,Ti,N,C], targets [B,Ti,N] or offsets [B,Ti,N,2], weights [B,Ti,N])."""
    batch, n = u.shape[0], u.shape[1]
    pre = u[:, start:stop, None, :] + v[:, None, :, :]
    hidden = _act(pre, activation)
    out = hidden @ weight.T + bias
    rows, cols = positions // grid_size, positions % grid_size
    d_row = rows[:, start:stop, None] - rows[:, None, :]
    d_col = cols[:, start:stop, None] - cols[:, None, :]
    if task == "direction":
        goal = 3 * (torch.sign(d_row) + 1) + (torch.sign(d_col) + 1)
    else:
        goal = torch.stack((d_row, d_col), -1).to(out.dtype) / max(grid_size - 1, 1)
    if pair_mask is None:
        weights = None
    else:
        weights = pair_mask.expand(batch, n, n)[:, start:stop].to(out.dtype)
    return pre, hidden, out, goal, weights


def _prepare(u, v, weight, bias, positions):
    opmath = accumulation_dtype(u.dtype)
    if positions is None:
        positions = _identity_positions(u)
    return u.to(opmath), v.to(opmath), weight.to(opmath), bias.to(opmath), positions


def _count(u, pair_mask):
    batch, n = u.shape[0], u.shape[1]
    if pair_mask is None:
        return torch.tensor(batch * n * n, dtype=torch.int64, device=u.device)
    return pair_mask.expand(batch, n, n).sum()


def _torch_forward(u, v, weight, bias, positions, pair_mask, grid_size, task, activation, label_smoothing):
    count = _count(u, pair_mask)
    u, v, weight, bias, positions = _prepare(u, v, weight, bias, positions)
    loss_sum = u.new_zeros(())
    correct = u.new_zeros(())
    for start, stop in _tiles(u):
        _, _, out, goal, weights = _tile_problem(u, v, weight, bias, positions, pair_mask, grid_size, task,
                                                 activation, start, stop)
        if task == "direction":
            log_probs = out.log_softmax(-1)
            nll = -log_probs.gather(-1, goal.unsqueeze(-1)).squeeze(-1)
            losses = (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(-1)
            hits = (out.argmax(-1) == goal).to(out.dtype)
        else:
            losses = 0.5 * (out - goal).square().sum(-1)  # the mean over the two coordinates
            hits = torch.zeros_like(losses)
        if weights is not None:
            losses, hits = losses * weights, hits * weights
        loss_sum = loss_sum + losses.sum()
        correct = correct + hits.sum()
    denominator = count.clamp_min(1).to(u.dtype)
    return loss_sum / denominator, (correct / denominator).float(), count


def _torch_backward(grad_loss, count, u, v, weight, bias, positions, pair_mask, grid_size, task, activation,
                    label_smoothing, output_mask):
    """Closed-form gradients (tests hold them against autograd through the reference), tile by tile.

    d loss / d out[b, i, j] = w_bij * (softmax - y) (direction, y the smoothed one-hot) or w_bij * (out - t)
    (offset: d/d out of the mean over 2 coordinates of squared errors), w = pair weight * grad / count. Custom-op
    implementations run below the autograd key, so no torch.autograd here.
    """
    dtypes = (u.dtype, v.dtype, weight.dtype, bias.dtype)
    u, v, weight, bias, positions = _prepare(u, v, weight, bias, positions)
    scale = grad_loss.to(u.dtype) / count.clamp_min(1).to(u.dtype)
    d_u = torch.zeros_like(u)
    d_v = torch.zeros_like(v)
    d_weight = torch.zeros_like(weight)
    d_bias = torch.zeros_like(bias)
    for start, stop in _tiles(u):
        pre, hidden, out, goal, weights = _tile_problem(u, v, weight, bias, positions, pair_mask, grid_size, task,
                                                        activation, start, stop)
        if task == "direction":
            classes = out.shape[-1]
            smoothed = F.one_hot(goal, classes).to(out.dtype) * (1.0 - label_smoothing) + label_smoothing / classes
            d_out = out.softmax(-1) - smoothed
        else:
            d_out = out - goal
        d_out = d_out * (scale if weights is None else (weights * scale).unsqueeze(-1))  # [B, Ti, N, C]
        if output_mask[3]:
            d_bias += d_out.sum((0, 1, 2))
        if output_mask[2]:
            d_weight += torch.einsum("bijc,bijh->ch", d_out, hidden)
        if output_mask[0] or output_mask[1]:
            d_pre = (d_out @ weight) * _act_grad(pre, activation)  # [B, Ti, N, H]
            d_u[:, start:stop] = d_pre.sum(2)
            d_v += d_pre.sum(1)
    grads = (d_u, d_v, d_weight, d_bias)
    return tuple(g.to(dt) if needed else None for g, dt, needed in zip(grads, dtypes, output_mask))


# No "cuda" backend: on CUDA tensors the triton backend is the fused one (a request for "cuda" falls back loudly).
BACKENDS = declare_backends(
    "relation_mlp_loss",
    reference=(_torch_forward, _torch_backward),
    native=("relation_mlp_loss_forward", "relation_mlp_loss_backward"),
    triton=("vitfast.kernels.relation_mlp_loss", "relation_mlp_loss_forward", "relation_mlp_loss_backward"),
    dtypes={"triton": NO_FLOAT64, "cpu": FLOATING, "torch": FLOATING},
)


# ---- torch.library registration: the op composes with autograd, torch.compile and opcheck ----

@torch.library.custom_op("vitfast::relation_mlp_loss", mutates_args=())
def _relation_mlp_loss_op(
    u: Tensor, v: Tensor, weight: Tensor, bias: Tensor, positions: Optional[Tensor], pair_mask: Optional[Tensor],
    grid_size: int, task: str, activation: str, label_smoothing: float, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss [] accumulation dtype, accuracy [] float32, count [] int64 = number of selected pairs)."""
    return tuple(BACKENDS(backend).forward(u, v, weight, bias, positions, pair_mask, grid_size, task, activation,
                                           label_smoothing))


@_relation_mlp_loss_op.register_fake
def _(u, v, weight, bias, positions, pair_mask, grid_size, task, activation, label_smoothing, backend):
    return (u.new_empty((), dtype=accumulation_dtype(u.dtype)), u.new_empty((), dtype=torch.float32),
            u.new_empty((), dtype=torch.int64))


@torch.library.custom_op("vitfast::relation_mlp_loss_backward", mutates_args=())
def _relation_mlp_loss_backward_op(
    grad_loss: Tensor, count: Tensor, u: Tensor, v: Tensor, weight: Tensor, bias: Tensor, positions: Optional[Tensor],
    pair_mask: Optional[Tensor], grid_size: int, task: str, activation: str, label_smoothing: float,
    output_mask: List[bool], backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = BACKENDS(backend).backward(grad_loss.contiguous(), count, u, v, weight, bias, positions, pair_mask,
                                       grid_size, task, activation, label_smoothing, list(output_mask))
    # A custom op returns tensors only: an unneeded gradient travels as an empty tensor.
    return tuple(g if g is not None and needed else u.new_empty(0) for g, needed in zip(grads, output_mask))


@_relation_mlp_loss_backward_op.register_fake
def _(grad_loss, count, u, v, weight, bias, positions, pair_mask, grid_size, task, activation, label_smoothing,
      output_mask, backend):
    return tuple(t.new_empty(t.shape if needed else (0,)) for t, needed in zip((u, v, weight, bias), output_mask))


def _setup_context(ctx, inputs, output):
    u, v, weight, bias, positions, pair_mask, grid_size, task, activation, label_smoothing, backend = inputs
    # Inputs and the pair count only: the backward recomputes every hidden tile from u and v.
    ctx.save_for_backward(u, v, weight, bias, positions, pair_mask, output[2])
    ctx.grid_size, ctx.task, ctx.activation = grid_size, task, activation
    ctx.label_smoothing, ctx.backend = label_smoothing, backend
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_loss, grad_accuracy, grad_count):
    u, v, weight, bias, positions, pair_mask, count = ctx.saved_tensors
    output_mask = [bool(ctx.needs_input_grad[index]) for index in range(4)]
    if not any(output_mask) or grad_loss is None:
        return (None,) * 11
    grads = _relation_mlp_loss_backward_op(grad_loss, count, u, v, weight, bias, positions, pair_mask, ctx.grid_size,
                                           ctx.task, ctx.activation, ctx.label_smoothing, output_mask, ctx.backend)
    return tuple(g if needed else None for g, needed in zip(grads, output_mask)) + (None,) * 7


_relation_mlp_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public function ----

def relation_mlp_loss(
    u: Tensor, v: Tensor, weight: Tensor, bias: Tensor, positions: Optional[Tensor] = None, *,
    grid_size: Optional[int] = None, task: str = "direction", activation: str = "gelu",
    pair_mask: Optional[Tensor] = None, label_smoothing: float = 0.0, return_accuracy: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Mean pair loss of the MLP relation head (see the module doc); ``(loss, accuracy)`` with ``return_accuracy``
    (direction only). ``grid_size`` S is required with ``positions``; without positions it defaults to sqrt(N)."""
    check = Checker("relation_mlp_loss")
    if task not in TASK_OUTPUTS:
        check.fail(f'task must be one of {tuple(TASK_OUTPUTS)}, got {task!r}')
    if activation not in ACTIVATIONS:
        check.fail(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    outputs = TASK_OUTPUTS[task]
    u = check.tensor("u", u, ("B", "N", "H"))
    device = u.device
    check.tensor("v", v, ("B", "N", "H"), device=device)
    check.tensor("weight", weight, (outputs, "H"), device=device)
    check.tensor("bias", bias, (outputs,), device=device)
    batch, n, hidden = u.shape
    if n == 0 or hidden == 0:
        check.fail(f"u must have N >= 1 tokens and H >= 1, got {list(u.shape)}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        check.fail(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if task == "offset" and (label_smoothing or return_accuracy):
        check.fail('label_smoothing and return_accuracy apply to task="direction" only')
    grid_size = check.grid(positions, grid_size, n, device)
    check.pair_mask(pair_mask, device)

    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        u, v, weight, bias = u.to(dtype), v.to(dtype), weight.to(dtype), bias.to(dtype)
    check.same_dtype("u", u, v=v, weight=weight, bias=bias)

    chosen = BACKENDS.select(device, u.dtype, backend)
    contiguous = lambda t: t.contiguous() if t is not None else None
    loss, accuracy, _ = _relation_mlp_loss_op(u.contiguous(), v.contiguous(), weight.contiguous(), bias.contiguous(),
                                              contiguous(positions), contiguous(pair_mask), int(grid_size), task,
                                              activation, float(label_smoothing), chosen)
    return (loss, accuracy) if return_accuracy else loss
