"""Frozen features of a whole split, and the argument checks every eval metric shares.

    features = extract_features(method.features, splits["train"].images,
                                transform=eval_transform, device="cuda")   # [N, D] float32 on CPU
    accuracy = knn_accuracy(features, splits["train"].labels, test_features, splits["test"].labels)

``encode`` maps a normalised float batch [b, C, H, W] on ``device`` to pooled features [b, D].
The module behind it runs in eval mode (no dropout, no drop-path, BatchNorm on running statistics)
and without autograd; its previous train/eval state is restored afterwards.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from ..ops._checks import Checker, describe

INTEGER = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class EvalChecker(Checker):
    """The ops' argument checker with ``vitfast.eval.<function>`` in its messages."""

    def fail(self, message: str):
        raise ValueError(f"vitfast.eval.{self.op_name}: {message}")

    def features(self, name: str, value, rows: str, *, dim: str = "D") -> Tensor:
        """A non-empty, finite floating [rows, dim] matrix (a NaN feature would silently poison every metric)."""
        self.tensor(name, value, (rows, dim))
        if value.shape[0] == 0 or value.shape[1] == 0:
            self.fail(f"{name} must be a non-empty [{rows}, {dim}] matrix, got {describe(value)}")
        self.finite(**{name: value})
        return value

    def labels(self, name: str, value, rows: str, num_classes: Optional[int] = None) -> Tensor:
        """Integer class ids [rows] in [0, num_classes); returned as int64 on the CPU."""
        if not isinstance(value, Tensor):
            try:
                value = torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError):
                self.fail(f"{name} must be an integer tensor [{rows}], got {type(value).__name__}")
        value = value.cpu()
        value_range = None if num_classes is None else (0, num_classes)
        self.tensor(name, value, (rows,), dtypes=INTEGER, value_range=value_range)
        if value.numel() and int(value.min()) < 0:
            self.fail(f"{name} must hold class ids >= 0, got minimum {int(value.min())}")
        return value.long()


def infer_num_classes(*labels: Tensor) -> int:
    """1 + the largest class id among the given label tensors."""
    return 1 + max(int(y.max()) for y in labels if y.numel())


def _owning_module(encode, model: Optional[nn.Module]) -> Optional[nn.Module]:
    if model is not None:
        return model
    if isinstance(encode, nn.Module):
        return encode
    owner = getattr(encode, "__self__", None)  # a bound method such as method.features
    return owner if isinstance(owner, nn.Module) else None


def _progress(iterable, enabled: bool, desc: str, total: Optional[int] = None):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)


@torch.no_grad()
def extract_features(
    encode: Callable[[Tensor], Tensor],
    images_uint8: Tensor,
    *,
    transform: Callable[[Tensor], Tensor],
    batch_size: int = 256,
    device="cpu",
    progress: bool = False,
    desc: str = "features",
    model: Optional[nn.Module] = None,
) -> Tensor:
    """Features [N, D] float32 on the CPU of ``images_uint8`` [N, C, H, W] uint8, in order.

    Each batch is moved to ``device`` as uint8, normalised by ``transform`` (uint8 batch on device ->
    float batch on device) and encoded by ``encode``. The module put in eval mode is ``model`` if
    given, else ``encode`` itself if it is an ``nn.Module``, else the module ``encode`` is a bound
    method of (``method.features``); pass ``model`` when ``encode`` is a plain function or lambda.
    """
    check = EvalChecker("extract_features")
    if not callable(encode):
        check.fail(f"encode must be callable, got {type(encode).__name__}")
    if not callable(transform):
        check.fail(f"transform must be callable, got {type(transform).__name__}")
    check.tensor("images_uint8", images_uint8, ("N", "C", "H", "W"), dtypes=(torch.uint8,))
    if images_uint8.shape[0] == 0:
        check.fail(f"images_uint8 must hold at least one image, got {describe(images_uint8)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        check.fail(f"batch_size must be a positive int, got {batch_size!r}")
    device = torch.device(device)
    total = images_uint8.shape[0]

    module = _owning_module(encode, model)
    was_training = {m: m.training for m in module.modules()} if module is not None else {}
    if module is not None:
        module.eval()
    try:
        out: Optional[Tensor] = None
        starts = range(0, total, batch_size)
        for start in _progress(starts, progress, desc, total=len(starts)):
            batch = images_uint8[start:start + batch_size].to(device, non_blocking=True)
            features = encode(transform(batch))
            rows = batch.shape[0]
            if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] != rows:
                check.fail(f"encode must return features [b, D] for a batch of b = {rows} images, "
                           f"got {describe(features)}")
            if out is None:
                out = torch.empty(total, features.shape[1], dtype=torch.float32)
            elif features.shape[1] != out.shape[1]:
                check.fail(f"encode returned D = {features.shape[1]} features for images {start}..., "
                           f"but D = {out.shape[1]} before")
            out[start:start + rows] = features.float().cpu()
        return out
    finally:
        for m, mode in was_training.items():
            m.training = mode


def split_arrays(split, name: str) -> Tuple[Tensor, Tensor]:
    """(images uint8 [N, C, H, W], labels int64 [N]) of an ImageDataset-like split."""
    for attribute in ("images", "labels"):
        if not hasattr(split, attribute):
            raise ValueError(f"vitfast.eval: split {name!r} must have .images and .labels, "
                             f"got {type(split).__name__} without .{attribute}")
    return split.images, torch.as_tensor(split.labels)
