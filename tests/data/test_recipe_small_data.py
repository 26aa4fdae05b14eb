"""The small-data ViT fine-tune recipe as released (docs/methods.md §5.2; issue 13 item 1).

Each value of ``--method supervised --preset paper`` through --print-config, and each through the code that uses
it: repeated augmentation (3 passes per epoch, resumable), mixing on about half the batches with a permutation
partner, AutoAugment per image with the dataset's policy (every operation against Pillow), random erasing as
released (box statistics against the release's algorithm written out, fill value, before mixing).
Cost: about 15 s on 2 loaded CPU cores (tiny models, 32-px images).
"""
import importlib
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitfast.config import build_config
from vitfast.data import BatchLoader, ImageDataset
from vitfast.data.regularizers import mix_batch, random_erasing
from vitfast.methods import DataInfo, Supervised

aa = importlib.import_module("vitfast.data.autoaugment")  # the module (vitfast.data.autoaugment is the function)
DATA = DataInfo(channels=3, image_size=32, num_classes=10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))


def tiny(**overrides):
    values = dict(embed_dim=32, depth=1, num_heads=2, patch_size=8, drop_path=0.0)
    values.update(overrides)
    return build_config("supervised", "paper", **values)


# ------------------------------------------------------------------------------------------- preset values

def test_paper_preset_prints_the_released_values(capsys):
    from vitfast.train import main  # what train.py runs
    assert main(["--method", "supervised", "--preset", "paper", "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    m = config["method_config"]
    assert (config["batch_size"], config["lr"], config["weight_decay"], config["epochs"], config["warmup_epochs"],
            config["drop_path"], config["model"]) == (256, 1e-3, 0.05, 100, 10, 0.1, "small_data")
    assert (m["repeated_augmentation"], m["mix_prob"], m["mixup"], m["cutmix"], m["label_smoothing"],
            m["random_erasing"], m["autoaugment"], m["autoaugment_policy"]) == (3, 0.5, 1.0, 1.0, 0.1, 0.25, True,
                                                                                 "auto")


# ------------------------------------------------------------------------------------- repeated augmentation

def toy_dataset(n=50):
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageDataset("toy", images, torch.arange(n) % 10, 10, [str(i) for i in range(10)], (0.5,), (0.25,))


def test_repeated_augmentation_epoch_is_three_passes():
    data = toy_dataset(50)
    single, triple = BatchLoader(data, 8, seed=2), BatchLoader(data, 8, seed=2, repeats=3)
    assert (len(single), len(triple)) == (50 // 8, 150 // 8)
    order = triple.order(0)
    passes = order.view(3, 50)
    assert all(sorted(p.tolist()) == list(range(50)) for p in passes)  # each pass is a permutation
    assert torch.equal(passes[0], single.order(0))                     # pass 0: the one-pass order
    assert not torch.equal(passes[1], passes[0]) and not torch.equal(passes[2], passes[1])
    ids = torch.cat([i for _, _, i in triple])
    assert torch.equal(ids, order[:len(triple) * 8])                   # batches run across pass boundaries
    assert torch.equal(triple.order(1).view(3, 50)[0], single.order(1))
    assert torch.equal(order, BatchLoader(data, 8, seed=2, repeats=3).order(0))  # a pure function of the seed
    with pytest.raises(ValueError, match="repeats"):
        BatchLoader(data, 8, repeats=0)


def test_repeated_augmentation_resumes_mid_epoch_and_splits_over_ranks():
    data = toy_dataset(50)
    full = [i.tolist() for _, _, i in BatchLoader(data, 8, seed=5, repeats=3)]
    first = BatchLoader(data, 8, seed=5, repeats=3)
    it = iter(first)
    head = [next(it)[2].tolist() for _ in range(7)]  # past the first pass boundary (batch 6 spans it)
    resumed = BatchLoader(data, 8, seed=5, repeats=3)
    resumed.load_state_dict(first.state_dict())
    assert head + [i.tolist() for _, _, i in resumed] == full
    ranks = [BatchLoader(data, 4, seed=5, repeats=3, rank=r, world_size=2) for r in range(2)]
    assert [a.tolist() + b.tolist() for (_, _, a), (_, _, b) in zip(*ranks)] == full


def test_trainer_epoch_has_three_times_the_steps(tmp_path):
    from vitfast.engine import Trainer
    config = build_config("supervised", "quick", embed_dim=32, depth=1, num_heads=2, patch_size=8, batch_size=64,
                          out=str(tmp_path / "run"), progress=False)
    plain = Trainer(config)
    repeated = Trainer(build_config("supervised", "quick", embed_dim=32, depth=1, num_heads=2, patch_size=8,
                                    batch_size=64, repeated_augmentation=3, out=str(tmp_path / "ra"), progress=False))
    assert len(repeated.loader) == 3 * len(repeated.loader.dataset) // repeated.loader.global_batch
    assert repeated.steps_per_epoch == len(repeated.loader) >= 3 * plain.steps_per_epoch


# ---------------------------------------------------------------------------------------------------- mixing

def test_half_the_batches_are_mixed_with_a_permutation_partner():
    gen = torch.Generator().manual_seed(0)
    images = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 4, 4).contiguous()  # image i is constant i
    targets = F.one_hot(torch.arange(8), 8).float()
    mixed_count, partners_reversed, cutmix_count = 0, 0, 0
    for _ in range(400):
        x, t = mix_batch(images, targets, 1.0, 1.0, gen, probability=0.5)
        if x is images:
            assert t is targets
            continue
        mixed_count += 1
        partner = t.masked_fill(targets.bool(), 0).argmax(1)           # the other label of each row
        lam = t[torch.arange(8), torch.arange(8)]
        cutmix_count += int(not torch.allclose(x[:, 0, 0, 0], x[:, 0].mean((1, 2))))  # a box: not uniform
        assert sorted(partner[lam < 1].tolist()) == sorted(set(partner[lam < 1].tolist()))  # a permutation
        partners_reversed += int(torch.equal(partner, torch.arange(7, -1, -1)))
        torch.testing.assert_close(t.sum(1), torch.ones(8))
    # Binomial(400, 0.5): sd 10; the bounds are 4 sd.
    assert 160 <= mixed_count <= 240
    assert 0.3 * mixed_count <= cutmix_count <= 0.7 * mixed_count  # cutmix or mixup with equal odds
    assert partners_reversed < 3


def test_label_smoothing_combines_as_the_release():
    """The release: lam·LS(out, y_a) + (1 − lam)·LS(out, y_b), LS = timm's LabelSmoothingCrossEntropy(0.1)."""
    torch.manual_seed(0)
    logits, lam = torch.randn(6, 10), 0.37
    y_a, y_b = torch.randint(0, 10, (6,)), torch.randint(0, 10, (6,))

    def ls(out, y, eps=0.1):
        logp = out.log_softmax(-1)
        return ((1 - eps) * -logp.gather(1, y[:, None])[:, 0] + eps * -logp.mean(-1)).mean()

    release = lam * ls(logits, y_a) + (1 - lam) * ls(logits, y_b)
    soft = lam * F.one_hot(y_a, 10).float() + (1 - lam) * F.one_hot(y_b, 10).float()
    torch.testing.assert_close(F.cross_entropy(logits, soft, label_smoothing=0.1), release)


def test_supervised_mixes_about_half_the_batches():
    config = tiny(autoaugment=False, random_erasing=0.0, augment="none")
    method = Supervised(config, DATA)
    seen = {}
    method.model.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0]))
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    clean = method.train_views(images, None)
    gen = torch.Generator().manual_seed(1)
    plain = 0
    with torch.no_grad():
        for _ in range(100):
            method(images, torch.arange(8), torch.arange(8), gen)
            plain += int(torch.equal(seen["x"], clean))
    assert 30 <= plain <= 70  # Binomial(100, 0.5), 4 sd


# ------------------------------------------------------------------------------------------------ AutoAugment

def test_policy_depends_on_the_dataset():
    assert [aa.policy_for_dataset(d) for d in ("cifar10", "cifar100", "digits", "shapes", "svhn", "stl10", "tiny")] \
        == ["cifar10", "cifar10", "cifar10", "cifar10", "svhn", "imagenet", "imagenet"]
    assert Supervised(tiny(dataset="svhn"), DATA).autoaugment_policy == "svhn"
    assert Supervised(tiny(dataset="cifar100"), DATA).autoaugment_policy == "cifar10"
    assert Supervised(tiny(dataset="stl10"), DATA).autoaugment_policy == "imagenet"
    assert Supervised(tiny(dataset="svhn", autoaugment_policy="imagenet"), DATA).autoaugment_policy == "imagenet"
    # The tables: 25 pairs each; spot values of the release's utils/autoaug.py and its magnitude bins.
    assert [len(aa.POLICIES[p]) for p in ("cifar10", "svhn", "imagenet")] == [25, 25, 25]
    assert aa.POLICIES["cifar10"][0] == (0.1, "invert", 7, 0.2, "contrast", 6)
    assert aa.POLICIES["svhn"][0] == (0.9, "shearX", 4, 0.2, "invert", 3)
    assert aa.POLICIES["imagenet"][0] == (0.4, "posterize", 8, 0.6, "rotate", 9)
    assert [aa.MAGNITUDES["posterize"](m) for m in range(10)] == list(np.round(np.linspace(8, 4, 10)))
    assert aa.MAGNITUDES["solarize"](9) == 0 and aa.MAGNITUDES["rotate"](9) == 30
    assert math.isclose(aa.MAGNITUDES["translateX"](9), 150 / 331)


def test_each_image_draws_its_own_sub_policy_and_gets_its_own_ops():
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    out = aa.autoaugment(images, "cifar10", gen)
    sub, codes, mags = aa.draw_sub_policies(12, "cifar10", torch.Generator().manual_seed(3), "cpu")
    assert len(set(sub.tolist())) > 3  # one batch, several sub-policies
    for i in range(12):  # the grouped batch equals each image's own two operations in order
        expected = images[i:i + 1]
        for slot in range(2):
            if codes[i, slot] >= 0:
                expected = aa.apply_op(expected, aa.OPS[codes[i, slot]], mags[i, slot:slot + 1])
        assert torch.equal(out[i:i + 1], expected)
    assert (codes[:, 0] == -1).any() and (codes >= 0).any()


def _pil_reference(op, image, m):
    """The release's operation (utils/transforms.py) on one PIL image, written out."""
    from PIL import Image, ImageEnhance, ImageOps
    grey = (128, 128, 128)
    if op == "shearX":
        return image.transform(image.size, Image.AFFINE, (1, m, 0, 0, 1, 0), Image.BICUBIC, fillcolor=grey)
    if op == "shearY":
        return image.transform(image.size, Image.AFFINE, (1, 0, 0, m, 1, 0), Image.BICUBIC, fillcolor=grey)
    if op == "translateX":
        return image.transform(image.size, Image.AFFINE, (1, 0, m * image.size[0], 0, 1, 0), fillcolor=grey)
    if op == "translateY":
        return image.transform(image.size, Image.AFFINE, (1, 0, 0, 0, 1, m * image.size[1]), fillcolor=grey)
    if op == "rotate":
        rot = image.convert("RGBA").rotate(m)
        return Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert("RGB")
    enhance = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast, "sharpness": ImageEnhance.Sharpness,
               "brightness": ImageEnhance.Brightness}
    if op in enhance:
        return enhance[op](image).enhance(1 + m)
    return {"posterize": lambda: ImageOps.posterize(image, int(m)), "solarize": lambda: ImageOps.solarize(image, m),
            "autocontrast": lambda: ImageOps.autocontrast(image), "equalize": lambda: ImageOps.equalize(image),
            "invert": lambda: ImageOps.invert(image)}[op]()


@pytest.mark.parametrize("op", aa.OPS)
def test_every_operation_matches_pillow(op):
    pytest.importorskip("PIL")
    from PIL import Image
    torch.manual_seed(aa.OPS.index(op))
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    images[:, :, 8:24, 8:24] //= 2
    if op == "autocontrast":
        images = images // 2 + 40
    bins = (9, 4, 1)
    mags = torch.tensor([aa.MAGNITUDES[op](b) * (-1 if op in aa.SIGNED and k == 1 else 1)
                         for k, b in enumerate(bins)])
    ours = aa.apply_op(images, op, mags)
    for i in range(3):
        pil = Image.fromarray(images[i].permute(1, 2, 0).numpy())
        ref = torch.from_numpy(np.array(_pil_reference(op, pil, float(mags[i])).convert("RGB"))).permute(2, 0, 1)
        diff = (ours[i].int() - ref.int()).abs()
        if op == "rotate":  # pixels on the rim of the rotated image may fall either side
            assert (diff > 1).float().mean() < 0.01
        else:
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


def test_autoaugment_runs_after_crop_and_flip_in_the_supervised_step():
    """With AutoAugment forced to invert every image, the model sees 255 − (the cropped, flipped bytes)."""
    config = tiny(random_erasing=0.0, mixup=0.0, cutmix=0.0)
    method = Supervised(config, DATA)
    method.autoaugment_policy = "test-invert"
    aa.POLICIES["test-invert"] = ((1.0, "invert", 0, 0.0, "invert", 0),)
    try:
        seen = {}
        method.model.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0]))
        images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        with torch.no_grad():
            method(images, torch.arange(4), torch.arange(4), torch.Generator().manual_seed(7))
        geometry = method.geometry(images, torch.Generator().manual_seed(7))  # the same draws come first
        expected = method.train_views.__class__([], DATA.mean, DATA.std)(1 - geometry)
        torch.testing.assert_close(seen["x"], expected, atol=1e-5, rtol=0)
        assert not torch.allclose(geometry, method.geometry(images, torch.Generator().manual_seed(8)))
    finally:
        del aa.POLICIES["test-invert"]


# ------------------------------------------------------------------------------------------- random erasing

def _release_box(height, width, rng, p=0.25, sh=0.4, r1=0.3):
    """utils/random_erasing.py of the release, written out: the (h, w) it erases, or None."""
    if rng.uniform(0, 1) > p:
        return None
    for _ in range(100):
        area = rng.uniform(0.02, sh) * height * width
        aspect = rng.uniform(r1, 1 / r1)
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if w < width and h < height:
            return h, w
    return None


def test_random_erasing_box_statistics_and_fill_match_the_release():
    n, size = 4000, 32
    fill = (0.49, 0.48, 0.45)
    images = torch.full((n, 3, size, size), -7.0)
    out = random_erasing(images, 0.25, torch.Generator().manual_seed(0), fill=fill)
    erased = out != images
    boxes = erased.any(1)
    assert torch.equal(erased, boxes.unsqueeze(1).expand_as(erased))  # all channels or none
    for c, value in enumerate(fill):
        assert torch.all(out[:, c][boxes] == value)                     # the mean in [0, 1] units, as it is
    rows, cols = boxes.any(2).sum(1).float(), boxes.any(1).sum(1).float()
    hit = rows > 0
    assert torch.equal(boxes.sum((1, 2)).float()[hit], (rows * cols)[hit])  # one rectangle
    rng = random.Random(0)
    ref = [b for b in (_release_box(size, size, rng) for _ in range(40000)) if b is not None]
    ref_area = np.mean([h * w for h, w in ref]) / size ** 2
    ref_aspect = np.mean([h / w for h, w in ref])
    assert abs(hit.float().mean().item() - len(ref) / 40000) < 0.03           # rate 0.25
    assert abs((rows * cols)[hit].mean().item() / size ** 2 - ref_area) < 0.015  # mean area ~0.2 of the image
    assert abs((rows / cols)[hit].mean().item() - ref_aspect) < 0.1
    assert (rows * cols)[hit].max() / size ** 2 > 0.33  # up to 40 %, not the old 33 %


def test_random_erasing_comes_before_mixing_in_the_supervised_step():
    """Erasing every image and mixing every batch (mixup): the erased boxes reach the model mixed, not as the fill."""
    config = tiny(autoaugment=False, random_erasing=1.0, mixup=1.0, cutmix=0.0, mix_prob=1.0, augment="none")
    method = Supervised(config, DATA)
    seen = {}
    method.model.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0]))
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        method(images, torch.arange(8), torch.arange(8), torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(2)
    erased = random_erasing(method.train_views(images, None), 1.0, gen, fill=DATA.mean)
    mixed, _ = mix_batch(erased, F.one_hot(torch.arange(8), 10).float(), 1.0, 0.0, gen)
    torch.testing.assert_close(seen["x"], mixed)
