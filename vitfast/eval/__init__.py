"""Evaluation of frozen representations (docs/methods.md §8): k-NN, linear probe, clustering accuracy.

    metrics = evaluate_representation(method.features, splits, transform=eval_transform, device="cuda")
    metrics["knn_accuracy"], metrics["linear_probe"]["test_accuracy"], metrics["clustering"]["accuracy"]

Features are extracted once per split (``extract_features``) and every metric runs on them. The
protocols: k-NN with the train split as the bank, scored on test (and on val); the linear probe
trains on train, selects (lr, epoch) on val and reports test; clustering runs k-means on the test
split's features. Fine-tuning lives in the training engine; ``classification_accuracy`` scores its classifier.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Mapping

from torch import Tensor

from .classification import classification_accuracy
from .clustering import clustering_accuracy, matched_accuracy
from .features import extract_features, infer_num_classes, split_arrays
from .knn import knn_accuracy, knn_classify
from .linear_probe import LR_GRID, linear_probe

METRICS = ("knn", "linear", "clustering")


def evaluate_representation(
    encode: Callable[[Tensor], Tensor],
    splits: Mapping[str, object],
    *,
    transform: Callable[[Tensor], Tensor],
    device,
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    probe_epochs: int = 100,
    probe_lr=None,
    feature_batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
    which: Iterable[str] = METRICS,
) -> Dict:
    """The representation metrics of ``encode`` on ``splits`` ({"train", "val", "test"} -> ImageDataset-like).

    A split needs ``.images`` uint8 [N, C, H, W] and ``.labels`` [N]; ``num_classes`` comes from the
    train split's ``.num_classes`` when it has one, else from the labels. Returns the requested keys of
    ``{"knn_accuracy", "knn_val_accuracy", "linear_probe": {...}, "clustering": {...}}``. Only the splits
    the metrics need are encoded: val only for the linear probe ("knn_val_accuracy" comes with it, the
    val features being there anyway), so a k-NN-only call during training costs train + test.
    """
    which = tuple(which)
    unknown = [name for name in which if name not in METRICS]
    if unknown or not which:
        raise ValueError(f"vitfast.eval.evaluate_representation: which must be a non-empty subset of {METRICS}, "
                         f"got {which}")
    needed = {"knn": ("train", "test"), "linear": ("train", "val", "test"), "clustering": ("test",)}
    wanted = {s for m in which for s in needed[m]}
    names = [s for s in ("train", "val", "test") if s in wanted]
    missing = [s for s in names if s not in splits]
    if missing:
        raise ValueError(f"vitfast.eval.evaluate_representation: {list(which)} needs the splits {missing}, "
                         f"got {sorted(splits)}")

    features, labels = {}, {}
    for name in names:
        images, labels[name] = split_arrays(splits[name], name)
        if name == "val" and images.shape[0] == 0:  # val_fraction 0: nothing to select on (the probe's fixed lr)
            continue
        features[name] = extract_features(encode, images, transform=transform, batch_size=feature_batch_size,
                                          device=device, progress=progress, desc=f"features {name}")
    if "val" in labels and "val" not in features:
        features["val"] = features["train"].new_zeros(0, features["train"].shape[1])
    num_classes = getattr(splits[names[0]], "num_classes", None) or infer_num_classes(*labels.values())

    result: Dict = {}
    if "knn" in which:
        result["knn_accuracy"] = knn_accuracy(features["train"], labels["train"], features["test"], labels["test"],
                                              k=knn_k, temperature=knn_temperature, num_classes=num_classes)
        if "val" in features and features["val"].shape[0] > 0:
            result["knn_val_accuracy"] = knn_accuracy(features["train"], labels["train"], features["val"],
                                                      labels["val"], k=knn_k, temperature=knn_temperature,
                                                      num_classes=num_classes)
    if "linear" in which:
        result["linear_probe"] = linear_probe(features["train"], labels["train"], features["val"], labels["val"],
                                              features["test"], labels["test"], num_classes=num_classes,
                                              epochs=probe_epochs, lr=probe_lr, seed=seed, device=device,
                                              progress=progress)
    if "clustering" in which:
        result["clustering"] = clustering_accuracy(features["test"], labels["test"], seed=seed)
    return result


__all__ = ["evaluate_representation", "extract_features", "knn_accuracy", "knn_classify", "linear_probe", "LR_GRID",
           "clustering_accuracy", "matched_accuracy", "infer_num_classes", "METRICS", "classification_accuracy"]
