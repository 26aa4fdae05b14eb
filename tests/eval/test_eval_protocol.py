"""The evaluation protocol end to end: arguments reach the k-NN, the probe's selection, clustering's known answers.

tests/eval/test_eval.py checks each metric against brute force. Here: that a non-default k and temperature
given to evaluate_representation or to the engine's config are the ones the k-NN uses (compared with a
direct knn_accuracy call on the same features, on data where the value depends on them); that the linear
probe's (lr, epoch) selection follows its tie rule, is deterministic and never reads the test split; and
clustering accuracy on cases whose answer is computed by hand. Cost: ~5 s on 2 cores.
"""
import math
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import importlib
from vitfast.config import build_config
from vitfast.engine import Trainer
from vitfast.eval import clustering_accuracy, evaluate_representation, extract_features, knn_accuracy, linear_probe

probe_module = importlib.import_module("vitfast.eval.linear_probe")  # the module (the package exports the function)


def neighbourhoods(groups=5):
    """A k-NN problem whose answer depends on k and the temperature, as uint8 "images" [rows, 2 * groups, 1, 1].

    Each query has its own plane (coordinates 2g, 2g+1; the planes are orthogonal, so no query sees another's
    points among its 24 nearest): 1 training point of class 0 in the query's direction, 3 of class 1 at 30
    degrees, 20 of class 2 at 60 degrees. Weighted votes exp(cos / T): k=4, T=1 -> class 1 (the query's label);
    k=4, T=0.07 -> class 0 (the nearest point dominates); k=20 -> class 0 (T=0.07) or class 2 (T=1, by count).
    """
    def point(group, degrees):
        v = torch.zeros(2 * groups)
        v[2 * group], v[2 * group + 1] = 100 * math.cos(math.radians(degrees)), 100 * math.sin(math.radians(degrees))
        return v

    train = [(point(g, d), c) for g in range(groups) for d, c, n in ((0, 0, 1), (30, 1, 3), (60, 2, 20))
             for _ in range(n)]
    query = [(point(g, 0), 1) for g in range(groups)]

    def split(rows):
        features = torch.stack([f for f, _ in rows])
        images = (features.round() + 128).to(torch.uint8).view(len(rows), 2 * groups, 1, 1)
        return SimpleNamespace(images=images, labels=torch.tensor([c for _, c in rows]), num_classes=3)

    return {"train": split(train), "val": split(query), "test": split(query)}


def centred(x):
    return x.float() - 128


# --- k and temperature reach the k-NN ---------------------------------------------------------------------------

def test_knn_k_and_temperature_reach_knn_through_evaluate_representation():
    splits = neighbourhoods()
    encoder = nn.Flatten()
    feats = {name: extract_features(encoder, s.images, transform=centred) for name, s in splits.items()}

    def direct(query, k, temperature):
        return knn_accuracy(feats["train"], splits["train"].labels, feats[query], splits[query].labels, k=k,
                            temperature=temperature, num_classes=3)

    for query in ("test", "val"):  # only the asked-for pair finds the queries' label
        assert direct(query, 4, 1.0) == 1.0
        assert direct(query, 20, 0.07) == direct(query, 4, 0.07) == direct(query, 20, 1.0) == 0.0
    result = evaluate_representation(encoder, splits, transform=centred, device="cpu", knn_k=4, knn_temperature=1.0,
                                     which=("knn", "linear"), probe_epochs=1)
    assert result["knn_accuracy"] == result["knn_val_accuracy"] == 1.0
    default = evaluate_representation(encoder, splits, transform=centred, device="cpu", which=("knn",))
    assert default["knn_accuracy"] == direct("test", 20, 0.07)


TINY = dict(embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, patch_size=8, batch_size=64, decoder_dim=32,
            decoder_depth=1, decoder_heads=2, progress=False, device="cpu", metrics="knn", image_size=16)


def test_config_knn_k_reaches_the_engine_knn(tmp_path):
    """The engine's per-epoch k-NN and its final evaluation use config.knn_k (random-init MAE encoder)."""
    trainer = Trainer(build_config("mae", "quick", out=str(tmp_path / "run"), knn_k=3, **TINY))
    splits, method = trainer.splits, trainer.method
    feats = {name: extract_features(method.features, splits[name].images, transform=trainer.eval_transform)
             for name in ("train", "test")}

    def direct(k):
        return knn_accuracy(feats["train"], splits["train"].labels, feats["test"], splits["test"].labels, k=k,
                            num_classes=10)

    assert direct(3) != direct(20)  # the default k would give another number
    assert trainer._knn() == direct(3)
    os.makedirs(trainer.out, exist_ok=True)
    assert trainer._final_evaluation()["knn_accuracy"] == direct(3)


# --- linear probe selection -------------------------------------------------------------------------------------

def separable(rows, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (rows,), generator=g)
    features = torch.randn(rows, 6, generator=g)
    features[:, 0] += 4.0 * (2 * labels - 1)  # far apart: val accuracy reaches 1.0 early and stays there
    return features, labels


def test_linear_probe_ties_at_the_top_are_broken_by_val_loss_then_order():
    """Many (lr, epoch) reach val accuracy 1.0: the choice is the lowest val loss among them (then the earliest
    epoch, then the earliest lr; exact ties are checked on scripted curves below); the run is deterministic."""
    (train, train_y), (val, val_y), (test, test_y) = separable(200, 0), separable(80, 1), separable(80, 2)
    lrs = [0.01, 0.1, 1.0]
    result = linear_probe(train, train_y, val, val_y, test, test_y, num_classes=2, epochs=6, lr=lrs, batch_size=32)
    history = result["history"]
    top = [(epoch, head) for head in range(3) for epoch in range(6) if history["val_accuracy"][head][epoch] == 1.0]
    assert len(top) >= 4  # a real tie at the top
    epoch, head = min(top, key=lambda eh: (history["val_loss"][eh[1]][eh[0]], eh[0], eh[1]))
    assert (result["best_epoch"], result["lr"]) == (epoch + 1, lrs[head])
    again = linear_probe(train, train_y, val, val_y, test, test_y, num_classes=2, epochs=6, lr=lrs, batch_size=32)
    assert again == result


def test_linear_probe_tie_rule_on_scripted_val_curves(monkeypatch):
    """The selection rule alone, on val numbers chosen by hand (the probe's own evaluation is replaced):
    equal accuracy -> lower loss; equal accuracy and loss -> earlier epoch, then earlier lr; a non-finite loss is
    never chosen. The test split is evaluated only after every val evaluation, exactly twice."""
    (train, train_y), (val, val_y), (test, test_y) = separable(40, 0), separable(20, 1), separable(20, 2)
    nan = math.nan
    # Per epoch, (accuracy, loss) of heads 0, 1, 2.
    script = [
        [(0.50, 1.0), (0.90, 0.30), (0.95, nan)],   # head 2 has the best accuracy but diverged
        [(0.90, 0.20), (0.90, 0.20), (0.95, nan)],  # lower loss at equal accuracy wins; heads 0 and 1 tie: head 0
        [(0.90, 0.20), (0.80, 0.10), (0.90, 0.25)],  # exact tie with epoch 2 head 0: the earlier epoch stays
    ]
    calls = []

    def scripted(features, labels, mean, var, eps, weight, bias):
        if features is not None and features.shape[0] == test.shape[0] and torch.equal(features, test):
            calls.append("test")
            return torch.tensor([0.0] * weight.shape[0], dtype=torch.float64), torch.zeros(weight.shape[0])
        calls.append("val")
        accuracy, loss = zip(*script[calls.count("val") - 1])
        return torch.tensor(accuracy, dtype=torch.float64), torch.tensor(loss, dtype=torch.float64)

    monkeypatch.setattr(probe_module, "_evaluate", scripted)
    result = linear_probe(train, train_y, val, val_y, test, test_y, num_classes=2, epochs=3,
                          lr=[0.01, 0.03, 0.1], batch_size=8)
    assert (result["best_epoch"], result["lr"], result["val_accuracy"]) == (2, 0.01, 0.90)
    assert calls == ["val"] * 3 + ["test"] * 2


def test_linear_probe_selection_never_depends_on_the_test_split():
    """Two different test splits (one of them constant garbage): the same selection and val curves."""
    (train, train_y), (val, val_y) = separable(200, 3), separable(80, 4)
    noisy = torch.randn(80, 6, generator=torch.Generator().manual_seed(5))
    runs = [linear_probe(train, train_y, val, val_y, test, test_y, num_classes=2, epochs=4, lr=[0.01, 0.3],
                         batch_size=32)
            for test, test_y in ((val, val_y), (noisy * 1e6, torch.zeros(80, dtype=torch.long)))]
    for key in ("best_epoch", "lr", "val_accuracy", "val_accuracy_final_epoch", "history"):
        assert runs[0][key] == runs[1][key], key
    assert runs[0]["test_accuracy"] != runs[1]["test_accuracy"]  # the test split did change


# --- clustering accuracy ----------------------------------------------------------------------------------------

def blobs(sizes, dim=8, seed=0):
    """Tight clusters of the given sizes around orthogonal directions: k-means recovers them exactly."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    return torch.eye(dim)[ids] + 0.01 * torch.randn(len(ids), dim, generator=g), ids


def test_clustering_accuracy_of_a_permuted_labelling_is_one():
    pytest.importorskip("sklearn")
    features, ids = blobs([7, 5, 9, 6])
    labels = torch.tensor([2, 0, 3, 1])[ids]  # the clusters, under other names
    result = clustering_accuracy(features, labels, seed=0)
    assert result["accuracy"] == 1.0 and result["nmi"] == pytest.approx(1.0) and result["num_clusters"] == 4


def test_clustering_accuracy_of_a_hand_computed_confusion():
    """Clusters A, B, C (5 points each) hold labels with counts per class
         A: 3 1 1      one-to-one best: A->0, B->1, C->2 = 3 + 4 + 2 = 9 of 15 = 0.6
         B: 1 4 0      (a many-to-one majority vote would say A->0, B->1, C->0 = 10 / 15: not the protocol)
         C: 3 0 2
    NMI from its definition (arithmetic mean of the entropies) on the same counts."""
    pytest.importorskip("sklearn")
    features, ids = blobs([5, 5, 5], seed=1)
    labels = torch.tensor([0, 0, 0, 1, 2, 1, 1, 1, 1, 0, 2, 2, 0, 0, 0])
    result = clustering_accuracy(features, labels, seed=0)
    assert result["accuracy"] == pytest.approx(9 / 15, abs=1e-12)
    counts = torch.tensor([[3, 1, 1], [1, 4, 0], [3, 0, 2]], dtype=torch.float64)
    joint = counts / counts.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mutual = (joint[nz] * (joint[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum()
    entropy = lambda p: -(p[p > 0] * p[p > 0].log()).sum()  # noqa: E731
    assert result["nmi"] == pytest.approx(float(mutual / ((entropy(pa) + entropy(pb)) / 2)), abs=1e-9)
