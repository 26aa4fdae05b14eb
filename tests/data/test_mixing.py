"""Mixup / cutmix and random erasing measured from their outputs (vitfast.data.regularizers).

tests/data/test_regularizers.py checks shapes, label mass and the extremes. Here every number is recovered
from the images themselves: mixup's lambda solved from the pixels (and its Beta(alpha, alpha) law), cutmix's
from the count of pasted pixels, the odds between them, random erasing's rate at p = 0.25 and its area law.
Cost: ~10 s on 2 cores, most of it importing scipy.stats for the Beta-law test.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from vitfast.data import mix_batch, random_erasing


def distinct_images(batch, size=8, seed=0):
    """Images whose pixel values differ between any two samples at every position (so mixing is visible)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) + torch.arange(batch).view(-1, 1, 1, 1)


def soft_targets(labels, classes=5, smoothing=0.1):
    """Label-smoothed one-hot rows: mixing must work on any soft target, not only one-hot."""
    return F.one_hot(labels, classes).float() * (1 - smoothing) + smoothing / classes


def mixup_lambda(images, mixed):
    """Per sample, the lambda with mixed = lam * x + (1 - lam) * x_reversed, by least squares over the pixels."""
    a, b = images.flatten(1), images.flip(0).flatten(1)
    m = mixed.flatten(1)
    lam = ((m - b) * (a - b)).sum(1) / ((a - b) ** 2).sum(1)
    residual = (m - (lam[:, None] * a + (1 - lam[:, None]) * b)).abs().max()
    return lam, residual


def test_mixup_targets_use_the_lambda_of_the_pixels():
    gen = torch.Generator().manual_seed(0)
    images, labels = distinct_images(6), torch.tensor([0, 1, 2, 3, 4, 0])
    targets = soft_targets(labels)
    for _ in range(20):
        mixed, soft = mix_batch(images, targets, 0.8, 0.0, gen)
        lam, residual = mixup_lambda(images, mixed)
        assert residual < 1e-5  # every pixel is the same convex combination
        torch.testing.assert_close(lam, lam[:1].expand(6), atol=1e-5, rtol=0)  # one lambda for the batch
        assert 0.0 <= lam[0] <= 1.0
        torch.testing.assert_close(soft, lam[0] * targets + (1 - lam[0]) * targets.flip(0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("alpha", [0.2, 0.8, 2.0])
def test_mixup_lambda_follows_beta_alpha_alpha(alpha):
    """Kolmogorov-Smirnov test of 400 lambdas (recovered from pixels) against Beta(alpha, alpha)."""
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(int(alpha * 10))
    images = distinct_images(2, size=2)
    targets = soft_targets(torch.tensor([0, 1]))
    lams = [float(mixup_lambda(images, mix_batch(images, targets, alpha, 0.0, gen)[0])[0][0]) for _ in range(400)]
    assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    other = 2.0 if alpha != 2.0 else 0.2  # the test can tell alphas apart
    assert stats.kstest(lams, stats.beta(other, other).cdf).pvalue < 1e-3


def changed_box(before, after):
    """(changed mask [H, W], whether it is one full rectangle) for one image."""
    changed = (before != after).any(0)
    if not changed.any():
        return changed, True
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    box = torch.zeros_like(changed)
    box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    return changed, torch.equal(box, changed)


def test_cutmix_targets_use_the_area_of_the_pasted_box():
    """Every sample gets one rectangle of its mirror (the same box for the whole batch); its target is
    lam * y_a + (1 - lam) * y_b with 1 - lam = the counted fraction of pasted pixels."""
    gen = torch.Generator().manual_seed(1)
    images, labels = distinct_images(6, size=12), torch.tensor([0, 1, 2, 3, 4, 0])
    targets = soft_targets(labels)
    areas = []
    for _ in range(30):
        mixed, soft = mix_batch(images, targets, 0.0, 1.0, gen)
        boxes = [changed_box(images[i], mixed[i]) for i in range(6)]
        assert all(is_box for _, is_box in boxes)
        assert all(torch.equal(boxes[0][0], mask) for mask, _ in boxes)
        pasted = boxes[0][0]
        assert torch.equal(mixed[:, :, pasted], images.flip(0)[:, :, pasted])  # the pixels come from the mirror
        lam = 1 - pasted.float().mean().item()
        torch.testing.assert_close(soft, lam * targets + (1 - lam) * targets.flip(0), atol=1e-6, rtol=0)
        areas.append(1 - lam)
    assert min(areas) < 0.2 and max(areas) > 0.4  # Beta(1, 1) boxes of many sizes


def test_mixup_or_cutmix_with_equal_odds_when_both_are_on():
    gen = torch.Generator().manual_seed(2)
    images, targets = distinct_images(2, size=32), soft_targets(torch.tensor([0, 1]))
    cutmix = 0
    trials = 400
    for _ in range(trials):
        mixed, _ = mix_batch(images, targets, 0.8, 1.0, gen)
        pasted = (mixed == images.flip(0)) | (mixed == images)
        blended = mixup_lambda(images, mixed)[1] < 1e-5
        assert pasted.all() or blended  # each call is one of the two, never something else
        cutmix += bool(pasted.all() and not torch.equal(mixed, images))
    # Binomial(400, 0.5): standard deviation 10; 4.5 of them either side. (A cutmix box is empty when
    # int(32 * sqrt(1 - lam)) < 2, i.e. lam > 0.996: counted as not cutmix, a shift of about one.)
    assert abs(cutmix - trials / 2) < 45


# --- random erasing ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 16])
def test_random_erasing_rate_and_area_at_p_one_quarter(size):
    """p = 0.25 over 8000 images: the erased share within 4.5 binomial standard deviations; each erased region
    one rectangle of aspect in [0.3, 3.3] whose area fraction lies in [0.02, 1/3] up to one pixel row or
    column of rounding, with the mean and the spread of Uniform(0.02, 1/3) (the documented law)."""
    gen = torch.Generator().manual_seed(size)
    count, p = 8000, 0.25
    images = torch.full((count, 1, size, size), 7.0)
    out = random_erasing(images, p, gen)
    changed = (out != images)[:, 0]
    erased = changed.flatten(1).any(1)
    assert abs(erased.float().mean().item() - p) < 4.5 * math.sqrt(p * (1 - p) / count)
    regions = changed[erased]
    area = regions.flatten(1).float().mean(1)
    rows, cols = regions.any(2).sum(1).float(), regions.any(1).sum(1).float()
    assert torch.equal(rows * cols / size ** 2, area)  # a full rectangle
    slack = 1.5 * 2 * (1 / 3) ** 0.5 / size  # one rounded row / column of a box of area <= 1/3
    assert area.min() >= 0.02 - slack and area.max() <= 1 / 3 + slack
    lo, hi = 0.02, 1 / 3
    uniform_mean, uniform_std = (lo + hi) / 2, (hi - lo) / math.sqrt(12)
    assert abs(area.mean().item() - uniform_mean) < 4.5 * uniform_std / math.sqrt(len(area))
    assert abs(area.std().item() - uniform_std) < 0.1 * uniform_std
    aspect = rows / cols
    assert aspect.min() >= 0.3 * 0.5 and aspect.max() <= 3.3 * 2  # integer sides of small boxes widen the range
    noise = out[:, 0][changed]
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1) < 0.01  # N(0, 1) fill


# --- AutoAugment ------------------------------------------------------------------------------------------------

def paper_magnitude(name, index, width):
    """(magnitude, signed) of bin ``index`` of 10, from the AutoAugment paper's ranges (Cubuk et al. 2019):
    shear 0.3, translate 150/331 of the side, rotate 30 degrees, colour / contrast / brightness / sharpness
    factor 1 +- 0.9, posterize 8 -> 4 bits, solarize threshold from the top of the range down to 0. A rounding
    difference in a factor moves uint8 results, so the bins are float32 like the ops' own arithmetic."""
    step = index / 9

    def bin_of(top):  # 10 bins from 0 to ``top`` in float32, the precision the op factors are computed in
        return float(torch.linspace(0.0, top, 10)[index])

    table = {"ShearX": (bin_of(0.3), True), "ShearY": (bin_of(0.3), True),
             "TranslateX": (bin_of(150 / 331 * width), True), "TranslateY": (bin_of(150 / 331 * width), True),
             "Rotate": (bin_of(30.0), True), "Color": (bin_of(0.9), True), "Contrast": (bin_of(0.9), True),
             "Brightness": (bin_of(0.9), True), "Sharpness": (bin_of(0.9), True),
             "Posterize": (8 - round(4 * step), False),
             "Solarize": (255 * float(torch.linspace(1.0, 0.0, 10)[index]), False)}  # 255 = uint8's top
    return table.get(name, (0.0, False))


def apply_op(images, name, magnitude):
    """One AutoAugment op on uint8 images with torchvision's functional ops (nearest, zero fill)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    nearest = InterpolationMode.NEAREST
    shear = math.degrees(math.atan(magnitude))
    ops = {
        "ShearX": lambda x: TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[shear, 0.0],
                                      interpolation=nearest, center=[0, 0]),
        "ShearY": lambda x: TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, shear],
                                      interpolation=nearest, center=[0, 0]),
        "TranslateX": lambda x: TF.affine(x, angle=0.0, translate=[int(magnitude), 0], scale=1.0, shear=[0.0, 0.0],
                                          interpolation=nearest),
        "TranslateY": lambda x: TF.affine(x, angle=0.0, translate=[0, int(magnitude)], scale=1.0, shear=[0.0, 0.0],
                                          interpolation=nearest),
        "Rotate": lambda x: TF.rotate(x, magnitude, interpolation=nearest),
        "Brightness": lambda x: TF.adjust_brightness(x, 1 + magnitude),
        "Color": lambda x: TF.adjust_saturation(x, 1 + magnitude),
        "Contrast": lambda x: TF.adjust_contrast(x, 1 + magnitude),
        "Sharpness": lambda x: TF.adjust_sharpness(x, 1 + magnitude),
        "Posterize": lambda x: TF.posterize(x, int(magnitude)),
        "Solarize": lambda x: TF.solarize(x, magnitude),
        "AutoContrast": TF.autocontrast, "Equalize": TF.equalize, "Invert": TF.invert,
    }
    return ops[name](images)


def test_autoaugment_applies_the_drawn_sub_policy_with_the_papers_magnitudes():
    """The same draws replayed from torch's global RNG (per group of 8: one sub-policy uniformly, each op with
    its probability, a random sign for signed ops) and applied with torchvision's functional ops at the paper's
    magnitudes give the output bit for bit; groups draw independently."""
    from torchvision.transforms import v2

    from vitfast.data import autoaugment

    policies = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)._policies
    images = torch.randint(0, 256, (64, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    torch.manual_seed(5)
    out = autoaugment(images)
    torch.manual_seed(5)
    drawn, applied, expected = [], 0, []
    for chunk in images.split(8):
        policy = int(torch.randint(len(policies), ()))
        drawn.append(policy)
        for name, probability, index in policies[policy]:
            if not torch.rand(()) <= probability:
                continue
            magnitude, signed = paper_magnitude(name, index if index is not None else 0, images.shape[-1])
            if signed and torch.rand(()) <= 0.5:
                magnitude = -magnitude
            chunk = apply_op(chunk, name, magnitude)
            applied += 1
        expected.append(chunk)
    assert torch.equal(out, torch.cat(expected))
    assert len(set(drawn)) >= 4 and applied >= 4  # several sub-policies and ops really ran
