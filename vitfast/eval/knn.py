"""Weighted k-NN classification of frozen features (docs/methods.md §8.1, the MAE-CT / DINO protocol).

    accuracy = knn_accuracy(train_features, train_labels, test_features, test_labels)   # k=20, T=0.07
    predictions, votes = knn_classify(train_features, train_labels, test_features, num_classes=10)

Features are L2-normalised, so similarity is cosine. Each query takes its k most similar training
rows; neighbour j votes for its label with weight exp(sim_j / temperature); the prediction is the
class with the largest summed vote (ties go to the lowest class id). Queries are processed in chunks
of ``batch_size`` rows: memory is O(batch_size · N_train), never O(N_test · N_train). The similarity
matrix lives on the device of ``train_features`` (features on a GPU run there).
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .features import EvalChecker, infer_num_classes


def _check(name, query_name, train_features, train_labels, query_features, query_labels, k, temperature,
           num_classes, batch_size):
    check = EvalChecker(name)
    check.features("train_features", train_features, "N")
    check.features(f"{query_name}_features", query_features, "M")
    if not isinstance(k, int) or k < 1:
        check.fail(f"k must be a positive int, got {k!r}")
    if not temperature > 0:
        check.fail(f"temperature must be > 0, got {temperature!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        check.fail(f"batch_size must be a positive int, got {batch_size!r}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        check.fail(f"num_classes must be a positive int or None, got {num_classes!r}")
    train_labels = check.labels("train_labels", train_labels, "N", num_classes)
    if query_labels is not None:
        query_labels = check.labels(f"{query_name}_labels", query_labels, "M", num_classes)
    if num_classes is None:
        num_classes = infer_num_classes(train_labels, *(() if query_labels is None else (query_labels,)))
    return train_labels, query_features, query_labels, num_classes


def _votes(train_features: Tensor, train_labels: Tensor, query_features: Tensor, k: int, temperature: float,
           num_classes: int, batch_size: int) -> Iterator[Tuple[int, Tensor]]:
    """Yields (first query row, votes [b, num_classes] float32) chunk by chunk."""
    device = train_features.device
    bank = F.normalize(train_features.float(), dim=1)
    bank_labels = train_labels.to(device)
    k = min(k, bank.shape[0])  # fewer training rows than k: every row is a neighbour
    for start in range(0, query_features.shape[0], batch_size):
        queries = F.normalize(query_features[start:start + batch_size].to(device).float(), dim=1)
        similarity = queries @ bank.T                                   # [b, N]
        top_similarity, top_index = similarity.topk(k, dim=1)          # sorted, descending
        # exp(sim / T) overflows float32 once T < 1/88; shifting by the nearest neighbour's similarity
        # rescales a row's votes by one positive constant, so the argmax is that of exp(sim / T).
        weights = torch.exp((top_similarity - top_similarity[:, :1]) / temperature)
        votes = torch.zeros(queries.shape[0], num_classes, device=device)
        votes.scatter_add_(1, bank_labels[top_index], weights)
        yield start, votes


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: Optional[int] = None,
    batch_size: int = 1024,
) -> Tuple[Tensor, Tensor]:
    """Predictions [M] int64 and votes [M, num_classes] float32 (both on the CPU) for query_features [M, D].

    A row of votes is proportional to sum over neighbours j of exp(sim_j / temperature) per class,
    scaled so that the nearest neighbour weighs 1.
    """
    train_labels, query_features, _, num_classes = _check(
        "knn_classify", "query", train_features, train_labels, query_features, None, k, temperature, num_classes,
        batch_size)
    votes = torch.empty(query_features.shape[0], num_classes)
    for start, chunk in _votes(train_features, train_labels, query_features, k, temperature, num_classes,
                               batch_size):
        votes[start:start + chunk.shape[0]] = chunk.cpu()
    return votes.argmax(1), votes


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: Optional[int] = None,
    batch_size: int = 1024,
) -> float:
    """Top-1 accuracy in [0, 1] of weighted k-NN on test_features [M, D] against the bank train_features [N, D].

    ``num_classes`` defaults to 1 + the largest label in either split; ``k`` is clamped to N.
    """
    train_labels, test_features, test_labels, num_classes = _check(
        "knn_accuracy", "test", train_features, train_labels, test_features, test_labels, k, temperature, num_classes,
        batch_size)
    correct = 0
    for start, votes in _votes(train_features, train_labels, test_features, k, temperature, num_classes, batch_size):
        targets = test_labels[start:start + votes.shape[0]].to(votes.device)
        correct += int((votes.argmax(1) == targets).sum())
    return correct / test_features.shape[0]
