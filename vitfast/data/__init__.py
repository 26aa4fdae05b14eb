"""Data: in-memory uint8 datasets with fixed splits, batched on-device augmentation, a resumable loader.

    splits = load_splits("digits")                                  # {"train", "val", "test"} ImageDatasets
    loader = BatchLoader(splits["train"], 128, seed=0, device=device)
    views = augment.simclr_views(32, splits["train"].mean, splits["train"].std)
    for images, labels, indices in loader:
        x1, x2 = views(images, generator)                           # generator on the same device

Batch regularisers of the supervised recipe (mixup/cutmix, random erasing, AutoAugment): ``regularizers``.
"""
from . import augment
from .augment import Augment, MultiView
from .datasets import (DATASETS, DatasetCorruptedError, DatasetInfo, DatasetNotFoundError, ImageDataset, SHAPE_NAMES,
                       dataset_help, default_root, load_splits, make_shapes)
from .loader import BatchLoader, epoch_permutation
from .regularizers import autoaugment, mix_batch, random_erasing

__all__ = [
    "augment", "Augment", "MultiView",
    "ImageDataset", "DatasetInfo", "DATASETS", "load_splits", "dataset_help", "default_root", "make_shapes",
    "SHAPE_NAMES", "DatasetNotFoundError", "DatasetCorruptedError",
    "BatchLoader", "epoch_permutation",
    "mix_batch", "random_erasing", "autoaugment",
]
