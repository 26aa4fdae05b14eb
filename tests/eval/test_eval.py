"""vitfast.eval: k-NN, linear probe, clustering accuracy and feature extraction (docs/methods.md §8)."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vitfast.eval import (clustering_accuracy, evaluate_representation, extract_features, knn_accuracy, knn_classify,
                          linear_probe, matched_accuracy)
from vitfast.eval.linear_probe import LR_WITHOUT_VAL


def gaussian_clusters(per_class, num_classes=5, dim=16, spread=0.05, seed=0):
    """Well-separated clusters around random unit directions; labels in class order, then shuffled."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    order = torch.randperm(len(labels), generator=g)
    return features[order], labels[order]


def knn_brute_force(train, train_labels, query, k, temperature, num_classes):
    """The docs/methods.md §8.1 k-NN written as literal loops, in float64."""
    predictions, all_votes = [], []
    for q in query.double():
        sims = []
        for j, t in enumerate(train.double()):
            sims.append((float(q @ t / (q.norm() * t.norm())), j))
        sims.sort(key=lambda pair: -pair[0])
        votes = [0.0] * num_classes
        for sim, j in sims[:k]:
            votes[int(train_labels[j])] += math.exp(sim / temperature)
        predictions.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
        all_votes.append(votes)
    return torch.tensor(predictions), torch.tensor(all_votes, dtype=torch.float64)


# --- k-NN -------------------------------------------------------------------------------------------------------

def test_knn_separable_clusters_are_perfect():
    train, train_y = gaussian_clusters(40, seed=0)
    test, test_y = gaussian_clusters(20, seed=0)  # same centres (same seed), fresh noise below
    test = test + 0.05 * torch.randn(test.shape, generator=torch.Generator().manual_seed(1))
    assert knn_accuracy(train, train_y, test, test_y) >= 0.99


def test_knn_random_labels_is_chance():
    g = torch.Generator().manual_seed(0)
    num_classes = 10
    train, test = torch.randn(2000, 32, generator=g), torch.randn(1000, 32, generator=g)
    train_y = torch.randint(0, num_classes, (2000,), generator=g)
    test_y = torch.randint(0, num_classes, (1000,), generator=g)
    accuracy = knn_accuracy(train, train_y, test, test_y, num_classes=num_classes)
    assert abs(accuracy - 1 / num_classes) < 0.04  # 4 standard deviations of a binomial(1000, 0.1) rate


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.07), (7, 0.5)])
def test_knn_matches_brute_force(k, temperature, assert_close):
    g = torch.Generator().manual_seed(k)
    train, query = torch.randn(40, 6, generator=g) * 3, torch.randn(15, 6, generator=g)
    train_y = torch.randint(0, 4, (40,), generator=g)
    predictions, votes = knn_classify(train, train_y, query, k=k, temperature=temperature, num_classes=4)
    expected_predictions, expected_votes = knn_brute_force(train, train_y, query, k, temperature, 4)
    assert torch.equal(predictions, expected_predictions)
    # Votes are scaled per row (nearest neighbour weighs 1): compare the normalised vote distributions.
    assert_close(votes.double() / votes.double().sum(1, keepdim=True),
                 expected_votes / expected_votes.sum(1, keepdim=True), torch.float32, "votes")


def test_knn_small_temperature_does_not_overflow():
    train, train_y = gaussian_clusters(30, seed=3)
    predictions, votes = knn_classify(train, train_y, train, k=10, temperature=1e-3)
    assert torch.isfinite(votes).all()
    assert torch.equal(predictions, train_y)  # each point's nearest neighbour is itself


def test_knn_chunking_is_invisible(assert_close):
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 12, generator=g), torch.randn(101, 12, generator=g)
    train_y, test_y = torch.randint(0, 7, (300,), generator=g), torch.randint(0, 7, (101,), generator=g)
    whole_predictions, whole_votes = knn_classify(train, train_y, test, num_classes=7, batch_size=4096)
    for batch_size in (1, 7, 100):
        predictions, votes = knn_classify(train, train_y, test, num_classes=7, batch_size=batch_size)
        assert torch.equal(predictions, whole_predictions)
        # Chunks change the matmul's blocking, so similarities may differ in the last float32 bit.
        assert_close(votes, whole_votes, torch.float32, f"votes, batch_size={batch_size}")
        assert knn_accuracy(train, train_y, test, test_y, batch_size=batch_size) == \
            knn_accuracy(train, train_y, test, test_y, batch_size=4096)


def test_knn_clamps_k_to_the_bank_size():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(30, 8, generator=g), torch.randn(20, 8, generator=g)
    train_y, test_y = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (20,), generator=g)
    clamped = knn_classify(train, train_y, test, k=1000, num_classes=3)
    exact = knn_classify(train, train_y, test, k=30, num_classes=3)
    assert torch.equal(clamped[0], exact[0]) and torch.equal(clamped[1], exact[1])
    assert knn_accuracy(train, train_y, test, test_y, k=1000) == knn_accuracy(train, train_y, test, test_y, k=30)


@pytest.mark.parametrize("case,pattern", [
    ("empty_train", "train_features must be a non-empty"),
    ("empty_test", "test_features must be a non-empty"),
    ("length_mismatch", "train_labels must be"),
    ("dim_mismatch", "test_features must be"),
    ("label_out_of_range", "test_labels must be .* values in \\[0, 3\\)"),
    ("negative_label", "train_labels must hold class ids >= 0"),
    ("float_labels", "train_labels must be int64"),
    ("nan_features", "train_features contains NaN"),
    ("bad_k", "k must be a positive int"),
    ("bad_temperature", "temperature must be > 0"),
])
def test_knn_rejects_bad_inputs(case, pattern):
    train, train_y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    test, test_y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    kwargs = {"num_classes": 3}
    if case == "empty_train":
        train, train_y = train[:0], train_y[:0]
    elif case == "empty_test":
        test, test_y = test[:0], test_y[:0]
    elif case == "length_mismatch":
        train_y = train_y[:9]
    elif case == "dim_mismatch":
        test = torch.randn(5, 6)
    elif case == "label_out_of_range":
        test_y = torch.tensor([0, 1, 2, 3, 0])
    elif case == "negative_label":
        train_y[0], kwargs = -1, {}
    elif case == "float_labels":
        train_y = train_y.float()
    elif case == "nan_features":
        train[3, 1] = float("nan")
    elif case == "bad_k":
        kwargs["k"] = 0
    elif case == "bad_temperature":
        kwargs["temperature"] = 0.0
    with pytest.raises(ValueError, match=pattern):
        knn_accuracy(train, train_y, test, test_y, **kwargs)


# --- linear probe -----------------------------------------------------------------------------------------------

def linearly_separable(rows, dim=10, num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    features = torch.randn(rows, dim, generator=g) * 2.0 + 5.0  # offset and scale: the BN must undo them
    labels = (features @ directions.T).argmax(1)
    return features, labels


def test_linear_probe_learns_separable_data():
    (a, ay), (b, by), (c, cy) = (linearly_separable(n, seed=s) for n, s in ((600, 0), (200, 1), (400, 2)))
    result = linear_probe(a, ay, b, by, c, cy, num_classes=3, epochs=15, batch_size=64)
    assert result["test_accuracy"] >= 0.95 and result["val_accuracy"] >= 0.95
    assert result["test_accuracy_best_val_epoch"] >= 0.95
    assert result["lr"] in result["history"]["lr"] and 1 <= result["best_epoch"] <= 15


def noisy_binary(rows, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (rows,), generator=g)
    features = torch.randn(rows, 20, generator=g)
    features[:, 0] += 0.6 * (2 * labels - 1)  # overlapping classes: the val curve moves from epoch to epoch
    return features, labels


def test_linear_probe_selects_on_val_never_on_test():
    (train, train_y), (val, val_y) = noisy_binary(300, 0), noisy_binary(200, 1)
    # The test split is the val split with flipped labels: every model's test accuracy is 1 - its val
    # accuracy, so selecting on test would pick the epoch with the *worst* val accuracy.
    test, test_y = val, 1 - val_y
    result = linear_probe(train, train_y, val, val_y, test, test_y, num_classes=2, epochs=12,
                          lr=[0.001, 0.01], batch_size=32)
    curves = result["history"]["val_accuracy"]
    flat = [(accuracy, -loss, -epoch, -head)
            for head, (accs, losses) in enumerate(zip(curves, result["history"]["val_loss"]))
            for epoch, (accuracy, loss) in enumerate(zip(accs, losses), start=1)]
    assert max(f[0] for f in flat) > min(f[0] for f in flat) + 0.02  # the selection has something to choose
    accuracy, _, epoch, head = max(flat)
    assert result["val_accuracy"] == accuracy
    assert result["best_epoch"] == -epoch and result["lr"] == [0.001, 0.01][-head]
    assert result["test_accuracy_best_val_epoch"] == pytest.approx(1 - result["val_accuracy"], abs=1e-9)
    assert result["val_accuracy_final_epoch"] == curves[-head][-1]
    # The headline is the final epoch of the selected lr, not the selected epoch.
    assert result["test_accuracy"] == pytest.approx(1 - curves[-head][-1], abs=1e-9)
    assert "test" not in str(sorted(result["history"]))  # no test curve is recorded


def test_linear_probe_is_deterministic_and_grid_heads_are_independent(assert_close):
    (a, ay), (b, by) = noisy_binary(200, 3), noisy_binary(100, 4)
    grid = linear_probe(a, ay, b, by, b, by, num_classes=2, epochs=4, lr=[0.01, 0.1, 0.5], batch_size=32, seed=7)
    again = linear_probe(a, ay, b, by, b, by, num_classes=2, epochs=4, lr=[0.01, 0.1, 0.5], batch_size=32, seed=7)
    assert grid == again
    # A head of the grid is exactly the probe its lr alone would train (shared BN and shuffle order).
    alone = linear_probe(a, ay, b, by, b, by, num_classes=2, epochs=4, lr=0.1, batch_size=32, seed=7)
    assert_close(torch.tensor(alone["history"]["val_loss"][0]), torch.tensor(grid["history"]["val_loss"][1]),
                 torch.float32, "val_loss")
    assert alone["history"]["val_accuracy"][0] == grid["history"]["val_accuracy"][1]


def test_linear_probe_without_val_trains_one_lr_and_reports_its_final_epoch():
    (a, ay), (c, cy) = linearly_separable(300, seed=0), linearly_separable(200, seed=2)
    empty = torch.zeros(0, a.shape[1])
    result = linear_probe(a, ay, empty, torch.zeros(0, dtype=torch.long), c, cy, num_classes=3, epochs=8,
                          batch_size=64)
    assert result["lr"] == LR_WITHOUT_VAL and result["test_accuracy"] >= 0.9
    assert result["val_accuracy"] is None and result["best_epoch"] is None
    assert len(result["history"]["train_loss"][0]) == 8 and result["history"]["val_accuracy"] == [[]]
    # The same lr trained with a val split gives the same final-epoch test accuracy (val only selects).
    with_val = linear_probe(a, ay, c, cy, c, cy, num_classes=3, epochs=8, batch_size=64, lr=LR_WITHOUT_VAL)
    assert with_val["test_accuracy"] == result["test_accuracy"]
    with pytest.raises(ValueError, match="nothing to select"):
        linear_probe(a, ay, empty, torch.zeros(0, dtype=torch.long), c, cy, num_classes=3, epochs=1, lr=[0.1, 1.0])


def test_linear_probe_tolerates_a_last_batch_of_one_row():
    (a, ay), (b, by) = linearly_separable(65, seed=0), linearly_separable(30, seed=1)
    result = linear_probe(a, ay, b, by, b, by, num_classes=3, epochs=2, batch_size=32, lr=0.1)
    assert 0.0 <= result["test_accuracy"] <= 1.0


@pytest.mark.parametrize("case,pattern", [
    ("label_out_of_range", "val_labels must be .* values in \\[0, 3\\)"),
    ("length_mismatch", "test_labels must be"),
    ("empty_val_with_a_grid", "without a val split there is nothing to select"),
    ("dim_mismatch", "test_features must be"),
    ("bad_lr", "lr must be None, a positive float"),
])
def test_linear_probe_rejects_bad_inputs(case, pattern):
    (a, ay), (b, by), (c, cy) = (linearly_separable(n, seed=s) for n, s in ((20, 0), (10, 1), (10, 2)))
    kwargs = {"num_classes": 3, "epochs": 1}
    if case == "label_out_of_range":
        by = by.clone()
        by[0] = 3
    elif case == "length_mismatch":
        cy = cy[:5]
    elif case == "empty_val_with_a_grid":
        b, by = b[:0], by[:0]
        kwargs["lr"] = [0.1, 0.3]
    elif case == "dim_mismatch":
        c = torch.randn(10, 4)
    elif case == "bad_lr":
        kwargs["lr"] = -0.1
    with pytest.raises(ValueError, match=pattern):
        linear_probe(a, ay, b, by, c, cy, **kwargs)


# --- clustering -------------------------------------------------------------------------------------------------

def test_matched_accuracy_known_value_and_permutation_invariance():
    clusters = torch.tensor([0, 0, 1, 1, 1, 2])
    labels = torch.tensor([1, 1, 0, 0, 1, 2])
    assert matched_accuracy(clusters, labels) == pytest.approx(5 / 6)
    cluster_permutation, label_permutation = torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])
    assert matched_accuracy(cluster_permutation[clusters], labels) == pytest.approx(5 / 6)
    assert matched_accuracy(clusters, label_permutation[labels]) == pytest.approx(5 / 6)
    # More clusters than classes: the unmatched cluster counts as wrong.
    assert matched_accuracy(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.5)


def test_clustering_is_perfect_on_separated_clusters_and_label_permutation_invariant():
    pytest.importorskip("sklearn")
    features, labels = gaussian_clusters(30, num_classes=6, spread=0.02, seed=5)
    result = clustering_accuracy(features, labels, seed=0)
    assert result["accuracy"] == 1.0 and result["nmi"] == pytest.approx(1.0)
    assert result["num_clusters"] == 6
    permuted = clustering_accuracy(features, torch.tensor([3, 5, 0, 1, 4, 2])[labels], seed=0)
    assert permuted["accuracy"] == result["accuracy"] and permuted["nmi"] == pytest.approx(result["nmi"])


def test_clustering_overlapping_clusters_is_permutation_invariant():
    pytest.importorskip("sklearn")
    features, labels = gaussian_clusters(40, num_classes=4, spread=0.6, seed=1)
    result = clustering_accuracy(features, labels, seed=0, n_init=3)
    assert 0.25 <= result["accuracy"] < 1.0
    permuted = clustering_accuracy(features, torch.tensor([2, 0, 3, 1])[labels], seed=0, n_init=3)
    assert permuted["accuracy"] == result["accuracy"] and permuted["nmi"] == pytest.approx(result["nmi"])


def test_clustering_rejects_bad_inputs():
    with pytest.raises(ValueError, match="labels must be"):
        clustering_accuracy(torch.randn(10, 3), torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="features must be a non-empty"):
        clustering_accuracy(torch.randn(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="num_clusters must be"):
        clustering_accuracy(torch.randn(4, 3), torch.arange(4), num_clusters=5)


# --- feature extraction -----------------------------------------------------------------------------------------

class DropoutEncoder(nn.Module):
    """Features that change from call to call in train mode (dropout) and record grad mode."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 4, 8)
        self.drop = nn.Dropout(0.5)
        self.grad_enabled = []

    def forward(self, x):
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.drop(self.proj(x.flatten(1)))

    def features(self, x):
        return self(x)


def normalise(images):
    return images.float() / 255.0


def test_extract_features_shapes_dtype_order_and_eval_mode():
    torch.manual_seed(0)
    model = DropoutEncoder().train()
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    first = extract_features(model, images, transform=normalise, batch_size=3)
    second = extract_features(model.features, images, transform=normalise, batch_size=4)  # a bound method
    third = extract_features(lambda x: model(x), images, transform=normalise, batch_size=10, model=model)
    assert first.shape == (10, 8) and first.dtype == torch.float32 and first.device.type == "cpu"
    assert not first.requires_grad and not any(model.grad_enabled)
    with torch.no_grad():
        expected = model.eval()(normalise(images))  # dropout off, in the original order
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    torch.testing.assert_close(third, expected)
    model.train()
    extract_features(model, images, transform=normalise)
    assert model.training and model.drop.training  # the caller's mode is restored


def test_extract_features_rejects_bad_inputs():
    model = DropoutEncoder()
    with pytest.raises(ValueError, match="images_uint8 must be uint8"):
        extract_features(model, torch.rand(2, 3, 4, 4), transform=normalise)
    with pytest.raises(ValueError, match="at least one image"):
        extract_features(model, torch.zeros(0, 3, 4, 4, dtype=torch.uint8), transform=normalise)
    with pytest.raises(ValueError, match="encode must return features"):
        extract_features(lambda x: x, torch.zeros(2, 3, 4, 4, dtype=torch.uint8), transform=normalise)


def test_evaluate_representation_end_to_end():
    pytest.importorskip("sklearn")

    def split(per_class, seed):
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(3).repeat_interleave(per_class)
        images = torch.randint(0, 60, (len(labels), 3, 4, 4), generator=g, dtype=torch.uint8)
        images[:, 0] += (labels * 90).to(torch.uint8)[:, None, None]  # the class is in channel 0's brightness
        return SimpleNamespace(images=images, labels=labels, num_classes=3)

    encoder = nn.Flatten()
    splits = {"train": split(20, 0), "val": split(10, 1), "test": split(10, 2)}
    result = evaluate_representation(encoder, splits, transform=lambda x: x.float() / 255 - 0.5, device="cpu",
                                     probe_epochs=30)
    assert result["knn_accuracy"] >= 0.9 and result["knn_val_accuracy"] >= 0.9
    assert result["linear_probe"]["test_accuracy"] >= 0.9
    assert set(result["clustering"]) == {"accuracy", "nmi", "num_clusters"}
    only_knn = evaluate_representation(encoder, {"train": splits["train"], "test": splits["test"]},
                                       transform=lambda x: x.float(), device="cpu", which=("knn",))
    assert set(only_knn) == {"knn_accuracy"}
    assert set(evaluate_representation(encoder, splits, transform=lambda x: x.float(), device="cpu",
                                       which=("knn",))) == {"knn_accuracy"}  # val is not encoded for k-NN alone
    with pytest.raises(ValueError, match="needs the splits \\['val'\\]"):
        evaluate_representation(encoder, {"train": splits["train"], "test": splits["test"]},
                                transform=lambda x: x.float(), device="cpu", which=("linear",))
