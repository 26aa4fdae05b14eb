"""vitfast.data.datasets: digits splits, shapes, the torchvision file layouts (fake files written here),
ImageFolder trees, and the missing / damaged data errors."""
import pickle

import numpy as np
import pytest
import torch

from vitfast.data import (DATASETS, DatasetCorruptedError, DatasetNotFoundError, ImageDataset, dataset_help,
                          load_splits, make_shapes)
from vitfast.data.datasets import _stratified_split


# ------------------------------------------------------------------------------------------------ digits

@pytest.fixture(scope="module")
def digits():
    return load_splits("digits")


def test_digits_shapes_and_sizes(digits):
    train, val, test = digits["train"], digits["val"], digits["test"]
    assert len(train) + len(val) + len(test) == 1797
    assert len(test) == pytest.approx(0.2 * 1797, abs=10)
    assert len(val) == pytest.approx(0.1 * (1797 - len(test)), abs=10)
    for split in (train, val, test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 32, 32)
        assert split.labels.dtype == torch.int64 and split.num_classes == 10
        assert split.mean == train.mean and split.std == train.std
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    assert 0.1 < train.mean[0] < 0.6 and 0.1 < train.std[0] < 0.6


def test_digits_split_is_stratified_disjoint_and_fixed(digits):
    for name in ("train", "val", "test"):
        counts = torch.bincount(digits[name].labels, minlength=10).double()
        share = counts / counts.sum()
        assert (share - 0.1).abs().max() < 0.02, (name, counts)  # digits classes hold 174-183 images each
    # Disjoint: no image appears in two splits (digits has no exact duplicates across these splits).
    flat = {name: {bytes(img.numpy()) for img in digits[name].images} for name in digits}
    assert not flat["train"] & flat["test"] and not flat["train"] & flat["val"] and not flat["val"] & flat["test"]
    again = load_splits("digits", seed=123)  # no split depends on the run's seed
    for name in digits:
        assert torch.equal(again[name].images, digits[name].images)
        assert torch.equal(again[name].labels, digits[name].labels)
    resampled = load_splits("digits", split_seed=1)  # split_seed resamples val, never test
    assert torch.equal(resampled["test"].images, digits["test"].images)
    assert not torch.equal(resampled["val"].images, digits["val"].images)


def test_digits_options():
    splits = load_splits("digits", channels=3, image_size=16, val_fraction=0.0)
    assert splits["train"].images.shape[1:] == (3, 16, 16) and len(splits["val"]) == 0
    assert torch.equal(splits["train"].images[:, 0], splits["train"].images[:, 2])
    assert len(splits["train"].mean) == 3


def test_stratified_split_takes_the_fraction_of_each_class():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    rest, taken = _stratified_split(labels, 0.1, seed=5)
    assert torch.bincount(labels[taken]).tolist() == [5, 3, 2]
    assert sorted(torch.cat([rest, taken]).tolist()) == list(range(100))
    assert torch.equal(_stratified_split(labels, 0.1, seed=5)[1], taken)
    assert not torch.equal(_stratified_split(labels, 0.1, seed=6)[1], taken)


def test_subset_and_validation(digits):
    part = digits["train"].subset([0, 5, 7])
    assert len(part) == 3 and torch.equal(part.images[1], digits["train"].images[5])
    assert part.class_names == digits["train"].class_names
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset("x", torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), 2, ["a", "b"], (0.5,), (0.2,))


# ------------------------------------------------------------------------------------------------ shapes

def test_shapes_deterministic_balanced_and_varied():
    images, labels = make_shapes(200, seed=7)
    again, labels_again = make_shapes(200, seed=7)
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(labels, minlength=10).tolist() == [20] * 10
    other, _ = make_shapes(200, seed=8)
    assert not torch.equal(images, other)
    assert images.float().std() > 30  # colourful, not blank
    # Shapes are visible: every image has pixels far from its median colour.
    deviation = (images.float() - images.float().flatten(2).median(-1).values[..., None, None]).abs().amax((1, 2, 3))
    assert (deviation > 60).float().mean() > 0.95


def test_shapes_splits():
    splits = load_splits("shapes", num_train=300, num_test=100)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (270, 30, 100)
    assert splits["train"].class_names[:3] == ["circle", "square", "triangle"]
    again = load_splits("shapes", num_train=300, num_test=100, seed=1)
    for name in splits:  # the run's seed changes no image of any split
        assert torch.equal(again[name].images, splits[name].images)
    resampled = load_splits("shapes", num_train=300, num_test=100, split_seed=1)
    assert torch.equal(resampled["test"].images, splits["test"].images)
    assert not torch.equal(resampled["val"].images, splits["val"].images)


# ----------------------------------------------------------------------------------- torchvision layouts

def _write_cifar10(root, per_batch=20, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(i % 10) for i in range(per_batch)]
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, handle)
    return folder


def test_cifar10_fake_files(tmp_path):
    folder = _write_cifar10(tmp_path)
    splits = load_splits("cifar10", root=str(tmp_path))
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (90, 10, 20)
    assert splits["train"].images.shape[1:] == (3, 32, 32) and splits["train"].class_names[0] == "class0"
    # Pixel layout: the first test image is row 0 of test_batch reshaped [3, 32, 32] (channel-major).
    with open(folder / "test_batch", "rb") as handle:
        raw = pickle.load(handle)["data"][0]
    assert torch.equal(splits["test"].images[0], torch.from_numpy(raw.reshape(3, 32, 32)))
    # val is carved from train, never from test; the same seed gives the same carve-out.
    train_rows = {bytes(img.numpy()) for img in splits["train"].images}
    assert all(bytes(img.numpy()) not in train_rows for img in splits["val"].images)
    assert torch.equal(load_splits("cifar10", root=str(tmp_path), seed=9)["val"].images, splits["val"].images)
    resized = load_splits("cifar10", root=str(tmp_path), image_size=16, channels=1)
    assert resized["test"].images.shape[1:] == (1, 16, 16)


def test_missing_data_error_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_splits("cifar10", root=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "--download" in message and "--data-root" in message and "data_batch_1" in message


def test_truncated_file_error_names_the_file(tmp_path):
    folder = _write_cifar10(tmp_path)
    damaged = folder / "data_batch_3"
    damaged.write_bytes(damaged.read_bytes()[:500])
    with pytest.raises(DatasetCorruptedError, match="data_batch_3"):
        load_splits("cifar10", root=str(tmp_path))


def test_wrong_array_size_is_reported(tmp_path):
    folder = _write_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]}, handle)
    with pytest.raises(DatasetCorruptedError, match="test_batch"):
        load_splits("cifar10", root=str(tmp_path))


def test_cifar100_fake_files(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, count in (("train", 200), ("test", 50)):
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                         "fine_labels": [i % 100 for i in range(count)],
                         "coarse_labels": [i % 20 for i in range(count)]}, handle)
    splits = load_splits("cifar100", root=str(tmp_path))
    assert splits["train"].num_classes == 100 and len(splits["test"]) == 50
    assert len(splits["val"]) == 0  # 2 images per class: round(0.1 * 2) = 0 per class


def test_svhn_fake_files(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(2)
    for name, count in (("train_32x32.mat", 40), ("test_32x32.mat", 10)):
        scipy_io.savemat(str(tmp_path / name), {"X": rng.integers(0, 256, (32, 32, 3, count), dtype=np.uint8),
                                                "y": (np.arange(count) % 10 + 1).reshape(-1, 1)})
    splits = load_splits("svhn", root=str(tmp_path), val_fraction=0.25)
    assert splits["test"].images.shape == (10, 3, 32, 32)
    assert sorted(splits["test"].labels.tolist()) == list(range(10))  # label 10 means digit 0
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetCorruptedError, match="test_32x32.mat"):
        load_splits("svhn", root=str(tmp_path))


def test_stl10_fake_files(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for split, count in (("train", 20), ("test", 10)):
        images = rng.integers(0, 256, (count, 3, 96, 96), dtype=np.uint8)
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")  # STL-10 stores columns first
        (np.arange(count) % 10 + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
        if split == "test":
            expected = images
    splits = load_splits("stl10", root=str(tmp_path))
    assert torch.equal(splits["test"].images, torch.from_numpy(expected))
    assert splits["test"].labels.tolist() == [i % 10 for i in range(10)]
    assert load_splits("stl10", root=str(tmp_path), image_size=32)["train"].images.shape[1:] == (3, 32, 32)
    (folder / "test_X.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(DatasetCorruptedError, match="test_X.bin"):
        load_splits("stl10", root=str(tmp_path))


def test_download_is_never_implicit(tmp_path, monkeypatch):
    import vitfast.data.datasets as datasets
    calls = []
    monkeypatch.setattr(datasets, "_download", lambda *args: calls.append(args))
    with pytest.raises(DatasetNotFoundError):
        load_splits("cifar10", root=str(tmp_path))
    assert calls == []
    with pytest.raises(DatasetNotFoundError):  # the fake download fetched nothing
        load_splits("cifar10", root=str(tmp_path), download=True)
    assert calls and calls[0][0] == "cifar10"


# ------------------------------------------------------------------------------------------ imagefolder

def _write_png_tree(root, classes=("cat", "dog", "eel"), per_class=6, size=(12, 10)):
    from PIL import Image
    rng = np.random.default_rng(4)
    for split, count in (("train", per_class), ("test", 2)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_imagefolder(tmp_path):
    _write_png_tree(tmp_path)
    splits = load_splits(f"imagefolder:{tmp_path}", val_fraction=1 / 6)
    assert splits["train"].class_names == ["cat", "dog", "eel"]
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (15, 3, 6)
    assert splits["test"].images.shape[1:] == (3, 10, 12)
    assert load_splits("imagefolder", root=str(tmp_path), image_size=8)["train"].images.shape[1:] == (3, 8, 8)


def test_imagefolder_tiny_imagenet_layout(tmp_path):
    from PIL import Image
    for wnid in ("n01", "n02"):
        folder = tmp_path / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{wnid}_{i}.JPEG")
    (tmp_path / "val" / "images").mkdir(parents=True)
    lines = []
    for i, wnid in enumerate(("n02", "n01", "n02")):
        Image.new("RGB", (8, 8), (0, i * 40, 0)).save(tmp_path / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t8\t8")
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    splits = load_splits(f"imagefolder:{tmp_path}", val_fraction=0.25)
    assert splits["test"].labels.tolist() == [1, 0, 1]
    assert (len(splits["train"]), len(splits["val"])) == (6, 2)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train"):
        load_splits(f"imagefolder:{tmp_path}")
    _write_png_tree(tmp_path, per_class=2)
    (tmp_path / "test" / "dog" / "0.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetCorruptedError, match="0.png"):
        load_splits(f"imagefolder:{tmp_path}")


def test_names_and_help():
    assert set(DATASETS) >= {"digits", "shapes", "cifar10", "cifar100", "svhn", "stl10", "imagefolder"}
    assert "digits" in dataset_help() and "--download" in dataset_help()
    with pytest.raises(ValueError, match="unknown dataset"):
        load_splits("mnist")
    with pytest.raises(ValueError, match="cannot be downloaded"):
        load_splits("digits", download=True)
