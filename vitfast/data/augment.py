"""Batched augmentation on the training device, with per-sample random parameters.

    views = augment.simclr_views(32, mean, std)           # a MultiView: 2 views of the SimCLR/SupCon recipe
    x1, x2 = views(images_uint8, generator)               # each float32 [B, C, 32, 32], normalised
    x = augment.eval_transform(32, mean, std)(images)     # deterministic: resize if needed + normalise

Every function takes float images ``[B, C, H, W]`` in [0, 1] (``to_float`` converts uint8), on any
device, and draws its per-sample parameters from ``generator`` (a ``torch.Generator`` on the images'
device; ``None`` uses torch's global generator, not reproducible). Nothing loops over samples:
crops are gathers or one ``grid_sample``, blur is one grouped convolution, colour ops are elementwise.
The same generator state gives the same output; the probability arguments ``p`` are per sample
(``p=0`` returns the input unchanged, bit for bit; ``p=1`` always applies).

Semantics follow torchvision's transforms applied to each image on its own:
- ``random_resized_crop``: torchvision's box sampler (10 tries of area in ``scale``·H·W and log-uniform
  aspect in ``ratio``, integer boxes, centre-crop fallback); resizing is bilinear (MAE and DINO use
  bicubic on PIL images) and, when a crop shrinks, anti-aliased by averaging f×f bilinear samples per
  output pixel, with f = ceil(largest possible shrink factor) fixed per call (no host sync).
- ``color_jitter``: factors uniform in [max(0, 1 − a), 1 + a] (hue: shift uniform in [−h, h]),
  brightness / contrast / saturation as blends clamped to [0, 1] after each op, contrast around the
  image's mean grey value, hue by an HSV round trip. ``random_order=True`` (default, torchvision's
  ColorJitter) draws the order of the four ops per sample: each of the four stages evaluates
  brightness, contrast and saturation on the whole batch (identity factor where another op is due)
  and the hue round trip on the samples due for it (on accelerators: on all, kept where due, to avoid
  a host sync); about 2× the cost of ``random_order=False`` on CPU, which applies brightness,
  contrast, saturation, hue in that fixed order. On one-channel images saturation and hue are
  no-ops, as in torchvision.
- ``grayscale``: ITU-R 601 luma (0.299, 0.587, 0.114) copied to every channel (keeps C).
- ``gaussian_blur``: sigma per sample uniform in ``sigma``; kernel side 10 % of the image side, odd,
  at least 3 (SimCLR's rule; torchvision GaussianBlur semantics, reflect padding). DINO blurs with PIL,
  whose Gaussian is not truncated: ``dino_multicrop`` passes a 2·ceil(3·sigma_max)+1 kernel for that.
- ``solarize``: pixels >= ``threshold`` become 1 − x (torchvision / PIL).
- ``patch_jitter``: RelViT's per-patch augmentation (docs/methods.md §2.1), patches reshaped into a batch.

Pipelines are data: ``Augment`` holds a list of ``(step name, parameters)`` and the normalisation;
``MultiView`` holds several pipelines and how many views each produces. The presets at the bottom
carry the numbers of docs/methods.md with their sections.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "to_float", "resize", "random_resized_crop", "resized_crop_boxes", "crop_resize", "random_crop",
    "horizontal_flip", "color_jitter", "grayscale", "gaussian_blur", "solarize", "normalize", "patch_jitter",
    "STEPS", "Step", "Augment", "MultiView",
    "supervised_train", "mae_pretrain", "simclr_views", "supcon_views", "dino_multicrop", "relvit_upstream",
    "eval_transform",
]

Size = Union[int, Tuple[int, int]]
LUMA = (0.299, 0.587, 0.114)


def _pair(size: Size) -> Tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _check_images(images: Tensor, name: str) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = f"{str(images.dtype).replace('torch.', '')} {list(images.shape)}" if isinstance(images, Tensor) \
            else type(images).__name__
        raise ValueError(f"vitfast.data.augment.{name}: images must be float [B, C, H, W] in [0, 1] "
                         f"(to_float converts uint8), got {got}")


def _rand(generator: Optional[torch.Generator], shape, device) -> Tensor:
    if generator is not None and generator.device.type != torch.device(device).type:
        raise ValueError(f"vitfast.data.augment: the generator is on {generator.device} but the images are on "
                         f"{device}; create it with torch.Generator(device=images.device)")
    return torch.rand(shape, generator=generator, device=device)


def _bcast(values: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, 1]"""
    return values.view(-1, 1, 1, 1)


def to_float(images: Tensor) -> Tensor:
    """uint8 [B, C, H, W] -> float32 in [0, 1]; floating input is returned as it is."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise ValueError(f"vitfast.data.augment.to_float: images must be uint8 or float, got {images.dtype}")
    return images


def resize(images: Tensor, size: Size, *, generator=None) -> Tensor:
    """Bilinear resize to ``size`` (anti-aliased when shrinking); the input itself when already that size."""
    _check_images(images, "resize")
    size = _pair(size)
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


# ------------------------------------------------------------------------------------------------- crops

def crop_resize(images: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor, size: Size,
                *, antialias: bool = True) -> Tensor:
    """Per-sample boxes (pixel units, [B] each) cropped and resized to ``size`` in one ``grid_sample``.

    Output pixel i of a box samples the input at pixel coordinate top + (i + ½)·height/out − ½, clamped
    to the box's first and last pixel centres: exactly ``F.interpolate(crop, size, mode="bilinear",
    align_corners=False)`` of the cropped box (torchvision's resized_crop without antialias). With
    ``antialias``, f×f sub-pixel samples are averaged, f = ceil(max(H/out_h, W/out_w)) clipped to [1, 4]:
    fixed from the shapes, so no host sync.
    """
    out_h, out_w = _pair(size)
    batch, _, in_h, in_w = images.shape
    factor = min(4, max(1, math.ceil(max(in_h / out_h, in_w / out_w)))) if antialias else 1
    device, dtype = images.device, images.dtype

    def coordinates(start, extent, out, full):  # -> grid_sample coordinates [B, out·f] in [-1, 1]
        steps = (torch.arange(out * factor, device=device, dtype=dtype) + 0.5) / (out * factor)
        start, extent = start.to(dtype).view(-1, 1), extent.to(dtype).view(-1, 1)
        pixel = torch.maximum(torch.minimum(start + steps.view(1, -1) * extent - 0.5, start + extent - 1), start)
        return (2 * pixel + 1) / full - 1

    x = coordinates(left, width, out_w, in_w)
    y = coordinates(top, height, out_h, in_h)
    grid = torch.stack(torch.broadcast_tensors(x.view(batch, 1, -1), y.view(batch, -1, 1)), dim=-1)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.avg_pool2d(out, factor) if factor > 1 else out


def resized_crop_boxes(batch: int, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), *,
                       generator=None, device="cpu") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision RandomResizedCrop.get_params for a batch: int64 (top, left, box height, box width), each [B].

    Ten candidate boxes per sample (area uniform in scale·H·W, log-uniform aspect w/h in ratio, rounded);
    the first that fits wins; a sample with none gets the centre crop of the whole image with the aspect
    clamped into ``ratio``.
    """
    tries = 10
    u = _rand(generator, (batch, tries * 2 + 2), device)
    area = height * width * (scale[0] + u[:, :tries] * (scale[1] - scale[0]))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + u[:, tries:2 * tries] * (log_hi - log_lo))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(fits.to(torch.uint8), dim=1, keepdim=True)  # index of the first fitting try
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    found = fits.any(dim=1)
    w = torch.where(found, w, torch.full_like(w, fallback_w)).long()
    h = torch.where(found, h, torch.full_like(h, fallback_h)).long()
    top = torch.minimum(torch.floor(u[:, -2] * (height - h + 1)).long(), height - h)
    left = torch.minimum(torch.floor(u[:, -1] * (width - w + 1)).long(), width - w)
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return top, left, h, w


def random_resized_crop(images: Tensor, size: Size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), *,
                        generator=None, antialias: bool = True) -> Tensor:
    """Per-sample random-resized crop to ``size`` (torchvision's box sampler, bilinear resize)."""
    _check_images(images, "random_resized_crop")
    batch, _, height, width = images.shape
    top, left, h, w = resized_crop_boxes(batch, height, width, scale, ratio, generator=generator,
                                         device=images.device)
    return crop_resize(images, top, left, h, w, size, antialias=antialias)


def random_crop(images: Tensor, size: Size, padding: int = 4, *, generator=None, fill: float = 0.0) -> Tensor:
    """Zero-pad by ``padding`` on every side, then a per-sample random ``size`` window (gathers, exact copies)."""
    _check_images(images, "random_crop")
    out_h, out_w = _pair(size)
    padded = F.pad(images, (padding,) * 4, value=fill) if padding else images
    batch, channels, pad_h, pad_w = padded.shape
    if out_h > pad_h or out_w > pad_w:
        raise ValueError(f"vitfast.data.augment.random_crop: size {(out_h, out_w)} is larger than the padded "
                         f"images {(pad_h, pad_w)}")
    u = _rand(generator, (batch, 2), images.device)
    top = torch.floor(u[:, 0] * (pad_h - out_h + 1)).long().clamp_max(pad_h - out_h)
    left = torch.floor(u[:, 1] * (pad_w - out_w + 1)).long().clamp_max(pad_w - out_w)
    rows = (top.view(-1, 1) + torch.arange(out_h, device=images.device)).view(batch, 1, out_h, 1)
    cols = (left.view(-1, 1) + torch.arange(out_w, device=images.device)).view(batch, 1, 1, out_w)
    out = padded.gather(2, rows.expand(batch, channels, out_h, pad_w))
    return out.gather(3, cols.expand(batch, channels, out_h, out_w))


def horizontal_flip(images: Tensor, p: float = 0.5, *, generator=None) -> Tensor:
    _check_images(images, "horizontal_flip")
    flip = _rand(generator, (images.shape[0],), images.device) < p
    return torch.where(_bcast(flip), images.flip(-1), images)


# ------------------------------------------------------------------------------------------------ colour

def _grey(images: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, 1, H, W] luma (the image itself when C == 1)."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """factor·images + (1 − factor)·other, clamped (factor 1 gives the images back exactly)."""
    factor = _bcast(factor).to(images.dtype)
    return (factor * images + (1 - factor) * other).clamp_(0, 1)


def _rgb_to_hsv(images: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    r, g, b = images.unbind(1)
    value, _ = images.max(1)
    chroma = value - images.min(1).values
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-12), torch.zeros_like(value))
    safe = chroma.clamp_min(1e-12)
    hue = torch.where(value == r, torch.remainder((g - b) / safe, 6.0),
                      torch.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = torch.where(chroma > 0, hue / 6.0, torch.zeros_like(hue))
    return hue, saturation, value


def _hsv_to_rgb(hue: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    # Channel n in (5, 3, 1) for (R, G, B): v − v·s·clamp(min(k, 4 − k), 0, 1) with k = (n + 6h) mod 6.
    n = torch.tensor([5.0, 3.0, 1.0], device=hue.device, dtype=hue.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * hue.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return value.unsqueeze(1) - (value * saturation).unsqueeze(1) * ramp


def _adjust_hue(images: Tensor, shift: Tensor) -> Tensor:
    hue, saturation, value = _rgb_to_hsv(images)
    hue = torch.remainder(hue + shift.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(hue, saturation, value)


def color_jitter(images: Tensor, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 hue: float = 0.1, p: float = 0.8, *, generator=None, random_order: bool = True) -> Tensor:
    """torchvision ColorJitter per sample, applied with probability ``p`` (RandomApply)."""
    _check_images(images, "color_jitter")
    if not 0 <= hue <= 0.5:
        raise ValueError(f"vitfast.data.augment.color_jitter: hue must be in [0, 0.5], got {hue}")
    batch, channels = images.shape[:2]
    u = _rand(generator, (batch, 9), images.device)
    apply = u[:, 0] < p
    factor = lambda amount, col: torch.where(
        apply, max(0.0, 1 - amount) + u[:, col] * (1 + amount - max(0.0, 1 - amount)), torch.ones_like(u[:, col]))
    factors = [factor(brightness, 1), factor(contrast, 2), factor(saturation, 3)]
    shift = (hue * (2 * u[:, 4] - 1)).to(images.dtype)
    order = torch.argsort(u[:, 5:9], dim=1) if random_order else None  # order[b, stage] = op index
    enabled = [brightness > 0, contrast > 0, saturation > 0 and channels == 3, hue > 0 and channels == 3]

    out = images
    for stage in range(4):
        for op in range(4):
            if not enabled[op] or (order is None and op != stage):
                continue
            here = apply if order is None else apply & (order[:, stage] == op)
            if op < 3:  # identity factor 1 where the op is not applied at this stage: exact
                f = torch.where(here, factors[op], torch.ones_like(factors[op]))
                if op == 0:
                    out = _blend(out, torch.zeros_like(out[:, :1]), f)
                elif op == 1:
                    out = _blend(out, _grey(out).mean((2, 3), keepdim=True), f)
                else:
                    out = _blend(out, _grey(out), f)
            else:
                out = _hue_where(out, here, shift, compact=out.device.type == "cpu")
    return out


def _hue_where(images: Tensor, here: Tensor, shift: Tensor, compact: bool) -> Tensor:
    """Hue shift on the samples where ``here``; the others unchanged.

    compact: run the costly HSV round trip on the selected rows only (``nonzero``: a host sync, free on
    CPU); otherwise on every row, kept where selected (no sync: accelerators). Same values either way.
    """
    if not compact:
        return torch.where(_bcast(here), _adjust_hue(images, shift).clamp_(0, 1), images)
    rows = torch.nonzero(here).flatten()
    if rows.numel() == 0:
        return images
    hued = _adjust_hue(images.index_select(0, rows), shift.index_select(0, rows)).clamp_(0, 1)
    return images.index_copy(0, rows, hued)


def grayscale(images: Tensor, p: float = 0.2, *, generator=None) -> Tensor:
    """With probability ``p`` per sample, every channel becomes the luma (C is kept)."""
    _check_images(images, "grayscale")
    apply = _rand(generator, (images.shape[0],), images.device) < p
    if images.shape[1] == 1:
        return images
    return torch.where(_bcast(apply), _grey(images).expand_as(images), images)


def _default_kernel_size(height: int, width: int) -> int:
    side = int(round(0.1 * max(height, width)))
    return max(3, side + 1 - side % 2)


def gaussian_blur(images: Tensor, p: float = 0.5, sigma=(0.1, 2.0), kernel_size: Optional[int] = None, *,
                  generator=None) -> Tensor:
    """With probability ``p`` per sample, a separable Gaussian blur with sigma ~ U(sigma), reflect padding.

    kernel_size: odd; default 10 % of the image side (SimCLR), at least 3, at most 2·side − 1 (reflect
    padding needs pad < side).
    """
    _check_images(images, "gaussian_blur")
    batch, channels, height, width = images.shape
    u = _rand(generator, (batch, 2), images.device)
    apply = u[:, 0] < p
    size = _default_kernel_size(height, width) if kernel_size is None else int(kernel_size)
    if size % 2 == 0 or size < 1:
        raise ValueError(f"vitfast.data.augment.gaussian_blur: kernel_size must be odd and positive, got {size}")
    size = min(size, 2 * min(height, width) - 1)
    sigmas = sigma[0] + u[:, 1] * (sigma[1] - sigma[0])
    offsets = torch.arange(size, device=images.device, dtype=images.dtype) - size // 2
    kernel = torch.exp(-offsets.square().view(1, -1) / (2 * sigmas.to(images.dtype).square().view(-1, 1)))
    kernel = kernel / kernel.sum(1, keepdim=True)                      # [B, K]
    kernel = kernel.repeat_interleave(channels, dim=0)                 # [B·C, K]: one filter per (sample, channel)
    pad = size // 2
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), kernel.view(-1, 1, size, 1), groups=batch * channels)
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kernel.view(-1, 1, 1, size), groups=batch * channels)
    return torch.where(_bcast(apply), flat.view_as(images), images)


def solarize(images: Tensor, p: float = 0.2, threshold: float = 0.5, *, generator=None) -> Tensor:
    """With probability ``p`` per sample, pixels >= ``threshold`` become 1 − x."""
    _check_images(images, "solarize")
    apply = _rand(generator, (images.shape[0],), images.device) < p
    return torch.where(_bcast(apply) & (images >= threshold), 1.0 - images, images)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float], *, generator=None) -> Tensor:
    """(x − mean) / std per channel."""
    _check_images(images, "normalize")
    channels = images.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"vitfast.data.augment.normalize: mean and std need {channels} values for images "
                         f"{list(images.shape)}, got mean {tuple(mean)} and std {tuple(std)}")
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def patch_jitter(images: Tensor, patch_size: int, crop_size: Optional[int] = None,
                 jitter=(0.4, 0.4, 0.4, 0.1), jitter_p: float = 0.8, gray_p: float = 0.2, *,
                 generator=None) -> Tensor:
    """RelViT's anti-shortcut augmentation (docs/methods.md §2.1), every patch on its own.

    Each p×p patch gets a random crop of ``crop_size`` = round(p / 1.15) pixels resized back to p
    (bilinear), colour jitter ``jitter`` with probability ``jitter_p`` and grayscale with probability
    ``gray_p``; the patches are reshaped into one batch [B·N, C, p, p], so this is one call of each op.
    """
    _check_images(images, "patch_jitter")
    batch, channels, height, width = images.shape
    p = int(patch_size)
    if height % p or width % p:
        raise ValueError(f"vitfast.data.augment.patch_jitter: image size {(height, width)} is not a multiple of "
                         f"patch_size {p}")
    crop = int(round(p / 1.15)) if crop_size is None else int(crop_size)
    rows, cols = height // p, width // p
    patches = images.reshape(batch, channels, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(batch * rows * cols, channels, p, p)
    count = patches.shape[0]
    u = _rand(generator, (count, 2), images.device)
    top = torch.floor(u[:, 0] * (p - crop + 1)).clamp_max(p - crop)
    left = torch.floor(u[:, 1] * (p - crop + 1)).clamp_max(p - crop)
    side = torch.full_like(top, crop)
    patches = crop_resize(patches, top, left, side, side, p, antialias=False)
    patches = color_jitter(patches, *jitter, p=jitter_p, generator=generator)
    patches = grayscale(patches, p=gray_p, generator=generator)
    patches = patches.reshape(batch, rows, cols, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, channels, height, width)


STEPS = {
    "resize": resize,
    "random_resized_crop": random_resized_crop,
    "random_crop": random_crop,
    "horizontal_flip": horizontal_flip,
    "color_jitter": color_jitter,
    "grayscale": grayscale,
    "gaussian_blur": gaussian_blur,
    "solarize": solarize,
    "patch_jitter": patch_jitter,
}


# ------------------------------------------------------------------------------------------------ pipelines

@dataclass
class Step:
    name: str
    params: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in STEPS:
            raise ValueError(f"unknown augmentation step {self.name!r}; available: {sorted(STEPS)}")


class Augment:
    """A pipeline as data: ``steps`` in order on float images, then ``normalize(mean, std)`` if given.

        pipeline = Augment([("random_crop", dict(size=32, padding=4)), ("horizontal_flip", dict(p=0.5))],
                           mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
        x = pipeline(images_uint8, generator)   # float32 [B, C, 32, 32]
    """

    def __init__(self, steps: Sequence[Union[Step, Tuple[str, Dict[str, Any]]]] = (),
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None, name: str = ""):
        self.steps = [s if isinstance(s, Step) else Step(s[0], dict(s[1])) for s in steps]
        if (mean is None) != (std is None):
            raise ValueError("Augment: give both mean and std, or neither")
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)
        self.name = name

    def __call__(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        x = to_float(images)
        for step in self.steps:
            x = STEPS[step.name](x, **step.params, generator=generator)
        if self.mean is not None:
            x = normalize(x, self.mean, self.std)
        return x

    def output_size(self, input_size: Tuple[int, int]) -> Tuple[int, int]:
        """(H, W) of the output for inputs of ``input_size``."""
        size = tuple(input_size)
        for step in self.steps:
            if "size" in step.params and step.name != "patch_jitter":
                size = _pair(step.params["size"])
        return size

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "steps": [{"name": s.name, **s.params} for s in self.steps],
                "mean": self.mean, "std": self.std}

    def __repr__(self) -> str:
        steps = ", ".join(f"{s.name}({', '.join(f'{k}={v}' for k, v in s.params.items())})" for s in self.steps)
        norm = f", normalize(mean={self.mean}, std={self.std})" if self.mean is not None else ""
        return f"Augment({self.name or 'pipeline'}: {steps}{norm})"


class MultiView:
    """Several views of one batch: ``pipelines[i]`` produces ``repeats[i]`` views (a list, in order).

    Views of one pipeline are computed in a single call on the batch repeated ``repeats[i]`` times, so
    DINO's 8 local crops are one vectorised call over 8·B samples (each with its own parameters).
    """

    def __init__(self, pipelines: Sequence[Augment], repeats: Optional[Sequence[int]] = None, name: str = ""):
        self.pipelines = list(pipelines)
        self.repeats = [1] * len(self.pipelines) if repeats is None else [int(r) for r in repeats]
        if len(self.repeats) != len(self.pipelines) or min(self.repeats, default=1) < 1:
            raise ValueError(f"MultiView: one repeat count >= 1 per pipeline, got {self.repeats}")
        self.name = name

    def __len__(self) -> int:
        return sum(self.repeats)

    def __call__(self, images: Tensor, generator: Optional[torch.Generator] = None) -> List[Tensor]:
        x = to_float(images)
        views: List[Tensor] = []
        for pipeline, count in zip(self.pipelines, self.repeats):
            out = pipeline(x.repeat(count, 1, 1, 1) if count > 1 else x, generator)
            views.extend(out.chunk(count) if count > 1 else [out])
        return views

    def view_sizes(self, input_size: Tuple[int, int]) -> List[Tuple[int, int]]:
        return [p.output_size(input_size) for p, r in zip(self.pipelines, self.repeats) for _ in range(r)]

    def to_dict(self) -> Dict[str, Any]:
        views = [dict(p.to_dict(), repeats=r) for p, r in zip(self.pipelines, self.repeats)]
        return {"name": self.name, "views": views}

    def __repr__(self) -> str:
        return f"MultiView({self.name}: " + "; ".join(f"{r}x {p!r}" for p, r in zip(self.pipelines, self.repeats)) + ")"


# ------------------------------------------------------------------------------------------------ presets

def _padding_for(size: int) -> int:
    return max(1, int(round(size / 8)))  # CIFAR's 4 px at 32 px, scaled with the side


def supervised_train(size: int, mean=None, std=None, *, padding: Optional[int] = None) -> Augment:
    """Random crop with zero padding (4 px at 32 px, size/8 otherwise) + horizontal flip.

    The CIFAR recipe of He et al. 2016 (ResNet, Sec. 4.2), also RelViT's image-level augmentation
    (docs/methods.md §2.1). Inputs of another size are resized to ``size`` first.
    """
    padding = _padding_for(size) if padding is None else padding
    return Augment([("resize", dict(size=size)), ("random_crop", dict(size=size, padding=padding)),
                    ("horizontal_flip", dict(p=0.5))], mean, std, name="supervised_train")


def mae_pretrain(size: int, mean=None, std=None, *, scale=(0.2, 1.0)) -> Augment:
    """MAE pre-training (docs/methods.md §1.4, He et al. 2021): random-resized crop scale (0.2, 1) + flip only."""
    return Augment([("random_resized_crop", dict(size=size, scale=tuple(scale), ratio=(3 / 4, 4 / 3))),
                    ("horizontal_flip", dict(p=0.5))], mean, std, name="mae_pretrain")


def _contrastive_view(size, mean, std, scale, jitter, jitter_p, gray_p, name) -> Augment:
    return Augment([("random_resized_crop", dict(size=size, scale=tuple(scale), ratio=(3 / 4, 4 / 3))),
                    ("horizontal_flip", dict(p=0.5)),
                    ("color_jitter", dict(brightness=jitter[0], contrast=jitter[1], saturation=jitter[2],
                                          hue=jitter[3], p=jitter_p)),
                    ("grayscale", dict(p=gray_p))], mean, std, name=name)


def simclr_views(size: int, mean=None, std=None, *, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1),
                 jitter_p: float = 0.8, gray_p: float = 0.2, views: int = 2) -> MultiView:
    """Two views of the contrastive recipe used by LaCViT (docs/methods.md §4.2): random-resized crop (0.2, 1),
    flip, colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2. (SimCLR's ImageNet recipe,
    Chen et al. 2020 App. A, uses scale (0.08, 1), jitter strength 0.8 and blur; the small-image numbers
    of §4 are the ones vitfast trains with.)"""
    view = _contrastive_view(size, mean, std, scale, jitter, jitter_p, gray_p, "simclr_view")
    return MultiView([view], [views], name="simclr_views")


def supcon_views(size: int, mean=None, std=None, **kwargs) -> MultiView:
    """LaCViT stage 1's two SupCon views (docs/methods.md §4.2); the same numbers as ``simclr_views``."""
    views = simclr_views(size, mean, std, **kwargs)
    views.name = "supcon_views"
    return views


# docs/methods.md §5.1 (Gani et al. 2022) crop numbers by global crop size; other sizes: DINO's ImageNet
# defaults (Caron et al. 2021: 224 / 96 px, scales (0.4, 1) / (0.05, 0.4)), local side 96/224 of the global.
_DINO_CROPS = {32: (16, (0.7, 1.0), (0.2, 0.5)), 64: (32, (0.5, 1.0), (0.2, 0.4))}


def dino_multicrop(global_size: int, mean=None, std=None, *, local_size: Optional[int] = None, n_local: int = 8,
                   global_scale=None, local_scale=None, jitter=(0.4, 0.4, 0.2, 0.1), sigma=(0.1, 2.0)) -> MultiView:
    """DINO multi-crop of Gani et al. (docs/methods.md §5.1): views [global 1, global 2, local 1 .. local n].

    Every view: random-resized crop, flip, colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2,
    then blur: global 1 p 1.0; global 2 p 0.1 and solarize p 0.2; locals p 0.5. 32 px: global 32 px
    scale (0.7, 1), local 16 px (0.2, 0.5); 64 px: 64 (0.5, 1), 32 (0.2, 0.4). The blur kernel is not
    truncated (2·ceil(3·sigma_max)+1 taps), like DINO's PIL GaussianBlur(radius=sigma).
    """
    default_local, default_global_scale, default_local_scale = _DINO_CROPS.get(
        global_size, (max(1, round(global_size * 96 / 224)), (0.4, 1.0), (0.05, 0.4)))
    local_size = default_local if local_size is None else local_size
    global_scale = tuple(default_global_scale if global_scale is None else global_scale)
    local_scale = tuple(default_local_scale if local_scale is None else local_scale)
    kernel = 2 * math.ceil(3 * sigma[1]) + 1

    def view(size, scale, blur_p, solarize_p, name):
        steps = [("random_resized_crop", dict(size=size, scale=scale, ratio=(3 / 4, 4 / 3))),
                 ("horizontal_flip", dict(p=0.5)),
                 ("color_jitter", dict(brightness=jitter[0], contrast=jitter[1], saturation=jitter[2], hue=jitter[3],
                                       p=0.8)),
                 ("grayscale", dict(p=0.2)),
                 ("gaussian_blur", dict(p=blur_p, sigma=tuple(sigma), kernel_size=kernel))]
        if solarize_p > 0:
            steps.append(("solarize", dict(p=solarize_p, threshold=0.5)))
        return Augment(steps, mean, std, name=name)

    pipelines = [view(global_size, global_scale, 1.0, 0.0, "dino_global_1"),
                 view(global_size, global_scale, 0.1, 0.2, "dino_global_2")]
    repeats = [1, 1]
    if n_local > 0:
        pipelines.append(view(local_size, local_scale, 0.5, 0.0, "dino_local"))
        repeats.append(n_local)
    return MultiView(pipelines, repeats, name="dino_multicrop")


def relvit_upstream(size: int, mean=None, std=None, *, patch_size: int = 4, padding: Optional[int] = None) -> Augment:
    """RelViT upstream (docs/methods.md §2.1): random crop with 4-px padding + flip on the image, then per patch a
    random crop of round(p/1.15) px resized back to p, colour jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2."""
    padding = _padding_for(size) if padding is None else padding
    return Augment([("resize", dict(size=size)), ("random_crop", dict(size=size, padding=padding)),
                    ("horizontal_flip", dict(p=0.5)),
                    ("patch_jitter", dict(patch_size=patch_size, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
                                          gray_p=0.2))], mean, std, name="relvit_upstream")


def eval_transform(size: int, mean=None, std=None) -> Augment:
    """Evaluation: bilinear resize when the images are not ``size`` already, then normalisation; no randomness."""
    return Augment([("resize", dict(size=size))], mean, std, name="eval")
