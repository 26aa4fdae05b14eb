"""vitfast.data.augment: shapes, ranges, per-sample independence, seeds, p = 0 / p = 1, the semantics of each
op against torchvision's functional ops (per sample), crop statistics, multi-crop and RelViT's per-patch jitter."""
import math

import pytest
import torch

from vitfast.data import augment as A

SEED = 0


def gen(seed=SEED):
    return torch.Generator().manual_seed(seed)


def images_float(batch=8, channels=3, size=16, seed=1):
    return torch.rand(batch, channels, size, size, generator=gen(seed))


def same_image_batch(batch=16, channels=3, size=16):
    return images_float(1, channels, size).expand(batch, -1, -1, -1).contiguous()


def distinct_outputs(out):
    """How many different samples a batch holds."""
    return len({bytes(o.numpy().tobytes()) for o in out})


# ------------------------------------------------------------------------------------------- basic contract

PRESETS = {
    "supervised_train": lambda: A.supervised_train(16, (0.5,) * 3, (0.25,) * 3),
    "mae_pretrain": lambda: A.mae_pretrain(16, (0.5,) * 3, (0.25,) * 3),
    "relvit_upstream": lambda: A.relvit_upstream(16, (0.5,) * 3, (0.25,) * 3, patch_size=4),
    "eval_transform": lambda: A.eval_transform(16, (0.5,) * 3, (0.25,) * 3),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_shapes_dtypes_ranges_and_seeds(name):
    images = (images_float(6, size=20) * 255).to(torch.uint8)
    pipeline = PRESETS[name]()
    out = pipeline(images, gen())
    assert out.shape == (6, 3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= (0 - 0.5) / 0.25 - 1e-5 and out.max() <= (1 - 0.5) / 0.25 + 1e-5
    assert torch.equal(out, pipeline(images, gen()))
    if name != "eval_transform":
        assert not torch.equal(out, pipeline(images, gen(SEED + 1)))
    raw = A.Augment(pipeline.steps)(images, gen())  # without normalisation: inside [0, 1]
    assert raw.min() >= 0 and raw.max() <= 1


def test_functions_keep_range_and_dtype():
    x = images_float(8)
    for fn in (lambda: A.random_resized_crop(x, 12, generator=gen()), lambda: A.random_crop(x, 16, 4, generator=gen()),
               lambda: A.horizontal_flip(x, generator=gen()), lambda: A.color_jitter(x, p=1.0, generator=gen()),
               lambda: A.grayscale(x, p=1.0, generator=gen()), lambda: A.gaussian_blur(x, p=1.0, generator=gen()),
               lambda: A.solarize(x, p=1.0, generator=gen()), lambda: A.patch_jitter(x, 4, generator=gen())):
        out = fn()
        assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1


def test_half_precision_stays_half():
    x = images_float(4).half()
    assert A.color_jitter(x, p=1.0, generator=gen()).dtype == torch.float16
    assert A.gaussian_blur(x, p=1.0, generator=gen()).dtype == torch.float16


def test_per_sample_independence():
    x = same_image_batch(16)
    assert distinct_outputs(A.random_resized_crop(x, 16, generator=gen())) > 10
    assert distinct_outputs(A.random_crop(x, 16, 4, generator=gen())) > 10
    assert distinct_outputs(A.horizontal_flip(x, generator=gen())) == 2  # flipped or not, both present
    assert distinct_outputs(A.color_jitter(x, p=1.0, generator=gen())) == 16
    assert distinct_outputs(A.gaussian_blur(x, p=1.0, generator=gen())) == 16


@pytest.mark.parametrize("op", ["horizontal_flip", "color_jitter", "grayscale", "gaussian_blur", "solarize"])
def test_p0_is_identity_and_p1_always_applies(op):
    x = images_float(12)
    fn = getattr(A, op)
    assert torch.equal(fn(x, p=0.0, generator=gen()), x)
    out = fn(x, p=1.0, generator=gen())
    changed = (out - x).flatten(1).abs().amax(1) > 1e-3
    assert changed.all(), f"{op} with p=1 left samples {torch.nonzero(~changed).flatten().tolist()} unchanged"


def test_probability_is_per_sample():
    x = images_float(2000, channels=1, size=2)
    flipped = (A.horizontal_flip(x, p=0.3, generator=gen()) != x).flatten(1).any(1).float().mean()
    assert 0.25 < flipped < 0.35


def test_generator_on_another_device_is_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device type")
    with pytest.raises(ValueError, match="generator"):
        A.horizontal_flip(images_float(2), generator=torch.Generator("cuda"))


def test_uint8_input_to_an_op_is_refused_but_pipelines_convert():
    with pytest.raises(ValueError, match="to_float"):
        A.horizontal_flip(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    out = A.eval_transform(4)(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8))
    assert torch.equal(out, torch.ones(2, 3, 4, 4))


# ------------------------------------------------------------------------------------------- op semantics

def test_grayscale_equal_channels_and_luma():
    x = images_float(4)
    out = A.grayscale(x, p=1.0, generator=gen())
    assert out.shape == x.shape
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    torch.testing.assert_close(out[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])
    one = images_float(4, channels=1)
    assert torch.equal(A.grayscale(one, p=1.0, generator=gen()), one)


def test_solarize_semantics():
    x = torch.tensor([0.0, 0.2, 0.49, 0.5, 0.8, 1.0]).view(1, 1, 1, 6)
    out = A.solarize(x, p=1.0, threshold=0.5, generator=gen())
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 0.2, 0.49, 0.5, 0.2, 0.0]))


def test_horizontal_flip_p1_mirrors():
    x = images_float(3)
    assert torch.equal(A.horizontal_flip(x, p=1.0, generator=gen()), x.flip(-1))


def test_random_crop_is_an_exact_shifted_window():
    x = images_float(32, channels=2, size=8)
    out = A.random_crop(x, 8, padding=2, generator=gen())
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for b in range(32):
        hits = [(i, j) for i in range(5) for j in range(5) if torch.equal(padded[b, :, i:i + 8, j:j + 8], out[b])]
        assert hits, f"sample {b} is not a window of its padded image"
        offsets.add(hits[0])
    assert len(offsets) > 8  # offsets drawn per sample across the 5 x 5 possibilities


def test_resized_crop_boxes_follow_scale_and_ratio():
    top, left, h, w = A.resized_crop_boxes(4000, 64, 64, scale=(0.2, 0.5), ratio=(3 / 4, 4 / 3), generator=gen())
    area = (h * w).double() / (64 * 64)
    assert area.min() > 0.2 - 0.02 and area.max() < 0.5 + 0.02  # rounding of h and w
    assert abs(area.mean().item() - 0.35) < 0.02                   # uniform in area: mean at the middle
    aspect = (w / h).double()
    assert aspect.min() > 0.75 - 0.06 and aspect.max() < 4 / 3 + 0.08
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 64).all()
    assert len(set(zip(top.tolist(), left.tolist()))) > 500


def test_resized_crop_boxes_fallback_is_the_centre():
    # A 4:1 image cannot hold a 3:4..4:3 box of 90-100 % of its area: torchvision's centre fallback.
    top, left, h, w = A.resized_crop_boxes(10, 8, 32, scale=(0.9, 1.0), generator=gen())
    assert h.tolist() == [8] * 10 and w.tolist() == [11] * 10 and left.tolist() == [10] * 10 and top.eq(0).all()


def test_crop_resize_matches_torchvision_resized_crop():
    TF = pytest.importorskip("torchvision.transforms.functional")
    x = images_float(16, size=24)
    top, left, h, w = A.resized_crop_boxes(16, 24, 24, scale=(0.3, 1.0), generator=gen())
    out = A.crop_resize(x, top, left, h, w, 16, antialias=False)
    for b in range(16):
        expected = TF.resized_crop(x[b], int(top[b]), int(left[b]), int(h[b]), int(w[b]), [16, 16],
                                   antialias=False)
        torch.testing.assert_close(out[b], expected, atol=1e-5, rtol=0)
    identity = A.crop_resize(x, torch.zeros(16), torch.zeros(16), torch.full((16,), 24.), torch.full((16,), 24.), 24)
    torch.testing.assert_close(identity, x, atol=1e-5, rtol=0)


def test_crop_resize_antialias_averages_when_shrinking():
    x = (torch.arange(16.0).remainder(2)).view(1, 1, 1, 16).expand(1, 1, 16, 16).contiguous()  # 1-px stripes
    out = A.crop_resize(x, torch.zeros(1), torch.zeros(1), torch.full((1,), 16.), torch.full((1,), 16.), 4)
    torch.testing.assert_close(out, torch.full_like(out, 0.5))


def test_color_jitter_matches_torchvision_per_sample():
    TF = pytest.importorskip("torchvision.transforms.functional")
    x = images_float(24, size=6)
    amounts = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    for random_order in (True, False):
        out = A.color_jitter(x, **amounts, p=0.8, generator=gen(3), random_order=random_order)
        u = torch.rand(24, 9, generator=gen(3))  # the draws color_jitter makes, in its layout
        for b in range(24):
            expected = x[b]
            if u[b, 0] < 0.8:
                factors = [0.6 + 0.8 * u[b, 1], 0.6 + 0.8 * u[b, 2], 0.6 + 0.8 * u[b, 3], 0.1 * (2 * u[b, 4] - 1)]
                order = torch.argsort(u[b, 5:9]).tolist() if random_order else [0, 1, 2, 3]
                ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
                for op in order:
                    expected = ops[op](expected, float(factors[op]))
            # Luma weights: ours 0.299 (PIL, ITU-R 601), torchvision's tensor path 0.2989.
            torch.testing.assert_close(out[b], expected, atol=1e-4, rtol=0, msg=lambda m: f"sample {b}: {m}")


def test_hue_compact_and_where_paths_agree():
    x = images_float(10, size=5)
    here = torch.tensor([True, False] * 5)
    shift = torch.linspace(-0.1, 0.1, 10)
    compact = A._hue_where(x, here, shift, compact=True)
    assert torch.equal(compact, A._hue_where(x, here, shift, compact=False))
    assert torch.equal(compact[~here], x[~here]) and not torch.equal(compact[here], x[here])


def test_color_jitter_one_channel_changes_brightness_and_contrast_only():
    x = images_float(6, channels=1)
    out = A.color_jitter(x, 0.0, 0.0, 0.9, 0.4, p=1.0, generator=gen())
    assert torch.equal(out, x)
    assert not torch.equal(A.color_jitter(x, 0.4, 0.4, 0.0, 0.0, p=1.0, generator=gen()), x)


def test_gaussian_blur_matches_torchvision_and_kernel_rule():
    TF = pytest.importorskip("torchvision.transforms.functional")
    x = images_float(6, size=40)
    out = A.gaussian_blur(x, p=1.0, sigma=(0.5, 2.0), generator=gen(4))
    sigmas = 0.5 + torch.rand(6, 2, generator=gen(4))[:, 1] * 1.5
    for b in range(6):  # 10 % of 40 px: a 5-tap kernel (odd)
        expected = TF.gaussian_blur(x[b], [5, 5], [float(sigmas[b])] * 2)
        torch.testing.assert_close(out[b], expected, atol=1e-5, rtol=0)
    constant = torch.full((2, 3, 16, 16), 0.3)
    torch.testing.assert_close(A.gaussian_blur(constant, p=1.0, kernel_size=13, generator=gen()), constant)


def test_normalize_checks_channels():
    with pytest.raises(ValueError, match="3 values"):
        A.normalize(images_float(2), (0.5,), (0.2,))
    out = A.normalize(torch.full((1, 3, 2, 2), 0.5), (0.5, 0.25, 0.0), (1.0, 0.5, 0.25))
    assert out[0, :, 0, 0].tolist() == [0.0, 0.5, 2.0]


# ------------------------------------------------------------------------------------------- multi-view

def test_dino_multicrop_views_and_schedule():
    views = A.dino_multicrop(32, (0.5,) * 3, (0.25,) * 3, n_local=6)
    assert len(views) == 8
    out = views((images_float(5, size=32) * 255).to(torch.uint8), gen())
    assert [tuple(v.shape) for v in out] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * 6
    assert views.view_sizes((32, 32)) == [(32, 32)] * 2 + [(16, 16)] * 6
    spec = views.to_dict()["views"]
    blur = [next(s for s in v["steps"] if s["name"] == "gaussian_blur")["p"] for v in spec]
    solarize = [[s["p"] for s in v["steps"] if s["name"] == "solarize"] for v in spec]
    assert blur == [1.0, 0.1, 0.5] and solarize == [[], [0.2], []] and spec[2]["repeats"] == 6
    crops = [next(s for s in v["steps"] if s["name"] == "random_resized_crop") for v in spec]
    assert crops[0]["scale"] == (0.7, 1.0) and crops[2]["scale"] == (0.2, 0.5)
    assert all(not torch.equal(out[2], other) for other in out[3:])  # each local crop is its own draw
    big = A.dino_multicrop(64)
    assert big.view_sizes((64, 64))[-1] == (32, 32)


def test_simclr_views_are_two_different_views():
    views = A.simclr_views(16)
    x = same_image_batch(4)
    first, second = views(x, gen())
    assert first.shape == second.shape == (4, 3, 16, 16) and not torch.equal(first, second)
    assert A.supcon_views(16).name == "supcon_views" and len(A.supcon_views(16)) == 2


# ------------------------------------------------------------------------------------------- RelViT per patch

def test_patch_jitter_keeps_shape_and_changes_patches_independently():
    tile = images_float(1, size=4)
    x = tile.repeat(2, 1, 4, 4)  # every 4x4 patch of both images is the same
    out = A.patch_jitter(x, 4, jitter_p=1.0, generator=gen())
    assert out.shape == x.shape
    patches = out.reshape(2, 3, 4, 4, 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(32, 3, 4, 4)
    assert distinct_outputs(patches) == 32


def test_patch_jitter_is_local_to_each_patch():
    x = images_float(2, size=8)
    y = x.clone()
    y[:, :, :4, :4] = 0.5  # change the top-left patch only
    a, b = A.patch_jitter(x, 4, generator=gen()), A.patch_jitter(y, 4, generator=gen())
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[:4, :4] = False
    assert torch.equal(a[..., mask], b[..., mask])


def test_patch_jitter_crop_is_round_p_over_1_15():
    # Without colour ops, each patch is a 3x3 crop (round(4 / 1.15) = 3) of itself resized to 4x4:
    # a patch whose 4 columns hold 0, 1, 2, 3 keeps a spread of 2 (3 source columns), never 3.
    ramp = torch.arange(4.0).view(1, 1, 1, 4).expand(64, 1, 4, 4) / 3
    out = A.patch_jitter(ramp.contiguous(), 4, jitter_p=0.0, gray_p=0.0, generator=gen())
    spread = (out.amax((1, 2, 3)) - out.amin((1, 2, 3))) * 3
    torch.testing.assert_close(spread, torch.full_like(spread, 2.0), atol=1e-5, rtol=0)
    identity = A.patch_jitter(ramp.contiguous(), 4, crop_size=4, jitter_p=0.0, gray_p=0.0, generator=gen())
    torch.testing.assert_close(identity, ramp, atol=1e-5, rtol=0)


def test_pipeline_as_data():
    pipeline = A.Augment([("random_crop", dict(size=8, padding=1)), ("horizontal_flip", dict(p=0.5))],
                         mean=(0.5,), std=(0.5,), name="custom")
    assert pipeline.to_dict()["steps"][0] == {"name": "random_crop", "size": 8, "padding": 1}
    assert "custom" in repr(pipeline) and pipeline.output_size((10, 10)) == (8, 8)
    with pytest.raises(ValueError, match="unknown augmentation step"):
        A.Augment([("mixup", {})])
    assert math.isfinite(pipeline(images_float(2, channels=1, size=8), gen()).sum().item())
