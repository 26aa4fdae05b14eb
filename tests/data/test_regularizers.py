"""vitfast.data.regularizers: mixup / cutmix, random erasing, AutoAugment (the supervised recipe's batch steps)."""
import torch

from vitfast.data import autoaugment, mix_batch, random_erasing


def test_mixup_and_cutmix_keep_label_mass():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 32, 32)
    targets = torch.nn.functional.one_hot(torch.arange(8) % 10, 10).float()
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        mixed, soft = mix_batch(images, targets, mixup, cutmix, gen)
        assert mixed.shape == images.shape
        torch.testing.assert_close(soft.sum(1), torch.ones(8))
    same, same_targets = mix_batch(images, targets, 0.0, 0.0, gen)
    assert same is images and same_targets is targets


def test_mixup_is_the_convex_combination_with_a_permutation_of_the_batch():
    """Mixup alone: image i = lam·x_i + (1 - lam)·x_perm[i], perm = randperm(B) drawn after lam, same lam in the
    targets."""
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(6, 1, 8, 8)
    targets = torch.nn.functional.one_hot(torch.arange(6), 6).float()
    replay = torch.Generator()
    replay.set_state(gen.get_state())
    torch.randint(2**62, (), generator=replay)  # lam's seed
    perm = torch.randperm(6, generator=replay)
    mixed, soft = mix_batch(images, targets, 0.8, 0.0, gen)
    lam = soft[0, 0].item() if perm[0] != 0 else soft[1, 1].item()
    assert 0.0 <= lam <= 1.0
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images[perm])
    assert not torch.equal(perm, torch.arange(5, -1, -1))  # not the old reversed pairing


def test_cutmix_pastes_one_box_and_weights_targets_by_its_area():
    gen = torch.Generator().manual_seed(1)
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 16, 16).contiguous()
    targets = torch.nn.functional.one_hot(torch.arange(4), 4).float()
    mixed, soft = mix_batch(images, targets, 0.0, 1.0, gen)
    moved = [i for i in range(4) if (mixed[i] != i).any()]  # image i is constant i: a pasted box shows its partner
    assert moved
    for i in moved:
        source = int(mixed[i][mixed[i] != i][0])
        pasted = (mixed[i] == images[source]).float().mean().item()  # sample i received pixels of its partner
        torch.testing.assert_close(soft[i, i].item(), 1 - pasted)
        torch.testing.assert_close(soft[i, source].item(), pasted)


def test_random_erasing_probability_extremes():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 32, 32)
    assert torch.equal(random_erasing(images, 0.0, gen), images)
    erased = random_erasing(images, 1.0, gen)
    changed = (erased != images).flatten(1).any(1)
    assert changed.all()


def test_autoaugment_keeps_shape_and_dtype():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    out = autoaugment(images, "cifar10", torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)
