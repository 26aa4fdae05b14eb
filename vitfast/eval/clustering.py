"""Clustering accuracy of frozen features (docs/methods.md §6 and §8.4): k-means, then Hungarian matching.

    result = clustering_accuracy(test_features, test_labels)    # {"accuracy", "nmi", "num_clusters"}
    accuracy = matched_accuracy(cluster_ids, labels)             # the matching alone

k-means (scikit-learn's KMeans, Lloyd, ``n_init`` restarts, ``random_state=seed``) runs on
L2-normalised features, the same geometry as the cosine k-NN. Clusters are matched one-to-one to
classes by the assignment that maximises the number of correctly matched samples
(scipy.optimize.linear_sum_assignment); with more clusters than classes the unmatched clusters count
as wrong. NMI is scikit-learn's normalized_mutual_info_score (arithmetic mean normalisation), which
needs no matching. Needs scikit-learn and scipy (``pip install scikit-learn scipy``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .features import EvalChecker


def _require(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as error:
        raise ImportError(f"vitfast.eval.clustering needs scikit-learn and scipy "
                          f"(pip install scikit-learn scipy): {error}") from error


def matched_accuracy(cluster_ids: Tensor, labels: Tensor) -> float:
    """Accuracy in [0, 1] of cluster_ids [N] against labels [N] under the best one-to-one cluster-to-class map."""
    check = EvalChecker("matched_accuracy")
    cluster_ids = check.labels("cluster_ids", cluster_ids, "N")
    labels = check.labels("labels", labels, "N")
    if labels.numel() == 0:
        check.fail("labels must hold at least one sample, got 0")
    optimize = _require("scipy.optimize")
    clusters, cluster_index = torch.unique(cluster_ids, return_inverse=True)
    classes, class_index = torch.unique(labels, return_inverse=True)
    counts = torch.zeros(len(clusters), len(classes), dtype=torch.int64)
    counts.index_put_((cluster_index, class_index), torch.ones_like(class_index), accumulate=True)
    rows, cols = optimize.linear_sum_assignment(counts.numpy(), maximize=True)
    return int(counts[torch.as_tensor(rows), torch.as_tensor(cols)].sum()) / labels.numel()


def clustering_accuracy(features: Tensor, labels: Tensor, *, num_clusters: Optional[int] = None, seed: int = 0,
                        n_init: int = 10) -> Dict[str, float]:
    """k-means on features [N, D] -> {"accuracy" (Hungarian-matched), "nmi", "num_clusters"}.

    ``num_clusters`` defaults to the number of distinct labels present.
    """
    check = EvalChecker("clustering_accuracy")
    check.features("features", features, "N")
    labels = check.labels("labels", labels, "N")
    distinct = int(torch.unique(labels).numel())
    num_clusters = distinct if num_clusters is None else num_clusters
    if not isinstance(num_clusters, int) or not 1 <= num_clusters <= features.shape[0]:
        check.fail(f"num_clusters must be an int in [1, {features.shape[0]}] (the number of samples), "
                   f"got {num_clusters!r}")
    if not isinstance(n_init, int) or n_init < 1:
        check.fail(f"n_init must be a positive int, got {n_init!r}")
    cluster = _require("sklearn.cluster")
    metrics = _require("sklearn.metrics")

    points = F.normalize(features.detach().float().cpu(), dim=1).numpy()
    kmeans = cluster.KMeans(n_clusters=num_clusters, n_init=n_init, random_state=seed)
    assignment = torch.from_numpy(kmeans.fit_predict(points)).long()
    return {
        "accuracy": matched_accuracy(assignment, labels),
        "nmi": float(metrics.normalized_mutual_info_score(labels.numpy(), assignment.numpy())),
        "num_clusters": num_clusters,
    }
