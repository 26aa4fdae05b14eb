"""AutoAugment (Cubuk et al. 2019) as the small-data ViT release applies it (docs/methods.md §5.2), batched on uint8.

    out = autoaugment(images_uint8, "cifar10", generator)   # uint8 [B, C, H, W] -> uint8 [B, C, H, W]
    policy_for_dataset("svhn")                              # -> "svhn"

Every image draws its own sub-policy (one of the 25 pairs of the policy table) and, for each of the
pair's two operations, whether it applies (its probability) and, for signed operations, the sign.
The batch is then grouped by operation: each of the 14 operations runs once per slot on the images
that drew it, with per-image magnitudes — at most 28 vectorised calls per batch, no per-image loop.

The numbers are the release's (its utils/autoaug.py, itself DeepVoltaire's PIL AutoAugment): magnitude
bin m in 0..9 of each operation maps to ``MAGNITUDES[op](m)``; shears and translations, colour,
contrast, sharpness and brightness take a random sign; rotation is always counter-clockwise by the
magnitude (the release draws no sign); geometric operations fill with grey 128. Pixel values follow
PIL's definitions (ImageEnhance blends, ITU-R 601 luma, the SMOOTH kernel for sharpness, PIL's
equalize and autocontrast look-up tables, posterize / solarize on the byte values), computed in float
and truncated to bytes as PIL does. Shears resample with the cubic kernel of PIL's affine transforms
(a = −1, 4×4 taps), translations and rotations by nearest neighbour, at pixel centres. Against Pillow
on random 32-px images (tests/data/test_recipe_small_data.py) every operation agrees to within one
grey level except a rotation's few pixels on the rim of the rotated image (inside / outside decided
one way or the other by float rounding).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["POLICIES", "OPS", "MAGNITUDES", "SIGNED", "autoaugment", "policy_for_dataset", "draw_sub_policies"]

OPS = ("shearX", "shearY", "translateX", "translateY", "rotate", "color", "posterize", "solarize", "contrast",
       "sharpness", "brightness", "autocontrast", "equalize", "invert")

# Magnitude of bin m (0..9): linspace(lo, hi, 10)[m]; posterize rounds half to even, as numpy's round.
MAGNITUDES: Dict[str, Callable[[int], float]] = {
    "shearX": lambda m: 0.3 * m / 9, "shearY": lambda m: 0.3 * m / 9,
    "translateX": lambda m: 150 / 331 * m / 9, "translateY": lambda m: 150 / 331 * m / 9,  # fraction of the side
    "rotate": lambda m: 30.0 * m / 9,
    "color": lambda m: 0.9 * m / 9, "contrast": lambda m: 0.9 * m / 9, "sharpness": lambda m: 0.9 * m / 9,
    "brightness": lambda m: 0.9 * m / 9,
    "posterize": lambda m: float(round(8 - 4 * m / 9)),  # bits kept
    "solarize": lambda m: 256 - 256 * m / 9,             # threshold
    "autocontrast": lambda m: 0.0, "equalize": lambda m: 0.0, "invert": lambda m: 0.0,
}
SIGNED = frozenset({"shearX", "shearY", "translateX", "translateY", "color", "contrast", "sharpness", "brightness"})

# Sub-policies: (probability 1, operation 1, magnitude bin 1, probability 2, operation 2, magnitude bin 2).
POLICIES: Dict[str, Tuple[Tuple[float, str, int, float, str, int], ...]] = {
    "cifar10": (
        (0.1, "invert", 7, 0.2, "contrast", 6), (0.7, "rotate", 2, 0.3, "translateX", 9),
        (0.8, "sharpness", 1, 0.9, "sharpness", 3), (0.5, "shearY", 8, 0.7, "translateY", 9),
        (0.5, "autocontrast", 8, 0.9, "equalize", 2), (0.2, "shearY", 7, 0.3, "posterize", 7),
        (0.4, "color", 3, 0.6, "brightness", 7), (0.3, "sharpness", 9, 0.7, "brightness", 9),
        (0.6, "equalize", 5, 0.5, "equalize", 1), (0.6, "contrast", 7, 0.6, "sharpness", 5),
        (0.7, "color", 7, 0.5, "translateX", 8), (0.3, "equalize", 7, 0.4, "autocontrast", 8),
        (0.4, "translateY", 3, 0.2, "sharpness", 6), (0.9, "brightness", 6, 0.2, "color", 8),
        (0.5, "solarize", 2, 0.0, "invert", 3), (0.2, "equalize", 0, 0.6, "autocontrast", 0),
        (0.2, "equalize", 8, 0.6, "equalize", 4), (0.9, "color", 9, 0.6, "equalize", 6),
        (0.8, "autocontrast", 4, 0.2, "solarize", 8), (0.1, "brightness", 3, 0.7, "color", 0),
        (0.4, "solarize", 5, 0.9, "autocontrast", 3), (0.9, "translateY", 9, 0.7, "translateY", 9),
        (0.9, "autocontrast", 2, 0.8, "solarize", 3), (0.8, "equalize", 8, 0.1, "invert", 3),
        (0.7, "translateY", 9, 0.9, "autocontrast", 1),
    ),
    "svhn": (
        (0.9, "shearX", 4, 0.2, "invert", 3), (0.9, "shearY", 8, 0.7, "invert", 5),
        (0.6, "equalize", 5, 0.6, "solarize", 6), (0.9, "invert", 3, 0.6, "equalize", 3),
        (0.6, "equalize", 1, 0.9, "rotate", 3), (0.9, "shearX", 4, 0.8, "autocontrast", 3),
        (0.9, "shearY", 8, 0.4, "invert", 5), (0.9, "shearY", 5, 0.2, "solarize", 6),
        (0.9, "invert", 6, 0.8, "autocontrast", 1), (0.6, "equalize", 3, 0.9, "rotate", 3),
        (0.9, "shearX", 4, 0.3, "solarize", 3), (0.8, "shearY", 8, 0.7, "invert", 4),
        (0.9, "equalize", 5, 0.6, "translateY", 6), (0.9, "invert", 4, 0.6, "equalize", 7),
        (0.3, "contrast", 3, 0.8, "rotate", 4), (0.8, "invert", 5, 0.0, "translateY", 2),
        (0.7, "shearY", 6, 0.4, "solarize", 8), (0.6, "invert", 4, 0.8, "rotate", 4),
        (0.3, "shearY", 7, 0.9, "translateX", 3), (0.1, "shearX", 6, 0.6, "invert", 5),
        (0.7, "solarize", 2, 0.6, "translateY", 7), (0.8, "shearY", 4, 0.8, "invert", 8),
        (0.7, "shearX", 9, 0.8, "translateY", 3), (0.8, "shearY", 5, 0.7, "autocontrast", 3),
        (0.7, "shearX", 2, 0.1, "invert", 5),
    ),
    "imagenet": (
        (0.4, "posterize", 8, 0.6, "rotate", 9), (0.6, "solarize", 5, 0.6, "autocontrast", 5),
        (0.8, "equalize", 8, 0.6, "equalize", 3), (0.6, "posterize", 7, 0.6, "posterize", 6),
        (0.4, "equalize", 7, 0.2, "solarize", 4), (0.4, "equalize", 4, 0.8, "rotate", 8),
        (0.6, "solarize", 3, 0.6, "equalize", 7), (0.8, "posterize", 5, 1.0, "equalize", 2),
        (0.2, "rotate", 3, 0.6, "solarize", 8), (0.6, "equalize", 8, 0.4, "posterize", 6),
        (0.8, "rotate", 8, 0.4, "color", 0), (0.4, "rotate", 9, 0.6, "equalize", 2),
        (0.0, "equalize", 7, 0.8, "equalize", 8), (0.6, "invert", 4, 1.0, "equalize", 8),
        (0.6, "color", 4, 1.0, "contrast", 8), (0.8, "rotate", 8, 1.0, "color", 2),
        (0.8, "color", 8, 0.8, "solarize", 7), (0.4, "sharpness", 7, 0.6, "invert", 8),
        (0.6, "shearX", 5, 1.0, "equalize", 9), (0.4, "color", 0, 0.6, "equalize", 3),
        (0.4, "equalize", 7, 0.2, "solarize", 4), (0.6, "solarize", 5, 0.6, "autocontrast", 5),
        (0.6, "invert", 4, 1.0, "equalize", 8), (0.6, "color", 4, 1.0, "contrast", 8),
        (0.8, "equalize", 8, 0.6, "equalize", 3),
    ),
}

# The release: "CIFAR" in the name -> CIFAR-10 policy, "SVHN" -> SVHN policy, anything else -> ImageNet policy.
# vitfast's small 32-px sets of natural-ish images (digits, shapes) take the CIFAR-10 policy.
_DATASET_POLICY = {"cifar10": "cifar10", "cifar100": "cifar10", "digits": "cifar10", "shapes": "cifar10",
                   "svhn": "svhn"}
FILL = 128.0


def policy_for_dataset(dataset: str) -> str:
    """The policy the release uses for ``dataset`` (a vitfast dataset name): cifar10, svhn or imagenet."""
    return _DATASET_POLICY.get(str(dataset).lower(), "imagenet")


def _table(policy: str, device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """int64 op ids [S, 2], float probabilities [S, 2], magnitudes [S, 2], signed flags [S, 2] of ``policy``."""
    if policy not in POLICIES:
        raise ValueError(f"autoaugment: policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    rows = POLICIES[policy]
    ops = [[OPS.index(r[1]), OPS.index(r[4])] for r in rows]
    probs = [[r[0], r[3]] for r in rows]
    mags = [[MAGNITUDES[r[1]](r[2]), MAGNITUDES[r[4]](r[5])] for r in rows]
    signed = [[r[1] in SIGNED, r[4] in SIGNED] for r in rows]
    return (torch.tensor(ops, device=device), torch.tensor(probs, device=device),
            torch.tensor(mags, device=device, dtype=torch.float64), torch.tensor(signed, device=device))


def draw_sub_policies(batch: int, policy: str, generator: Optional[torch.Generator], device
                      ) -> Tuple[Tensor, Tensor, Tensor]:
    """Per image: sub-policy index int64 [B], the op id of each slot or -1 when it does not apply int64 [B, 2],
    and the signed magnitude of each slot float [B, 2]."""
    ops, probs, mags, signed = _table(policy, device)
    u = torch.rand(batch, 5, generator=generator, device=device)
    sub = (u[:, 0] * len(ops)).long().clamp_max(len(ops) - 1)
    applies = u[:, 1:3] < probs[sub]
    sign = torch.where(signed[sub] & (u[:, 3:5] < 0.5), -1.0, 1.0)
    return sub, torch.where(applies, ops[sub], -1), mags[sub] * sign


# ----------------------------------------------------------------------------------------- operations
# Each takes uint8 [n, C, H, W] and per-image magnitudes float [n]; returns uint8 [n, C, H, W].

def _to_byte(x: Tensor) -> Tensor:
    """PIL's CLIP8((int) v): clip, then truncate."""
    return x.clamp(0, 255).floor_().to(torch.uint8)


def _blend(degenerate: Tensor, images: Tensor, factor: Tensor) -> Tensor:
    """PIL ImageEnhance: degenerate + factor · (image − degenerate), per image ``factor``."""
    return _to_byte(degenerate + factor.float().view(-1, 1, 1, 1) * (images.float() - degenerate))  # PIL: float


def _luma(images: Tensor) -> Tensor:
    """PIL's "L" conversion (ITU-R 601), float [n, 1, H, W] rounded to bytes; one channel: itself."""
    x = images.float()
    if x.shape[1] != 3:
        return x[:, :1]
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).round()


def _affine(images: Tensor, a, b, c, d, e, f, mode: str, axis: Optional[str] = None) -> Tensor:
    """Output pixel centre (x, y) samples the input at (a·x + b·y + c, d·x + e·y + f) (PIL's AFFINE data, [n]
    each, pixel units); samples outside the image are grey 128."""
    n, _, height, width = images.shape
    dev = images.device
    ys = (torch.arange(height, device=dev, dtype=torch.float64) + 0.5).view(1, -1, 1)  # PIL computes in double
    xs = (torch.arange(width, device=dev, dtype=torch.float64) + 0.5).view(1, 1, -1)
    col = lambda v: v.double().view(-1, 1, 1)
    x_in = col(a) * xs + col(b) * ys + col(c)
    y_in = col(d) * xs + col(e) * ys + col(f)
    if mode == "bicubic":
        out = _bicubic(images.double(), x_in, y_in, axis)
    else:
        grid = torch.stack((2 * x_in / width - 1, 2 * y_in / height - 1), dim=-1)
        out = F.grid_sample(images.double(), grid, mode=mode, padding_mode="border", align_corners=False)
    inside = ((x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)).unsqueeze(1)
    return _to_byte(torch.where(inside, out, torch.full_like(out, FILL)))


def _cubic(t: Tensor) -> Tensor:
    """The cubic kernel of PIL's affine transforms (a = −1; its resize uses −0.5, grid_sample −0.75)."""
    t = t.abs()
    a = -1.0
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((t - 5) * t + 8) * t * a - 4 * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def _bicubic(images: Tensor, x_in: Tensor, y_in: Tensor, axis: Optional[str] = None) -> Tensor:
    """float [n, C, H, W] sampled at pixel coordinates x_in, y_in [n, H, W] (centres at +0.5), 4×4 taps with
    PIL's kernel, neighbours clamped to the image -> float [n, C, H, W]. ``axis`` "x" ("y"): the other
    coordinate falls on pixel centres (a shear along x / y), where the kernel is 1 at the centre tap and 0 at the
    others, so only the 4 taps along ``axis`` are summed."""
    n, channels, height, width = images.shape
    xs, ys = x_in - 0.5, y_in - 0.5
    x0, y0 = xs.floor(), ys.floor()
    flat = images.flatten(2)
    out = torch.zeros_like(images)
    for ky in ((0,) if axis == "x" else range(-1, 3)):
        wy = _cubic(ys - (y0 + ky))
        rows = (y0 + ky).clamp(0, height - 1).long()
        for kx in ((0,) if axis == "y" else range(-1, 3)):
            weight = (wy * _cubic(xs - (x0 + kx))).unsqueeze(1)
            cols = (x0 + kx).clamp(0, width - 1).long()
            index = (rows * width + cols).flatten(1).unsqueeze(1).expand(n, channels, -1)
            out += weight * flat.gather(2, index).view_as(images)
    return out


def _shear_x(x, m):
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _affine(x, one, m, zero, zero, one, zero, "bicubic", axis="x")


def _shear_y(x, m):
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _affine(x, one, zero, zero, m, one, zero, "bicubic", axis="y")


def _translate_x(x, m):
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _affine(x, one, zero, m * x.shape[-1], zero, one, zero, "nearest")


def _translate_y(x, m):
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _affine(x, one, zero, zero, zero, one, m * x.shape[-2], "nearest")


def _rotate(x, m):
    """PIL ``rotate(m)``: counter-clockwise by m degrees about the image centre."""
    theta = torch.deg2rad(m.float())
    cos, sin = torch.cos(theta), torch.sin(theta)
    cx, cy = x.shape[-1] / 2, x.shape[-2] / 2
    return _affine(x, cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, "nearest")


def _color(x, m):
    return _blend(_luma(x).expand_as(x), x, 1 + m)


def _contrast(x, m):
    mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True).add(0.5).floor()  # PIL: int(mean + 0.5) of the L image
    return _blend(mean.expand_as(x), x, 1 + m)


def _sharpness(x, m):
    """Blend with PIL's SMOOTH filter (3×3, centre 5, others 1, /13); the border pixels stay as they are."""
    n, channels, height, width = x.shape
    kernel = torch.ones(3, 3, device=x.device)
    kernel[1, 1] = 5
    kernel = (kernel / 13).view(1, 1, 3, 3).expand(channels, 1, 3, 3)
    smooth = F.conv2d(x.float(), kernel, groups=channels).round()
    degenerate = x.float().clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, 1 + m)


def _brightness(x, m):
    return _blend(torch.zeros_like(x, dtype=torch.float32), x, 1 + m)


def _posterize(x, m):
    keep = (255 << (8 - m.long())) & 255  # the high ``m`` bits
    return x & keep.to(torch.uint8).view(-1, 1, 1, 1)


def _solarize(x, m):
    return torch.where(x.float() >= m.view(-1, 1, 1, 1), 255 - x, x)


def _autocontrast(x, m):
    """Per image and channel, stretch [min, max] to [0, 255] (PIL's look-up table: floor(i·scale + offset))."""
    flat = x.flatten(2).float()
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    scale = 255 / (hi - lo).clamp_min(1)
    out = torch.where(hi > lo, ((flat - lo) * scale).floor().clamp(0, 255), flat)
    return out.to(torch.uint8).view_as(x)


def _equalize(x, m):
    """PIL's ImageOps.equalize per image and channel: lut[i] = (step // 2 + #pixels below i) // step with
    step = (#pixels − #pixels of the highest used value) // 255; identity when step is 0."""
    n, channels = x.shape[:2]
    flat = x.reshape(n * channels, -1).long()
    hist = torch.zeros(n * channels, 256, dtype=torch.long, device=x.device).scatter_add_(
        1, flat, torch.ones_like(flat))
    used = hist > 0
    last = 255 - used.flip(1).long().argmax(1, keepdim=True)  # the highest used value
    step = (flat.shape[1] - hist.gather(1, last)) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp(0, 255)
    identity = torch.arange(256, device=x.device).expand_as(lut)
    lut = torch.where(step > 0, lut, identity)
    return lut.gather(1, flat).to(torch.uint8).view_as(x)


def _invert(x, m):
    return 255 - x


_FUNCTIONS = {"shearX": _shear_x, "shearY": _shear_y, "translateX": _translate_x, "translateY": _translate_y,
              "rotate": _rotate, "color": _color, "posterize": _posterize, "solarize": _solarize,
              "contrast": _contrast, "sharpness": _sharpness, "brightness": _brightness,
              "autocontrast": _autocontrast, "equalize": _equalize, "invert": _invert}


def apply_op(images: Tensor, op: str, magnitude: Tensor) -> Tensor:
    """One operation on uint8 [n, C, H, W] with signed per-image magnitudes float [n] (for tests and tools)."""
    return _FUNCTIONS[op](images, magnitude.to(images.device, torch.float64))


def autoaugment(images: Tensor, policy: str, generator: Optional[torch.Generator] = None) -> Tensor:
    """AutoAugment ``policy`` ("cifar10", "svhn", "imagenet") on uint8 [B, C, H, W], one draw per image -> uint8."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = f"{images.dtype} {list(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"autoaugment: images must be uint8 [B, C, H, W], got {got}")
    _, codes, magnitudes = draw_sub_policies(images.shape[0], policy, generator, images.device)
    codes_host = codes.cpu()  # one sync: which images each operation gets
    out = images
    for slot in range(2):
        for k, op in enumerate(OPS):
            rows = torch.nonzero(codes_host[:, slot] == k).squeeze(1)
            if rows.numel() == 0:
                continue
            rows = rows.to(images.device)
            if out is images:
                out = images.clone()
            out[rows] = _FUNCTIONS[op](out[rows], magnitudes[rows, slot])
    return out
