"""Top-1 accuracy of a classifier (a fine-tuned or supervised model, not a frozen representation).

    metrics = classification_accuracy(model, splits, transform, device)   # {"val_accuracy", "test_accuracy"}

The model is scored as it is (the final epoch's weights): nothing is selected on test.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Sequence

import torch
from torch import Tensor, nn


@torch.no_grad()
def classification_accuracy(model: nn.Module, splits: Mapping[str, object], transform: Callable[[Tensor], Tensor],
                            device, batch_size: int = 512, which: Sequence[str] = ("val", "test")) -> Dict[str, float]:
    """Accuracy of ``model`` (uint8 images -> ``transform`` -> logits [B, classes]) on the splits ``which``.

    A split needs ``.images`` uint8 [N, C, H, W] and ``.labels`` int64 [N]. Returns
    ``{"val_accuracy": float, "test_accuracy": float}``; an empty split (no val with ``val_fraction=0``) is left out.
    """
    model.eval()
    result = {}
    for split in which:
        data = splits[split]
        if len(data.labels) == 0:
            continue
        correct = 0
        for start in range(0, len(data.labels), batch_size):
            images = transform(data.images[start:start + batch_size].to(device))
            correct += (model(images).argmax(1).cpu() == data.labels[start:start + batch_size]).sum().item()
        result[f"{split}_accuracy"] = correct / len(data.labels)
    return result
