"""Linear probe on frozen features (docs/methods.md §8.2), selected on the validation split only.

    result = linear_probe(train_f, train_y, val_f, val_y, test_f, test_y, num_classes=10)
    result["test_accuracy"]                # the headline: test accuracy after the last epoch of the lr selected on val
    result["test_accuracy_best_val_epoch"] # test accuracy of the (lr, epoch) with the best val accuracy (secondary)

Model: BatchNorm1d(D, affine=False) -> Linear(D, num_classes), as in MAE's linear probe (the BN
without affine only standardises the features and folds into the linear layer at inference).

Optimiser (the default, chosen for robustness across feature scales and datasets): SGD with
momentum 0.9 (PyTorch semantics, no dampening, no Nesterov), cosine decay of the lr per step from
``lr`` to 0 without warm-up (the problem is convex; nothing to warm up), weights initialised to
zero, weight decay on the weight only (not the bias), cross-entropy without label smoothing. The lr
is absolute (not scaled with the batch size). With ``lr=None`` every lr of ``LR_GRID`` is trained:
BN-standardised features put the good SGD lr for softmax regression within about two decades, and
one grid of 5 is cheaper than being wrong. All grid lrs share one BatchNorm and one shuffle order and
train as one stacked [G, C, D] weight, so each head is the probe that lr alone would give (up to
float rounding of the batched matmul).

Selection: after every epoch each head is evaluated on val (BN on running statistics). The chosen
(lr, epoch) has the highest val accuracy; ties go to the lower val loss, then to the earlier epoch,
then to the earlier lr of the grid. A head whose val loss is not finite (diverged) is never chosen.
The test split is evaluated exactly twice, after training: the final epoch of the selected lr (the
headline, ``test_accuracy``: the protocol of docs/methods.md §8.2) and the selected snapshot
(``test_accuracy_best_val_epoch``). ``history`` holds the per-epoch val curves (no test numbers, on purpose).
With an empty val split (a run with ``val_fraction=0``) nothing is selected: one lr is trained
(``lr``, default ``LR_WITHOUT_VAL``) and its final epoch is reported.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .features import EvalChecker, _progress

LR_GRID: Tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)  # searched when lr=None; see the module docstring
LR_WITHOUT_VAL = 0.1  # the lr trained when there is no val split to select on (the grid's middle)
MOMENTUM = 0.9
EVAL_CHUNK = 8192  # rows per evaluation matmul


def _heads_logits(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x [b, D], weight [G, C, D], bias [G, C] -> logits [G, b, C]."""
    return torch.einsum("bd,gcd->gbc", x, weight) + bias[:, None, :]


@torch.no_grad()
def _evaluate(features: Tensor, labels: Tensor, mean: Tensor, var: Tensor, eps: float, weight: Tensor,
              bias: Tensor) -> Tuple[Tensor, Tensor]:
    """Accuracy [G] and mean cross-entropy [G] (float64 on the CPU) of every head on (features, labels)."""
    heads = weight.shape[0]
    correct = torch.zeros(heads, dtype=torch.float64, device=weight.device)
    loss = torch.zeros(heads, dtype=torch.float64, device=weight.device)
    for start in range(0, features.shape[0], EVAL_CHUNK):
        x = F.batch_norm(features[start:start + EVAL_CHUNK], mean, var, training=False, eps=eps)
        y = labels[start:start + EVAL_CHUNK]
        logits = _heads_logits(x, weight, bias)
        loss += F.cross_entropy(logits.transpose(1, 2), y.expand(heads, -1), reduction="none").double().sum(1)
        correct += (logits.argmax(2) == y).double().sum(1)
    return (correct / features.shape[0]).cpu(), (loss / features.shape[0]).cpu()


def _better(candidate: Tuple[float, float], best: Optional[Tuple[float, float]]) -> bool:
    """(val accuracy, val loss): higher accuracy wins, then lower loss; equal keeps the earlier one."""
    accuracy, loss = candidate
    if not math.isfinite(loss):
        return False
    return best is None or accuracy > best[0] or (accuracy == best[0] and loss < best[1])


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    epochs: int = 100,
    lr: Union[None, float, Sequence[float]] = None,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
    device="cpu",
    progress: bool = False,
) -> Dict:
    """Train BN(affine=False) + Linear on train_features [N, D]; select on val [V, D]; report test [M, D].

    ``lr``: None searches ``LR_GRID``; a float trains that lr only; a sequence is a custom grid. V may be 0 (no
    val split): then one lr is trained (None: ``LR_WITHOUT_VAL``) and nothing is selected.
    Returns ``{"test_accuracy" (final epoch of the selected lr), "test_accuracy_best_val_epoch", "val_accuracy"
    (the best), "best_epoch" (1-based), "lr", "val_accuracy_final_epoch", "history": {"lr": [G], "train_loss":
    [G][epochs], "val_accuracy": [G][epochs], "val_loss": [G][epochs]}}`` (without val: the val and best-epoch
    values are None). Deterministic for a given seed on a given device.
    """
    check = EvalChecker("linear_probe")
    if not isinstance(num_classes, int) or num_classes < 2:
        check.fail(f"num_classes must be an int >= 2, got {num_classes!r}")
    has_val = not (isinstance(val_features, Tensor) and val_features.dim() == 2 and val_features.shape[0] == 0)
    for split, rows in (("train", "N"), ("val", "V"), ("test", "M")):
        if split != "val" or has_val:
            check.features(f"{split}_features", locals()[f"{split}_features"], rows)
    train_labels = check.labels("train_labels", train_labels, "N", num_classes)
    val_labels = check.labels("val_labels", val_labels, "V", num_classes)
    test_labels = check.labels("test_labels", test_labels, "M", num_classes)
    if train_features.shape[0] < 2:
        check.fail(f"train_features needs at least 2 rows for BatchNorm, got {train_features.shape[0]}")
    if not isinstance(epochs, int) or epochs < 1:
        check.fail(f"epochs must be a positive int, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 2:
        check.fail(f"batch_size must be an int >= 2 (BatchNorm needs 2 rows), got {batch_size!r}")
    if not weight_decay >= 0:
        check.fail(f"weight_decay must be >= 0, got {weight_decay!r}")
    if lr is None:
        lr = LR_GRID if has_val else LR_WITHOUT_VAL
    lrs = (lr,) if isinstance(lr, (int, float)) else tuple(lr)
    if not has_val and len(lrs) != 1:
        check.fail(f"without a val split there is nothing to select an lr on: give one lr, got {list(lrs)}")
    if not lrs or not all(isinstance(v, (int, float)) and v > 0 for v in lrs):
        check.fail(f"lr must be None, a positive float or a non-empty sequence of them, got {lr!r}")
    lrs = tuple(float(v) for v in lrs)

    device = torch.device(device)
    x_train, y_train = train_features.to(device, torch.float32), train_labels.to(device)
    x_val, y_val = val_features.to(device, torch.float32), val_labels.to(device)
    x_test, y_test = test_features.to(device, torch.float32), test_labels.to(device)
    rows, dim = x_train.shape
    heads = len(lrs)

    norm = nn.BatchNorm1d(dim, affine=False).to(device)
    weight = torch.zeros(heads, num_classes, dim, device=device, requires_grad=True)
    bias = torch.zeros(heads, num_classes, device=device, requires_grad=True)
    buffers = [torch.zeros_like(weight), torch.zeros_like(bias)]
    base_lr = torch.tensor(lrs, device=device)
    generator = torch.Generator().manual_seed(seed)

    batch = min(batch_size, rows)
    # A last batch of one row cannot be batch-normalised: it is dropped (it is a different row each epoch).
    steps_per_epoch = rows // batch + (1 if rows % batch >= 2 else 0)
    total_steps = epochs * steps_per_epoch

    history = {"lr": list(lrs), "train_loss": [[] for _ in lrs], "val_accuracy": [[] for _ in lrs],
               "val_loss": [[] for _ in lrs]}
    best = None  # ((val accuracy, val loss), epoch, head, snapshot)
    step = 0
    for epoch in _progress(range(1, epochs + 1), progress, "linear probe"):
        norm.train()
        order = torch.randperm(rows, generator=generator).to(device)
        epoch_loss = torch.zeros(heads, dtype=torch.float64, device=device)
        for index in order.split(batch)[:steps_per_epoch]:
            with torch.no_grad():
                x = norm(x_train[index])
            logits = _heads_logits(x, weight, bias)                       # [G, b, C]
            targets = y_train[index].expand(heads, -1)                   # [G, b]
            loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)  # [G]
            # The heads share no parameter, so the gradient of the sum is each head's own gradient.
            loss.sum().backward()
            with torch.no_grad():
                scale = base_lr * (0.5 * (1.0 + math.cos(math.pi * step / total_steps)))
                for param, buffer, decay in ((weight, buffers[0], weight_decay), (bias, buffers[1], 0.0)):
                    grad = param.grad.add(param, alpha=decay) if decay else param.grad
                    buffer.mul_(MOMENTUM).add_(grad)
                    param.sub_(scale.view(-1, *[1] * (param.dim() - 1)) * buffer)
                    param.grad = None
                epoch_loss += loss.detach().double()
            step += 1

        train_loss = (epoch_loss / steps_per_epoch).cpu()
        if not has_val:
            history["train_loss"][0].append(float(train_loss[0]))
            continue
        val_accuracy, val_loss = _evaluate(x_val, y_val, norm.running_mean, norm.running_var, norm.eps,
                                           weight.detach(), bias.detach())
        for head in range(heads):
            history["train_loss"][head].append(float(train_loss[head]))
            history["val_accuracy"][head].append(float(val_accuracy[head]))
            history["val_loss"][head].append(float(val_loss[head]))
            key = (float(val_accuracy[head]), float(val_loss[head]))
            if _better(key, None if best is None else best[0]):
                snapshot = (norm.running_mean.clone(), norm.running_var.clone(),
                            weight.detach()[head:head + 1].clone(), bias.detach()[head:head + 1].clone())
                best = (key, epoch, head, snapshot)

    if not has_val:
        final_test, _ = _evaluate(x_test, y_test, norm.running_mean, norm.running_var, norm.eps, weight.detach(),
                                  bias.detach())
        return {"test_accuracy": float(final_test[0]), "test_accuracy_best_val_epoch": None, "val_accuracy": None,
                "best_epoch": None, "lr": lrs[0], "val_accuracy_final_epoch": None, "history": history}
    if best is None:
        check.fail(f"every lr in {list(lrs)} diverged (non-finite val loss); try a smaller lr")
    (best_val, _), best_epoch, best_head, (mean, var, best_weight, best_bias) = best
    final = slice(best_head, best_head + 1)
    final_test, _ = _evaluate(x_test, y_test, norm.running_mean, norm.running_var, norm.eps,
                              weight.detach()[final], bias.detach()[final])
    best_test, _ = _evaluate(x_test, y_test, mean, var, norm.eps, best_weight, best_bias)
    return {
        "test_accuracy": float(final_test[0]),
        "test_accuracy_best_val_epoch": float(best_test[0]),
        "val_accuracy": best_val,
        "best_epoch": best_epoch,
        "lr": lrs[best_head],
        "val_accuracy_final_epoch": history["val_accuracy"][best_head][-1],
        "history": history,
    }
