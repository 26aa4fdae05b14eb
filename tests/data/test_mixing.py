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


def partner(gen, batch, both=False):
    """The partner permutation the next mix_batch call on ``gen`` draws (its documented draw order: [mixup or
    cutmix?], lam, perm), replayed from a copy of the generator's state."""
    g = torch.Generator()
    g.set_state(gen.get_state())
    if both:
        torch.rand((), generator=g)
    torch.randint(2**62, (), generator=g)
    return torch.randperm(batch, generator=g)


def distinct_images(batch, size=8, seed=0):
    """Images whose pixel values differ between any two samples at every position (so mixing is visible)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) + torch.arange(batch).view(-1, 1, 1, 1)


def soft_targets(labels, classes=5, smoothing=0.1):
    """Label-smoothed one-hot rows: mixing must work on any soft target, not only one-hot."""
    return F.one_hot(labels, classes).float() * (1 - smoothing) + smoothing / classes


def mixup_lambda(images, mixed, perm):
    """Per sample, the lambda with mixed = lam * x + (1 - lam) * x[perm], by least squares over the pixels."""
    a, b = images.flatten(1), images[perm].flatten(1)
    m = mixed.flatten(1)
    lam = ((m - b) * (a - b)).sum(1) / ((a - b) ** 2).sum(1)  # NaN where an image is paired with itself
    residual = (m - (lam[:, None] * a + (1 - lam[:, None]) * b)).abs().nan_to_num(0.0).max()
    return lam, residual


def test_mixup_targets_use_the_lambda_of_the_pixels():
    gen = torch.Generator().manual_seed(0)
    images, labels = distinct_images(6), torch.tensor([0, 1, 2, 3, 4, 0])
    targets = soft_targets(labels)
    for _ in range(20):
        perm = partner(gen, 6)
        mixed, soft = mix_batch(images, targets, 0.8, 0.0, gen)
        moved = perm != torch.arange(6)  # an image paired with itself stays as it is: its lambda is not visible
        if not moved.any():
            continue
        lam, residual = mixup_lambda(images, mixed, perm)
        lam = lam[moved]
        assert residual < 1e-5  # every pixel is the same convex combination
        torch.testing.assert_close(lam, lam[:1].expand_as(lam), atol=1e-5, rtol=0)  # one lambda for the batch
        assert 0.0 <= lam[0] <= 1.0
        torch.testing.assert_close(soft, lam[0] * targets + (1 - lam[0]) * targets[perm], atol=1e-5, rtol=0)


@pytest.mark.parametrize("alpha", [0.2, 0.8, 2.0])
def test_mixup_lambda_follows_beta_alpha_alpha(alpha):
    """Kolmogorov-Smirnov test of 400 lambdas (recovered from pixels) against Beta(alpha, alpha)."""
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(int(alpha * 10))
    images = distinct_images(2, size=2)
    targets = soft_targets(torch.tensor([0, 1]))
    lams = []
    while len(lams) < 400:
        perm = partner(gen, 2)
        mixed = mix_batch(images, targets, alpha, 0.0, gen)[0]
        if perm[0] == 1:  # a swapped pair (an identity pair hides lambda)
            lams.append(float(mixup_lambda(images, mixed, perm)[0][0]))
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
    """Every sample gets one rectangle of its partner (the same box for the whole batch); its target is
    lam * y_a + (1 - lam) * y_b with 1 - lam = the counted fraction of pasted pixels."""
    gen = torch.Generator().manual_seed(1)
    images, labels = distinct_images(6, size=12), torch.tensor([0, 1, 2, 3, 4, 0])
    targets = soft_targets(labels)
    areas = []
    for _ in range(30):
        perm = partner(gen, 6)
        mixed, soft = mix_batch(images, targets, 0.0, 1.0, gen)
        moved = (perm != torch.arange(6)).nonzero().flatten().tolist()
        if not moved:
            continue
        boxes = [changed_box(images[i], mixed[i]) for i in moved]
        assert all(is_box for _, is_box in boxes)
        assert all(torch.equal(boxes[0][0], mask) for mask, _ in boxes)
        pasted = boxes[0][0]
        assert torch.equal(mixed[:, :, pasted], images[perm][:, :, pasted])  # the pixels come from the partner
        lam = 1 - pasted.float().mean().item()
        torch.testing.assert_close(soft, lam * targets + (1 - lam) * targets[perm], atol=1e-6, rtol=0)
        areas.append(1 - lam)
    assert min(areas) < 0.2 and max(areas) > 0.4  # Beta(1, 1) boxes of many sizes


def test_mixup_or_cutmix_with_equal_odds_when_both_are_on():
    gen = torch.Generator().manual_seed(2)
    images, targets = distinct_images(2, size=32), soft_targets(torch.tensor([0, 1]))
    cutmix = trials = 0
    while trials < 400:
        perm = partner(gen, 2, both=True)
        mixed, _ = mix_batch(images, targets, 0.8, 1.0, gen)
        if perm[0] == 0:  # paired with itself: either way the images come back as they were
            continue
        trials += 1
        pasted = (mixed == images.flip(0)) | (mixed == images)
        blended = mixup_lambda(images, mixed, perm)[1] < 1e-5
        assert pasted.all() or blended  # each call is one of the two, never something else
        cutmix += bool(pasted.all() and not torch.equal(mixed, images))
    # Binomial(400, 0.5): standard deviation 10; 4.5 of them either side. (A cutmix box is empty when
    # int(32 * sqrt(1 - lam)) < 2, i.e. lam > 0.996: counted as not cutmix, a shift of about one.)
    assert abs(cutmix - trials / 2) < 45


# --- random erasing ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 16])
def test_random_erasing_rate_and_area_at_p_one_quarter(size):
    """p = 0.25 over 8000 images: the erased share within 4.5 binomial standard deviations; each erased region
    one rectangle of the fill value, area fraction in [0.02, 0.4] up to one pixel row or column of rounding,
    aspect within (0.3, 1/0.3) up to the rounding of small sides. (The area law against the release's algorithm:
    tests/data/test_recipe_small_data.py.)"""
    gen = torch.Generator().manual_seed(size)
    count, p = 8000, 0.25
    images = torch.full((count, 1, size, size), 7.0)
    out = random_erasing(images, p, gen, fill=(0.3,))
    changed = (out != images)[:, 0]
    erased = changed.flatten(1).any(1)
    assert abs(erased.float().mean().item() - p) < 4.5 * math.sqrt(p * (1 - p) / count)
    regions = changed[erased]
    area = regions.flatten(1).float().mean(1)
    rows, cols = regions.any(2).sum(1).float(), regions.any(1).sum(1).float()
    assert torch.equal(rows * cols / size ** 2, area)  # a full rectangle
    slack = 1.5 * 2 * 0.4 ** 0.5 / size  # one rounded row / column of a box of area <= 0.4
    assert area.min() >= 0.02 - slack and area.max() <= 0.4 + slack
    aspect = rows / cols
    assert aspect.min() >= 0.3 * 0.5 and aspect.max() <= 3.4 * 2  # integer sides of small boxes widen the range
    assert torch.all(out[:, 0][changed] == 0.3)  # the fill, written as it is
