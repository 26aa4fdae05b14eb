"""Each method's training loss on a tiny fixed batch equals the paper's formula written out by hand.

The methods compute their losses with fused ops (masked_pixel_loss, relation_loss) behind their forward;
here every loss is recomputed from the method's own weights with plain tensor code that follows
docs/methods.md line by line (MAE §1, RelViT §2, the supervised fine-tune recipe §5.2), so a wrong
normalisation, a mean over the wrong set or a dropped term changes the number. Defaults that carry a
paper value are pinned at the end. Cost: ~2 s on 2 cores.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from vitfast.config import build_config
from vitfast.methods import METHODS, DataInfo
from vitfast.nn import vit_config

TINY = dict(embed_dim=36, depth=1, num_heads=2, mlp_ratio=2.0, patch_size=4, augment="none")
DATA = DataInfo(channels=3, image_size=16, num_classes=5, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def method_and_batch(name, seed=0, **overrides):
    torch.manual_seed(seed)
    method = METHODS[name](build_config(name, "quick", **TINY, **overrides), DATA).train()
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (4, 3, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.tensor([0, 3, 1, 4])
    return method, images, labels


def replay(generator_seed):
    return torch.Generator().manual_seed(generator_seed)


# --- MAE (docs/methods.md §1) -----------------------------------------------------------------------------------

def mae_by_hand(method, x, noise_generator, mask_ratio, norm_pix):
    """MAE's forward and loss as §1 describes them, with the method's weights."""
    encoder, decoder, p = method.model, method.decoder, method.model.patch_size
    batch, channels, height, width = x.shape
    n = (height // p) * (width // p)
    # Masking: N uniform numbers per image, ascending argsort, the first K = int(N (1 - r)) are kept.
    noise = torch.rand(batch, n, generator=noise_generator)
    shuffle = noise.argsort(1)
    restore = shuffle.argsort(1)
    keep = shuffle[:, :int(n * (1 - mask_ratio))]
    mask = torch.ones(batch, n)
    mask.scatter_(1, keep, 0.0)                                       # 1 = removed, original token order
    # Encoder: patch embedding + fixed pos-embed, the visible tokens only, CLS (+ its zero pos slot), blocks, norm.
    tokens = encoder.patch_embed(x) + encoder.pos_embed[:, 1:]
    tokens = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
    cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(batch, -1, -1)
    h = torch.cat([cls, tokens], 1)
    for block in encoder.blocks:
        h = block(h)
    h = decoder.decoder_embed(encoder.norm(h))
    # Decoder: mask tokens appended, unshuffled, decoder pos-embed, blocks, norm, prediction, CLS dropped.
    full = torch.cat([h[:, 1:], decoder.mask_token.expand(batch, n - keep.shape[1], -1)], 1)
    full = torch.gather(full, 1, restore[..., None].expand(-1, -1, full.shape[-1]))
    d = torch.cat([h[:, :1], full], 1) + decoder.decoder_pos_embed
    for block in decoder.decoder_blocks:
        d = block(d)
    pred = decoder.decoder_pred(decoder.decoder_norm(d))[:, 1:]
    # Target: patches in (row-in-patch, column-in-patch, channel) order, each normalised by its own mean and
    # unbiased variance; loss = per-patch MSE over the p*p*C values, mean over the removed patches only.
    target = x.reshape(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 3, 5, 1)
    target = target.reshape(batch, n, p * p * channels)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, unbiased=True, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_is_the_masked_patch_mse(norm_pix):
    method, images, labels = method_and_batch("mae", decoder_dim=16, decoder_depth=1, decoder_heads=2,
                                              norm_pix=norm_pix)
    loss, _ = method(images, labels, torch.arange(4), replay(7))
    x = method.train_views(images, None)  # augment="none": normalisation only, no random draw
    expected = mae_by_hand(method, x, replay(7), 0.75, norm_pix)
    torch.testing.assert_close(loss, expected, rtol=2e-5, atol=0)
    # The mask matters at this tolerance: another draw gives another number.
    assert not math.isclose(loss.item(), mae_by_hand(method, x, replay(8), 0.75, norm_pix).item(), rel_tol=1e-3)


# --- supervised (docs/methods.md §5.2: CE with label smoothing on mixed targets) -----------------------------------

def smoothed_ce(logits, targets, smoothing):
    """Cross-entropy against (1 - eps) * targets + eps / C, mean over the batch (Szegedy et al. 2016)."""
    q = (1 - smoothing) * targets + smoothing / logits.shape[1]
    return -(q * logits.log_softmax(1)).sum(1).mean()


@pytest.mark.parametrize("mixup", [0.0, 0.8])
def test_supervised_loss_is_label_smoothed_ce_on_the_mixed_targets(mixup):
    method, images, labels = method_and_batch("supervised", label_smoothing=0.1, mixup=mixup)
    seen = {}
    method.model.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0], logits=output))
    loss, _ = method(images, labels, torch.arange(4), replay(3))
    clean = method.train_views(images, None)
    # The partner permutation, replayed: mix_batch draws lam's seed, then randperm (its documented order).
    g = replay(3)
    torch.randint(2**62, (), generator=g)
    perm = torch.randperm(4, generator=g)
    assert not torch.equal(perm, torch.arange(4))
    # lambda from the pixels the model saw: x_seen = lam * x + (1 - lam) * x[perm].
    a, b, m = clean.flatten(1), clean[perm].flatten(1), seen["x"].flatten(1)
    lam = float(((m - b) * (a - b)).sum() / ((a - b) ** 2).sum())
    assert (m - (lam * a + (1 - lam) * b)).abs().max() < 1e-5
    if mixup == 0.0:
        assert lam == pytest.approx(1.0, abs=1e-6)
    else:
        assert 0.0 < lam < 1.0
    one_hot = F.one_hot(labels, DATA.num_classes).float()
    expected = smoothed_ce(seen["logits"], lam * one_hot + (1 - lam) * one_hot[perm], 0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


# --- RelViT (docs/methods.md §2) --------------------------------------------------------------------------------

def sign(value):
    return (value > 0) - (value < 0)


def relvit_position_losses(head, z, smoothing):
    """Relation CE over all ordered pairs (diagonal included, 9 classes) + absolute-position CE, weights 1:1."""
    batch, n, dim = z.shape
    side = int(round(n ** 0.5))
    d_h = dim // 9
    q = head.q_proj(z).view(batch, n, 9, d_h)
    k = head.k_proj(z).view(batch, n, 9, d_h)
    total, pairs = 0.0, 0
    for i in range(n):
        for j in range(n):
            r_i, c_i, r_j, c_j = i // side, i % side, j // side, j % side
            label = 3 * (sign(r_i - r_j) + 1) + (sign(c_i - c_j) + 1)  # where i lies relative to j
            logits = (q[:, i] * k[:, j]).sum(-1) / math.sqrt(d_h)                     # [B, 9]
            target = F.one_hot(torch.full((batch,), label), 9).float()
            total = total + smoothed_ce(logits, target, smoothing) * batch
            pairs += batch
    relation = total / pairs
    absolute = smoothed_ce(head.abs_pos(z).flatten(0, 1), F.one_hot(torch.arange(n).repeat(batch), n).float(),
                           smoothing)
    return relation + absolute


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_relvit_upstream_loss_is_relation_plus_absolute_position_ce(smoothing):
    method, images, labels = method_and_batch("relvit", stage="upstream", label_smoothing=smoothing)
    assert method.model.pos_embed is None  # upstream: position must come from content
    loss, _ = method(images, labels, torch.arange(4), replay(0))
    z = method.model.forward_features(method.train_views(images, None))[:, 1:]
    expected = relvit_position_losses(method.head, z, smoothing)
    torch.testing.assert_close(loss, expected, rtol=2e-5, atol=0)


def test_relvit_joint_loss_adds_the_classification_ce():
    method, images, labels = method_and_batch("relvit", stage="joint", label_smoothing=0.1)
    loss, _ = method(images, labels, torch.arange(4), replay(0))
    tokens = method.model.forward_features(method.train_views(images, None))
    # Joint: the position tasks without smoothing, CE on the CLS classifier with the method's smoothing.
    expected = relvit_position_losses(method.head, tokens[:, 1:], 0.0) + \
        smoothed_ce(method.model.forward_head(tokens), F.one_hot(labels, DATA.num_classes).float(), 0.1)
    torch.testing.assert_close(loss, expected, rtol=2e-5, atol=0)


# --- defaults that carry a paper value --------------------------------------------------------------------------

def test_mae_defaults_are_the_papers():
    """docs/methods.md §1: mask ratio 0.75, norm_pix loss, AdamW betas (0.9, 0.95), wd 0.05, lr 1.5e-4 * batch / 256,
    40 warm-up epochs, decoder 512 wide x 8 blocks x 16 heads (paper preset)."""
    defaults = METHODS["mae"].Config()
    assert (defaults.mask_ratio, defaults.norm_pix) == (0.75, True)
    for preset in ("quick", "paper"):
        c = build_config("mae", preset)
        assert (c.method_config.mask_ratio, c.method_config.norm_pix, tuple(c.betas)) == (0.75, True, (0.9, 0.95))
    c = build_config("mae", "paper")
    assert (c.weight_decay, c.base_lr, c.lr, c.warmup_epochs) == (0.05, 1.5e-4, None, 40)
    m = c.method_config
    assert (m.decoder_dim, m.decoder_depth, m.decoder_heads) == (512, 8, 16)


def test_supervised_paper_defaults_are_the_papers():
    """docs/methods.md §5.2 fine-tune recipe: label smoothing 0.1, random erasing p 0.25, drop-path 0.1, AdamW lr 1e-3,
    wd 0.05, 100 epochs, 10 warm-up, AutoAugment on. (Mixup / cutmix details: issue 13.)"""
    c = build_config("supervised", "paper")
    m = c.method_config
    assert (m.label_smoothing, m.random_erasing, m.autoaugment) == (0.1, 0.25, True)
    assert (c.drop_path, c.lr, c.weight_decay, c.epochs, c.warmup_epochs) == (0.1, 1e-3, 0.05, 100, 10)
    assert METHODS["supervised"].Config().label_smoothing == 0.0  # plain CE unless a preset asks


def test_relvit_defaults_are_the_papers():
    """docs/methods.md §2: no label smoothing on the position tasks, relation and absolute losses 1:1, d_h = D // 9;
    paper preset ViT-S (384 / 12 / 6) with patch 4, AdamW lr 5e-4, wd 0.1, batch 256, grad-clip 1.0,
    100 upstream + 100 fine-tune epochs."""
    assert METHODS["relvit"].Config().label_smoothing == 0.0
    method = METHODS["relvit"](build_config("relvit", "quick", **TINY), DATA)
    head = method.head
    assert (head.relation_weight, head.absolute_weight, head.label_smoothing, head.head_dim) == (1.0, 1.0, 0.0, 4)
    c = build_config("relvit", "paper")
    small = vit_config(c.model)
    assert (small["embed_dim"], small["depth"], small["num_heads"], c.patch_size) == (384, 12, 6, 4)
    assert (c.lr, c.weight_decay, c.batch_size, c.grad_clip) == (5e-4, 0.1, 256, 1.0)
    assert c.stage_overrides["upstream"]["epochs"] == 100 and c.stage_overrides["finetune"]["epochs"] == 100
