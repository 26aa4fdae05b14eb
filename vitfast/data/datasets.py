"""Datasets as in-memory uint8 tensors, with fixed train / val / test splits.

    splits = load_splits("digits")                       # embedded, no download
    train = splits["train"]                              # ImageDataset: images uint8 [N, C, H, W], labels int64 [N]
    splits = load_splits("cifar10", root="~/data", download=True)

Names (``DATASETS`` holds their sizes and sources; ``dataset_help()`` formats them for ``--help``):

- ``digits`` (default): scikit-learn's 1,797 real 8×8 handwritten digits (shipped inside the
  scikit-learn package, values 0..16), scaled to 0..255 and upsampled **bilinearly** to 32×32, **one
  channel** (``channels=3`` replicates it). Bilinear and not nearest: nearest makes every 4×4 patch of a
  patch-4 ViT a constant, so MAE's per-patch-normalised target would be all zeros. The split is a
  stratified 20 % test set drawn with a fixed seed, then ``val_fraction`` of the rest as val (below);
  with the default 0.1: 1,295 train / 143 val / 359 test.
- ``shapes``: procedural coloured shapes (10 classes) on textured backgrounds, 32×32×3, generated
  vectorised with torch (``make_shapes``). The training pool and the test set come from two fixed seeds;
  sizes with ``num_train`` / ``num_test``.
- ``cifar10``, ``cifar100``, ``svhn``, ``stl10``: the official train and test sets. The files are read
  by vitfast itself (CIFAR pickles, SVHN .mat, STL-10 binaries: the layouts torchvision downloads), so
  a missing or damaged file gives an error naming that file; torchvision is only needed to download
  (``download=True``, never implicit). STL-10: the 5,000 labelled training and 8,000 test images at
  96 px (the 100,000 unlabelled images are not loaded); ``image_size`` resizes at load.
- ``imagefolder:/path``: ``/path/train/<class>/**/*.{png,jpg,...}`` (Tiny-ImageNet's nested
  ``images/`` folders included) and a labelled test set taken from the first of ``test/<class>/``,
  ``val/<class>/``, ``valid/<class>/`` or Tiny-ImageNet's ``val/images`` + ``val/val_annotations.txt``.
  Decoded with PIL into RGB uint8; ``image_size`` resizes (shorter side, then centre crop).

Validation is always carved from the training pool (never from the test set), stratified per class,
``val_fraction`` of each class, with a fixed generator seed (``split_seed``, 0). No split depends on the
run's ``seed``: runs with different seeds train, select and test on the same images, so their numbers
are comparable. ``mean`` / ``std`` (per channel, in [0, 1] units) are those of the training pool and
are shared by the three splits.
"""
from __future__ import annotations

import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..config import UserError

__all__ = [
    "ImageDataset", "DatasetInfo", "DATASETS", "load_splits", "dataset_help", "default_root",
    "make_shapes", "SHAPE_NAMES", "DatasetNotFoundError", "DatasetCorruptedError",
]

# Splits and generated data never depend on the run's seed (see the module docstring).
_FIXED_SPLIT_SEED = 0
_SHAPES_TRAIN_SEED = 1_000_003
_SHAPES_TEST_SEED = 2_000_003
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where we looked; the message says where and how to get them."""


class DatasetCorruptedError(RuntimeError):
    """A dataset file exists but cannot be read; the message names the file."""


@dataclass
class ImageDataset:
    """An in-memory labelled image set: ``images`` uint8 [N, C, H, W], ``labels`` int64 [N]."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: List[str]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"{self.name}: images must be uint8 [N, C, H, W], got "
                             f"{str(self.images.dtype).replace('torch.', '')} {list(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"{self.name}: labels must be int64 [{self.images.shape[0]}], got "
                             f"{str(self.labels.dtype).replace('torch.', '')} {list(self.labels.shape)}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"{self.name}: mean and std need {self.channels} values, got {self.mean}, {self.std}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        """Side of the (square) images; for non-square images, the height."""
        return int(self.images.shape[2])

    def subset(self, indices) -> "ImageDataset":
        """The images at ``indices`` (a sequence or int64 tensor), same classes and normalisation."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return replace(self, images=self.images[indices], labels=self.labels[indices])


@dataclass(frozen=True)
class DatasetInfo:
    image_size: Optional[int]        # native side in pixels (None: depends on the files)
    channels: int
    num_classes: Optional[int]
    source: str
    download: bool                   # whether download=True can fetch it


DATASETS: Dict[str, DatasetInfo] = {
    "digits": DatasetInfo(32, 1, 10, "scikit-learn load_digits: 1,797 real 8x8 digits, upsampled; embedded", False),
    "shapes": DatasetInfo(32, 3, 10, "procedural coloured shapes on textured backgrounds; generated", False),
    "cifar10": DatasetInfo(32, 3, 10, "CIFAR-10, 50k train / 10k test (Krizhevsky 2009)", True),
    "cifar100": DatasetInfo(32, 3, 100, "CIFAR-100 fine labels, 50k train / 10k test (Krizhevsky 2009)", True),
    "svhn": DatasetInfo(32, 3, 10, "SVHN cropped digits, 73k train / 26k test (Netzer et al. 2011)", True),
    "stl10": DatasetInfo(96, 3, 10, "STL-10 labelled, 5k train / 8k test at 96 px (Coates et al. 2011)", True),
    "imagefolder": DatasetInfo(None, 3, None, "imagefolder:/path: path/train/<class>/*, path/{test,val}/... "
                                              "(Tiny-ImageNet, CINIC-10 layouts)", False),
}

SHAPE_NAMES = ["circle", "square", "triangle", "cross", "star", "ring", "diamond", "hexagon", "ellipse", "crescent"]
_CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_STL10_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def dataset_help() -> str:
    """One line per dataset, for the training script's --help."""
    lines = []
    for name, info in DATASETS.items():
        size = f"{info.image_size}px" if info.image_size else "any size"
        classes = f"{info.num_classes} classes" if info.num_classes else "classes from folders"
        lines.append(f"{name}: {size}, {info.channels} ch, {classes}; {info.source}"
                     + ("; needs --download once" if info.download else ""))
    return "\n".join(lines)


def default_root() -> str:
    """Where downloadable datasets live when no root is given: $VITFAST_DATA, else ~/.cache/vitfast/data."""
    return os.path.expanduser(os.environ.get("VITFAST_DATA", "~/.cache/vitfast/data"))


def load_splits(
    name: str,
    root: Optional[str] = None,
    download: bool = False,
    seed: int = 0,
    val_fraction: float = 0.1,
    *,
    image_size: Optional[int] = None,
    channels: Optional[int] = None,
    num_train: Optional[int] = None,
    num_test: Optional[int] = None,
    split_seed: int = 0,
) -> Dict[str, ImageDataset]:
    """Train / val / test ``ImageDataset``s of dataset ``name`` (see the module docstring).

    root: folder of the downloadable datasets (default ``default_root()``); for ``imagefolder`` the
        dataset folder itself when the name carries no path.
    download: fetch a missing torchvision dataset into ``root`` (never done otherwise).
    seed: the run's seed. Accepted so that callers can pass it, but no split depends on it (runs with
        different seeds are compared on the same val and test images); see ``split_seed``.
    val_fraction: share of each class of the training pool that goes to val (0 = empty val).
    image_size: resize every image to this side at load (default: the native size; digits: 32).
    channels: 3 replicates a grey dataset to RGB, 1 converts RGB to grey (ITU-R 601 luma).
    num_train, num_test: sizes of the procedural ``shapes`` training pool and test set (10,000 / 2,000).
    split_seed: seed of the stratified val carve-out (default 0); change it only to resample val on purpose.
    """
    del seed  # no split depends on the run's seed (module docstring)
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if channels not in (None, 1, 3):
        raise UserError(f"channels must be 1, 3 or None, got {channels}")
    key, _, path = name.partition(":")
    key = key.lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; available: {sorted(DATASETS)} (imagefolder as imagefolder:/path)")
    if (num_train is not None or num_test is not None) and key != "shapes":
        raise UserError(f"num_train / num_test apply to the procedural 'shapes' dataset only, not {key!r}")
    if download and not DATASETS[key].download:
        raise UserError(f"{key!r} cannot be downloaded: " + ("it is embedded or generated" if key != "imagefolder"
                         else "point imagefolder:/path at a folder you prepared"))

    if key == "digits":
        pool, test, class_names = _load_digits(image_size or 32)
    else:
        if key == "shapes":
            size = image_size or 32
            pool = make_shapes(10_000 if num_train is None else num_train, _SHAPES_TRAIN_SEED, size)
            test = make_shapes(2_000 if num_test is None else num_test, _SHAPES_TEST_SEED, size)
            class_names = list(SHAPE_NAMES)
        elif key == "imagefolder":
            folder = path or root
            if not folder:
                raise UserError("imagefolder needs a folder: --dataset imagefolder:/path (or --data-root /path)")
            pool, test, class_names = _load_imagefolder(Path(os.path.expanduser(folder)), image_size)
        else:
            base = Path(os.path.expanduser(root or default_root()))
            pool, test, class_names = _load_torchvision_layout(key, base, download)
        if image_size is not None and key not in ("shapes", "imagefolder"):
            pool, test = (_resize(pool[0], image_size), pool[1]), (_resize(test[0], image_size), test[1])
    train_idx, val_idx = _stratified_split(pool[1], val_fraction, split_seed)

    if channels is not None:
        pool, test = (_to_channels(pool[0], channels), pool[1]), (_to_channels(test[0], channels), test[1])
    mean, std = _channel_stats(pool[0])
    dataset_name = "imagefolder" if key == "imagefolder" else key
    make = lambda images, labels: ImageDataset(dataset_name, images, labels, len(class_names), list(class_names),
                                               mean, std)
    return {
        "train": make(pool[0][train_idx], pool[1][train_idx]),
        "val": make(pool[0][val_idx], pool[1][val_idx]),
        "test": make(*test),
    }


# ----------------------------------------------------------------------------------------------- splits

def _stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rest, taken): ``round(fraction * n_c)`` random indices of each class c are taken; both sorted."""
    generator = torch.Generator().manual_seed(seed)
    taken = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        count = int(round(fraction * len(members)))
        taken.append(members[torch.randperm(len(members), generator=generator)[:count]])
    taken = torch.sort(torch.cat(taken)).values if taken else torch.zeros(0, dtype=torch.int64)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[taken] = False
    return torch.nonzero(keep).flatten(), taken


def _channel_stats(images: torch.Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, accumulated in float64 over chunks (no full float copy)."""
    if images.shape[0] == 0:
        return (0.5,) * images.shape[1], (0.25,) * images.shape[1]
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, images.shape[0], 4096):
        chunk = images[start:start + 4096].double() / 255.0
        total += chunk.sum((0, 2, 3))
        squares += chunk.square().sum((0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, C, h, w] -> uint8 [N, C, size, size], bilinear with antialiasing (downscaling), in chunks."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.uint8)
    for start in range(0, images.shape[0], 2048):
        chunk = images[start:start + 2048].float()
        out[start:start + 2048] = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False,
                                                antialias=True).round_().clamp_(0, 255).to(torch.uint8)
    return out


def _to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------- digits

def _load_digits(size: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from error
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1) * (255.0 / 16.0)  # [1797, 1, 8, 8]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.round_().clamp_(0, 255).to(torch.uint8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    rest, test = _stratified_split(labels, 0.2, _FIXED_SPLIT_SEED)
    return (images[rest], labels[rest]), (images[test], labels[test]), [str(d) for d in range(10)]


# ----------------------------------------------------------------------------------------------- shapes

def _regular_polygon(r, a, sides: int, circumradius: float):
    sector = 2 * np.pi / sides
    offset = torch.remainder(a + sector / 2, sector) - sector / 2  # angle to the nearest edge normal
    return r * torch.cos(offset) <= circumradius * np.cos(np.pi / sides)


def _shape_mask(kind: int, u, v):
    """Inside-mask of class ``kind`` in shape coordinates (u, v), about [-1, 1] wide."""
    if kind == 1:
        return torch.maximum(u.abs(), v.abs()) <= 0.75
    if kind == 3:
        return ((u.abs() <= 0.28) & (v.abs() <= 0.95)) | ((v.abs() <= 0.28) & (u.abs() <= 0.95))
    if kind == 6:
        return u.abs() / 0.55 + v.abs() / 0.95 <= 1.0
    if kind == 8:
        return (u / 0.95).square() + (v / 0.5).square() <= 1.0
    r2 = u * u + v * v
    if kind == 0:
        return r2 <= 0.81
    if kind == 5:
        return (r2 >= 0.25) & (r2 <= 0.81)
    if kind == 9:
        return (r2 <= 0.81) & ((u - 0.4).square() + v.square() > 0.49)
    r, a = r2.sqrt(), torch.atan2(v, u)
    if kind == 4:
        tooth = (2 * torch.remainder(a * (5 / (2 * np.pi)), 1.0) - 1).abs()  # 1 at the 5 tips, 0 between them
        return r <= 0.38 + 0.62 * tooth
    return _regular_polygon(r, a, 3, 1.1) if kind == 2 else _regular_polygon(r, a, 6, 0.92)


def make_shapes(num_images: int, seed: int, image_size: int = 32, device="cpu", *, supersample: int = 2,
                chunk: int = 512) -> Tuple[torch.Tensor, torch.Tensor]:
    """Procedural shapes: (images uint8 [num_images, 3, S, S], labels int64), classes exactly balanced.

    Per image: one of ``SHAPE_NAMES`` with random centre, radius (18-38 % of the side), rotation and
    colour, on a background that is smooth noise, a linear gradient or stripes between two nearby
    colours, plus light pixel noise. The shape colour is dark on light backgrounds and light on dark
    ones, so every shape stays visible. Edges are anti-aliased by ``supersample``² sub-pixel averaging.
    Deterministic for a given (seed, image_size, device type, supersample, chunk); vectorised over chunks.
    """
    generator = torch.Generator(device).manual_seed(seed)
    labels = (torch.arange(num_images, device=device) % len(SHAPE_NAMES))
    labels = labels[torch.randperm(num_images, generator=generator, device=device)]
    images = torch.empty(num_images, 3, image_size, image_size, dtype=torch.uint8, device=device)
    for start in range(0, num_images, chunk):
        part = labels[start:start + chunk]
        images[start:start + chunk] = _draw_shapes(part, image_size, supersample, generator)
    return images, labels


def _draw_shapes(labels, size: int, supersample: int, generator) -> torch.Tensor:
    device, count = labels.device, labels.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=device)
    fine = size * supersample
    grid = (torch.arange(fine, device=device, dtype=torch.float32) + 0.5) / supersample  # pixel units
    y, x = grid.view(1, fine, 1), grid.view(1, 1, fine)

    radius = (0.18 + 0.20 * rand(count)) * size
    margin = 0.8 * radius
    cx = margin + rand(count) * (size - 2 * margin)
    cy = margin + rand(count) * (size - 2 * margin)
    theta = rand(count) * 2 * np.pi
    col = lambda t: t.view(-1, 1, 1)
    # Images are drawn class by class on contiguous slices of the label-sorted chunk (no masked copies).
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=len(SHAPE_NAMES)).tolist()
    inside = torch.empty(count, fine, fine, dtype=torch.bool, device=device)
    start = 0
    for kind, n in enumerate(counts):
        ids = order[start:start + n]
        dx, dy = x - col(cx[ids]), y - col(cy[ids])
        cos, sin = col(torch.cos(theta[ids]) / radius[ids]), col(torch.sin(theta[ids]) / radius[ids])
        inside[start:start + n] = _shape_mask(kind, dx * cos + dy * sin, dy * cos - dx * sin)
        start += n
    inside = inside[torch.argsort(order)]
    alpha = F.avg_pool2d(inside.unsqueeze(1).float(), supersample)  # [n, 1, S, S]

    # Background: a weight w in [0, 1] per pixel between two nearby colours.
    py = (torch.arange(size, device=device, dtype=torch.float32) + 0.5).view(1, size, 1)
    px = py.view(1, 1, size)
    phi = col(rand(count) * 2 * np.pi)
    along = (px * torch.cos(phi) + py * torch.sin(phi)) / size  # in about [-1.5, 1.5]
    gradient = (along - along.amin((1, 2), keepdim=True)) / (along.amax((1, 2), keepdim=True)
                                                             - along.amin((1, 2), keepdim=True)).clamp_min(1e-6)
    period = col(3 + 5 * rand(count)) / size
    stripes = 0.5 + 0.5 * torch.sin(2 * np.pi * along / period + col(rand(count) * 2 * np.pi))
    blobs = F.interpolate(rand(count, 1, 5, 5), size=(size, size), mode="bicubic", align_corners=False)
    blobs = blobs.squeeze(1).clamp(0, 1)
    texture = (rand(count) * 3).long().view(-1, 1, 1)
    w = torch.where(texture == 0, blobs, torch.where(texture == 1, gradient, stripes)).unsqueeze(1)
    base = rand(count, 3)
    other = (base + (rand(count, 3) - 0.5) * 0.5).clamp(0, 1)
    background = base.view(-1, 3, 1, 1) + (other - base).view(-1, 3, 1, 1) * w
    light = (base.mean(1, keepdim=True) > 0.5)
    foreground = torch.where(light, rand(count, 3) * 0.4, 0.6 + rand(count, 3) * 0.4).view(-1, 3, 1, 1)
    image = background * (1 - alpha) + foreground * alpha
    image = image + 0.02 * torch.randn(image.shape, generator=generator, device=device)
    return (image * 255).round_().clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------- torchvision layouts

# Per dataset: the folder under root that torchvision creates, the files that must be there, and the
# torchvision class used to download them.
_LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "CIFAR10"),
    "cifar100": ("cifar-100-python", ["train", "test"], "CIFAR100"),
    "svhn": ("", ["train_32x32.mat", "test_32x32.mat"], "SVHN"),
    "stl10": ("stl10_binary", ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"], "STL10"),
}


def _missing_error(key: str, folder: Path, missing: Sequence[str], root: Path) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{key}: no data at {folder} (missing {', '.join(missing)}). Download it once with "
        f"`python train.py --dataset {key} --download --data-root {root}` (load_splits(..., download=True)), "
        f"or pass --data-root pointing at the folder that holds "
        f"{_LAYOUTS[key][0] + '/' if _LAYOUTS[key][0] else 'the files'}. "
        f"Default root: $VITFAST_DATA or ~/.cache/vitfast/data.")


def _load_torchvision_layout(key: str, root: Path, download: bool):
    subdir, files, tv_class = _LAYOUTS[key]
    folder = root / subdir if subdir else root
    missing = [f for f in files if not (folder / f).is_file()]
    if missing and download:
        _download(key, tv_class, root)
        missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise _missing_error(key, folder, missing, root)
    loader = {"cifar10": _read_cifar10, "cifar100": _read_cifar100, "svhn": _read_svhn, "stl10": _read_stl10}[key]
    return loader(folder)


def _download(key: str, tv_class: str, root: Path) -> None:
    try:
        import torchvision.datasets as tvd
    except ImportError as error:
        raise ImportError(f"downloading {key} needs torchvision: pip install torchvision") from error
    root.mkdir(parents=True, exist_ok=True)
    cls = getattr(tvd, tv_class)
    try:
        if key in ("svhn", "stl10"):
            for split in ("train", "test"):
                cls(str(root), split=split, download=True)
        else:
            for train in (True, False):
                cls(str(root), train=train, download=True)
    except (OSError, RuntimeError) as error:  # no network, refused, truncated or a failed checksum
        urls = [getattr(cls, "url", None)] + [entry[0] for entry in getattr(cls, "split_list", {}).values()]
        where = ", ".join(u for u in urls if u) or f"torchvision.datasets.{tv_class}"
        subdir = _LAYOUTS[key][0]
        raise DatasetNotFoundError(
            f"downloading {key} failed ({type(error).__name__}: {error}); fetch {where} by hand and unpack it into "
            f"{root / subdir if subdir else root}") from error


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="latin1")  # the CIFAR pickles were written by Python 2
    except Exception as error:  # truncated or foreign file: EOFError, UnpicklingError, ValueError, ...
        raise DatasetCorruptedError(f"cannot read {path}: {type(error).__name__}: {error}. The file is damaged or "
                                    f"incomplete; delete it and download again (--download).") from error


def _cifar_arrays(path: Path, label_key: str) -> Tuple[torch.Tensor, torch.Tensor]:
    entry = _unpickle(path)
    try:
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry[label_key], dtype=np.int64)
        images = data.reshape(len(labels), 3, 32, 32)
    except Exception as error:
        raise DatasetCorruptedError(f"{path} does not hold CIFAR data ('data' of [N, 3072] uint8 and "
                                    f"'{label_key}' of [N]): {type(error).__name__}: {error}") from error
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


def _read_cifar10(folder: Path):
    parts = [_cifar_arrays(folder / f"data_batch_{i}", "labels") for i in range(1, 6)]
    train = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    test = _cifar_arrays(folder / "test_batch", "labels")
    names = list(_CIFAR10_NAMES)
    if (folder / "batches.meta").is_file():
        names = list(_unpickle(folder / "batches.meta").get("label_names", names))
    return train, test, names


def _read_cifar100(folder: Path):
    train = _cifar_arrays(folder / "train", "fine_labels")
    test = _cifar_arrays(folder / "test", "fine_labels")
    names = [str(i) for i in range(100)]
    if (folder / "meta").is_file():
        names = list(_unpickle(folder / "meta").get("fine_label_names", names))
    return train, test, names


def _read_svhn(folder: Path):
    try:
        from scipy.io import loadmat
    except ImportError as error:
        raise ImportError("reading SVHN's .mat files needs scipy: pip install scipy") from error

    def read(path: Path):
        try:
            mat = loadmat(str(path))
            images = np.transpose(mat["X"], (3, 2, 0, 1)).astype(np.uint8)  # [32, 32, 3, N] -> [N, 3, 32, 32]
            labels = mat["y"].astype(np.int64).reshape(-1) % 10             # SVHN labels the digit 0 as 10
            if images.shape[0] != labels.shape[0] or images.shape[1:] != (3, 32, 32):
                raise ValueError(f"X {list(mat['X'].shape)} and y {list(mat['y'].shape)} do not match")
        except Exception as error:
            raise DatasetCorruptedError(f"cannot read {path}: {type(error).__name__}: {error}. Delete it and "
                                        f"download again (--download).") from error
        return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)

    return read(folder / "train_32x32.mat"), read(folder / "test_32x32.mat"), [str(d) for d in range(10)]


def _read_stl10(folder: Path):
    def read(split: str):
        x_path, y_path = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
        labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1  # stored 1..10
        raw = np.fromfile(x_path, dtype=np.uint8)
        if raw.size != labels.size * 3 * 96 * 96 or labels.size == 0:
            bad = x_path if labels.size else y_path
            raise DatasetCorruptedError(f"{bad} is damaged or incomplete: {raw.size} image bytes for {labels.size} "
                                        f"labels in {y_path} (expected {labels.size} x 3 x 96 x 96). Delete it and "
                                        f"download again (--download).")
        images = raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)  # stored column-major per channel
        return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)

    names = list(_STL10_NAMES)
    if (folder / "class_names.txt").is_file():
        names = [line.strip() for line in (folder / "class_names.txt").read_text().splitlines() if line.strip()]
    return read("train"), read("test"), names


# ------------------------------------------------------------------------------------------ imagefolder

def _class_folders(split_dir: Path) -> List[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir()) if split_dir.is_dir() else []


def _image_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_EXTENSIONS and p.is_file())


def _load_imagefolder(root: Path, image_size: Optional[int]):
    train_dir = root / "train"
    classes = _class_folders(train_dir)
    if not classes:
        raise DatasetNotFoundError(
            f"imagefolder: no class folders in {train_dir}. Expected {root}/train/<class>/*.png|jpg and a labelled "
            f"{root}/test/<class>/ (or val/<class>/, valid/<class>/, or Tiny-ImageNet's val/images + "
            f"val/val_annotations.txt); pass the folder as --dataset imagefolder:/path.")
    names = [c.name for c in classes]
    index = {name: i for i, name in enumerate(names)}
    train_files = [(f, index[c.name]) for c in classes for f in _image_files(c)]

    test_files, looked = None, []
    for split in ("test", "val", "valid"):
        split_dir = root / split
        looked.append(str(split_dir))
        annotations = split_dir / "val_annotations.txt"
        if annotations.is_file():  # Tiny-ImageNet: val/images/<file> with "<file>\t<wnid>\t..." lines
            test_files = []
            for line in annotations.read_text().splitlines():
                fields = line.split("\t")
                if len(fields) >= 2 and fields[1] in index:
                    test_files.append((split_dir / "images" / fields[0], index[fields[1]]))
            break
        folders = [c for c in _class_folders(split_dir) if c.name in index]
        if folders:
            test_files = [(f, index[c.name]) for c in folders for f in _image_files(c)]
            break
    if not test_files:
        raise DatasetNotFoundError(f"imagefolder: no labelled test set under {root} (looked at {', '.join(looked)} "
                                   f"for <class>/ folders named like those of train/, and for val_annotations.txt)")
    train = _decode_images(train_files, image_size)
    test = _decode_images(test_files, image_size)
    return train, test, names


def _decode_one(path: Path, image_size: Optional[int]) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image_size is not None and image.size != (image_size, image_size):
                scale = image_size / min(image.size)
                width = max(image_size, round(image.width * scale))
                height = max(image_size, round(image.height * scale))
                image = image.resize((width, height), Image.BILINEAR, reducing_gap=None)
                left, top = (width - image_size) // 2, (height - image_size) // 2
                image = image.crop((left, top, left + image_size, top + image_size))
            return np.asarray(image, dtype=np.uint8)
    except FileNotFoundError as error:
        raise DatasetNotFoundError(f"imagefolder: {path} is listed but missing") from error
    except Exception as error:
        raise DatasetCorruptedError(f"cannot decode image {path}: {type(error).__name__}: {error}") from error


def _decode_images(files: Sequence[Tuple[Path, int]], image_size: Optional[int]):
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
        arrays = list(pool.map(lambda item: _decode_one(item[0], image_size), files))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserError(f"imagefolder: images of different sizes {sorted(shapes)[:4]}...; pass image_size "
                         f"(--image-size) to resize them at load")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return images, labels
