"""vitfast.nn.ViT: timm names, token paths (full / masked / wrong positions), pos-embeds, configs, errors,
attention backends, drop-path, torch.compile parity. Tolerances: the TOLERANCES table in conftest.py."""
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitfast
from vitfast.nn import VIT_CONFIGS, ViT, resample_pos_embed, sincos_2d_pos_embed, vit_config

# A model that runs in milliseconds: 16 px images, patch 4 -> a 4x4 grid, N = 16.
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def make_model(seed=0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    return ViT(**{**TINY, **overrides}).to(dtype)


def make_images(batch=3, size=16, channels=3, dtype=torch.float32, seed=1):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def random_keep(batch, num_patches, kept, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_patches, generator=gen)[:kept] for _ in range(batch)])


def reference_features(model, images, keep_idx=None, pos_idx=None):
    """The spec in plain PyTorch: conv-embed every patch, gather, add pos_embed[1 + pos_idx], CLS, blocks, norm."""
    batch = images.shape[0]
    embedded = model.patch_embed.proj(images).flatten(2).transpose(1, 2)  # [B, N, D]
    n = embedded.shape[1]
    if keep_idx is None:
        keep_idx = torch.arange(n).expand(batch, n)
    if pos_idx is None:
        pos_idx = keep_idx
    tokens = torch.gather(embedded, 1, keep_idx[..., None].expand(-1, -1, embedded.shape[-1]))
    cls = model.cls_token.expand(batch, -1, -1)
    if model.pos_embed is not None:
        tokens = tokens + model.pos_embed[0, 1:][pos_idx]
        cls = cls + model.pos_embed[:, :1]
    x = torch.cat([cls, tokens], dim=1)
    for block in model.blocks:
        x = block(x)
    return model.norm(x)


# ------------------------------------------------------------------------------- parameter names

def expected_timm_names(depth, with_pos=True, with_head=True):
    names = ["cls_token"] + (["pos_embed"] if with_pos else []) + ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            names += [f"blocks.{i}.{layer}.weight", f"blocks.{i}.{layer}.bias"]
    names += ["norm.weight", "norm.bias"] + (["head.weight", "head.bias"] if with_head else [])
    return names


def test_parameter_names_and_shapes_match_timm():
    model = make_model(num_classes=5)
    assert list(model.state_dict()) == expected_timm_names(2)
    assert [name for name, _ in model.named_parameters()] == expected_timm_names(2)
    d, n = 32, 16
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes["cls_token"] == (1, 1, d) and shapes["pos_embed"] == (1, 1 + n, d)
    assert shapes["patch_embed.proj.weight"] == (d, 3, 4, 4)
    assert shapes["blocks.1.attn.qkv.weight"] == (3 * d, d) and shapes["blocks.1.attn.qkv.bias"] == (3 * d,)
    assert shapes["blocks.0.mlp.fc1.weight"] == (2 * d, d) and shapes["blocks.0.mlp.fc2.weight"] == (d, 2 * d)
    assert shapes["head.weight"] == (5, d)
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    # num_classes=0: head is an Identity; "none": no pos_embed key at all (RelViT upstream).
    bare = make_model(num_classes=0, pos_embed_kind="none")
    assert list(bare.state_dict()) == expected_timm_names(2, with_pos=False, with_head=False)
    assert isinstance(bare.head, torch.nn.Identity) and bare.pos_embed is None
    assert not make_model(qkv_bias=False).state_dict().keys() & {"blocks.0.attn.qkv.bias"}


@pytest.mark.parametrize("kind", ["learned", "sincos", "none"])
def test_state_dict_round_trip(kind):
    source = make_model(seed=0, pos_embed_kind=kind, num_classes=4)
    target = make_model(seed=1, pos_embed_kind=kind, num_classes=4)
    images = make_images()
    assert not torch.equal(source(images), target(images))
    target.load_state_dict(source.state_dict())  # strict
    torch.testing.assert_close(target(images), source(images), rtol=0, atol=0)
    if kind == "sincos":  # MAE stores the fixed table as a frozen Parameter named pos_embed
        assert "pos_embed" in source.state_dict() and not target.pos_embed.requires_grad


def test_properties():
    model = ViT(img_size=(16, 24), patch_size=4, embed_dim=32, depth=1, num_heads=2)
    assert model.patch_size == 4 and model.grid_size == (4, 6) and model.num_patches == 24
    assert model.embed_dim == 32 and model.img_size == (16, 24)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}


# -------------------------------------------------------------------------------- sin-cos table

def mae_sincos_numpy(dim, size):
    """MAE's get_2d_sincos_pos_embed written out with numpy, meshgrid(grid_w, grid_h) and all."""
    grid = np.stack(np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32)), axis=0)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def test_sincos_matches_mae_layout():
    dim, size = 32, 5
    table = sincos_2d_pos_embed(dim, size, cls_token=True)
    assert table.shape == (1 + size * size, dim) and table.dtype == torch.float32
    assert torch.equal(table[0], torch.zeros(dim))  # the CLS slot
    torch.testing.assert_close(table[1:], torch.from_numpy(mae_sincos_numpy(dim, size)).float(), rtol=0, atol=0)
    assert table.abs().max() <= 1.0


def test_sincos_halves_encode_column_then_row():
    dim, rows, cols = 16, 3, 5  # non-square on purpose: rows and columns cannot be confused
    quarter = dim // 4
    table = sincos_2d_pos_embed(dim, (rows, cols)).double()
    r = torch.arange(rows * cols) // cols
    c = torch.arange(rows * cols) % cols
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    torch.testing.assert_close(table[:, 0 * quarter:1 * quarter], torch.sin(c[:, None] * omega), atol=1e-7, rtol=0)
    torch.testing.assert_close(table[:, 1 * quarter:2 * quarter], torch.cos(c[:, None] * omega), atol=1e-7, rtol=0)
    torch.testing.assert_close(table[:, 2 * quarter:3 * quarter], torch.sin(r[:, None] * omega), atol=1e-7, rtol=0)
    torch.testing.assert_close(table[:, 3 * quarter:4 * quarter], torch.cos(r[:, None] * omega), atol=1e-7, rtol=0)
    # The first half depends on the column only; the second half on the row only.
    grid = table.reshape(rows, cols, dim)
    assert torch.equal(grid[0, :, : dim // 2], grid[2, :, : dim // 2])
    assert torch.equal(grid[:, 0, dim // 2:], grid[:, 4, dim // 2:])
    assert not torch.equal(grid[0, 0, : dim // 2], grid[0, 1, : dim // 2])


def test_pos_embed_kinds():
    learned, sincos, none = (make_model(pos_embed_kind=k) for k in ("learned", "sincos", "none"))
    assert learned.pos_embed.requires_grad and 0.01 < learned.pos_embed.std().item() < 0.03
    assert not sincos.pos_embed.requires_grad
    sincos(make_images()).sum().backward()
    assert sincos.pos_embed.grad is None and sincos.cls_token.grad is not None
    assert torch.equal(sincos.pos_embed[0], sincos_2d_pos_embed(32, 4, cls_token=True))
    assert none.pos_embed is None
    # "none": the output does not depend on where a patch sits (no position information enters).
    images = make_images()
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    out = none.forward_features(images, perm.expand(3, 16))
    torch.testing.assert_close(out[:, 1:], none.forward_features(images)[:, 1:][:, perm], atol=1e-5, rtol=1e-5)


def test_enable_pos_embed_after_relvit_upstream():
    upstream = make_model(pos_embed_kind="none", num_classes=0)
    upstream.enable_pos_embed("learned").reset_classifier(10)
    assert upstream.pos_embed_kind == "learned" and upstream.pos_embed.shape == (1, 17, 32)
    assert "pos_embed" in dict(upstream.named_parameters())
    assert upstream(make_images()).shape == (3, 10)
    assert list(upstream.state_dict()) == expected_timm_names(2)  # pos_embed lands in timm's slot
    with pytest.raises(ValueError, match="pos_embed_kind='learned'"):
        upstream.enable_pos_embed("sincos")
    fixed = make_model(pos_embed_kind="none").enable_pos_embed("sincos")
    assert torch.equal(fixed.pos_embed[0], sincos_2d_pos_embed(32, 4, cls_token=True))


# -------------------------------------------------------------------------------- token paths

def test_output_shapes():
    model = make_model(num_classes=7)
    images = make_images(batch=3)
    assert model.forward_features(images).shape == (3, 17, 32)
    keep = random_keep(3, 16, 5)
    assert model.forward_features(images, keep).shape == (3, 6, 32)
    assert model(images).shape == (3, 7) and model(images, keep).shape == (3, 7)
    assert model.forward_head(model.forward_features(images), pre_logits=True).shape == (3, 32)


@pytest.mark.parametrize("kind", ["learned", "sincos", "none"])
def test_full_path_matches_reference(kind, assert_close):
    model = make_model(pos_embed_kind=kind, dtype=torch.float64)
    images = make_images(dtype=torch.float64)
    assert_close(model.forward_features(images), reference_features(model, images), torch.float64, "full")


@pytest.mark.parametrize("kind", ["learned", "sincos"])
def test_keep_all_in_order_equals_full_path(kind, assert_close):
    model = make_model(pos_embed_kind=kind)
    images = make_images()
    everything = torch.arange(16).expand(3, 16)
    full = model.forward_features(images)
    assert_close(model.forward_features(images, everything), full, torch.float32, "keep all")
    assert_close(model.forward_features(images, pos_idx=everything), full, torch.float32, "pos_idx only")
    # Keeping every patch in a shuffled order permutes the patch tokens and changes nothing else.
    perm = random_keep(3, 16, 16)
    shuffled = model.forward_features(images, perm)
    assert_close(shuffled[:, 0], full[:, 0], torch.float32, "cls")
    permuted = torch.gather(full[:, 1:], 1, perm[..., None].expand(-1, -1, 32))
    assert_close(shuffled[:, 1:], permuted, torch.float32, "perm")


@pytest.mark.parametrize("kind", ["learned", "sincos", "none"])
def test_masked_and_wrong_positions_match_reference(kind, assert_close):
    model = make_model(pos_embed_kind=kind, dtype=torch.float64)
    images = make_images(dtype=torch.float64)
    keep = random_keep(3, 16, 5, seed=3)
    pos = random_keep(3, 16, 5, seed=4)  # DILEMMA-style: positions unrelated to the kept patches
    assert_close(model.forward_features(images, keep), reference_features(model, images, keep), torch.float64, "masked")
    assert_close(model.forward_features(images, keep, pos), reference_features(model, images, keep, pos),
                 torch.float64, "wrong positions")


def test_corrupted_tokens_carry_the_wrong_position_embedding():
    """DILEMMA: the token entering block 0 is patch keep_idx[k] embedded plus pos_embed of pos_idx[k]."""
    model = make_model(dtype=torch.float64)
    images = make_images(dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    keep, _, _, shuffle = vitfast.ops.random_masking(3, 16, 0.75, generator=gen, return_shuffle=True)
    pos, corrupted = vitfast.ops.corrupt_positions(shuffle, keep.shape[1], probability=0.5, generator=gen)
    assert corrupted.any() and (pos != keep).any()
    seen = {}
    handle = model.blocks[0].register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    model.forward_features(images, keep, pos)
    handle.remove()
    embedded = model.patch_embed.proj(images).flatten(2).transpose(1, 2)
    patches = torch.gather(embedded, 1, keep[..., None].expand(-1, -1, 32))
    table = model.pos_embed[0, 1:]
    torch.testing.assert_close(seen["x"][:, 1:], patches + table[pos], atol=1e-12, rtol=0)
    wrong = corrupted.bool()
    assert not torch.allclose(seen["x"][:, 1:][wrong], (patches + table[keep])[wrong])


def test_global_pool_avg():
    model = make_model(global_pool="avg", num_classes=0)
    images = make_images()
    tokens = model.forward_features(images)
    torch.testing.assert_close(model(images), tokens[:, 1:].mean(1))
    cls_pooled = make_model(num_classes=0)  # default global_pool="token": the CLS token
    torch.testing.assert_close(cls_pooled(images), cls_pooled.forward_features(images)[:, 0])


@pytest.mark.parametrize("method", ["dino", "mae"])
def test_dynamic_img_size_resamples_the_pos_embed(method):
    model = make_model(dynamic_img_size=True, pos_embed_resample=method)  # built for 16 px: a 4x4 grid
    grid = model.pos_embed[0, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    if method == "dino":  # DINO's interpolate_pos_encoding: bicubic with scale_factor (new + 0.1) / old
        resampled = F.interpolate(grid, scale_factor=(2.1 / 4, 2.1 / 4), mode="bicubic")
    else:  # MAE's interpolate_pos_embed
        resampled = F.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False)
    resampled = resampled.permute(0, 2, 3, 1).reshape(4, 32)
    torch.testing.assert_close(resample_pos_embed(model.pos_embed[0, 1:], 4, 2, method=method), resampled,
                               rtol=0, atol=0)
    # 8-px local crops: the tokens entering block 0 carry the resampled table.
    small = make_images(size=8)
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    assert model.forward_features(small).shape == (3, 1 + 4, 32)
    embedded = model.patch_embed.proj(small).flatten(2).transpose(1, 2)
    torch.testing.assert_close(seen["x"][:, 1:], embedded + resampled, atol=1e-6, rtol=1e-6)
    big = make_images(size=24)
    keep = random_keep(3, 36, 7)
    assert model.forward_features(big, keep).shape == (3, 8, 32)
    assert torch.equal(resample_pos_embed(model.pos_embed[0, 1:], 4, 4), model.pos_embed[0, 1:])


# ------------------------------------------------------------------------ attention, drop-path

def test_attention_impls_agree(assert_close):
    model = make_model(dtype=torch.float64)
    images = make_images(dtype=torch.float64)
    sdpa = model.forward_features(images)
    assert_close(model.set_attn_impl("math").forward_features(images), sdpa, torch.float64, "math vs sdpa")


def test_xformers_missing_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # importing it now raises ImportError
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    with pytest.raises(ImportError, match='attn_impl="xformers" needs the xformers package'):
        make_model(attn_impl="xformers")


def test_xformers_path_layout(monkeypatch, assert_close):
    """The xformers branch hands [B, N, heads, head_dim] tensors over; a stand-in module checks the plumbing."""
    calls = []

    def memory_efficient_attention(q, k, v, p=0.0, scale=None):
        calls.append(q.shape)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)

    fake = types.ModuleType("xformers")
    fake.ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake.ops)
    model = make_model(dtype=torch.float64)
    images = make_images(dtype=torch.float64)
    expected = model.forward_features(images)
    assert_close(model.set_attn_impl("xformers").forward_features(images), expected, torch.float64, "xformers")
    assert calls and calls[0] == (3, 17, 2, 16)


def test_drop_path_train_vs_eval():
    model = make_model(depth=4, drop_path_rate=0.3)
    rates = [b.drop_path1.drop_prob for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])  # linear in depth
    plain = make_model(depth=4, drop_path_rate=0.0)
    plain.load_state_dict(model.state_dict())
    images = make_images(batch=8)
    torch.manual_seed(0)
    first, second = model(images), model(images)
    assert not torch.allclose(first, second)  # fresh per-sample masks each call
    model.eval()
    torch.testing.assert_close(model(images), plain.eval()(images), rtol=0, atol=0)


def test_grad_checkpointing_same_values_and_grads():
    model = make_model(num_classes=3)
    images = make_images()
    keep = random_keep(3, 16, 6)
    loss = model(images, keep).square().sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    model.set_grad_checkpointing(True)
    loss2 = model(images, keep).square().sum()
    grads2 = torch.autograd.grad(loss2, list(model.parameters()))
    torch.testing.assert_close(loss2, loss)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g2, g)


# -------------------------------------------------------------------------------------- configs

def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def test_small_data_config():
    model = ViT.small_data(num_classes=10)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (192, 9, 12)
    assert model.blocks[0].mlp.fc1.out_features == 384 and model.patch_size == 4
    assert model.img_size == (32, 32) and model.num_patches == 64
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    d, n, hidden = 192, 64, 384
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
    expected = (d * 3 * 16 + d) + d + (1 + n) * d + 9 * block + 2 * d + (d * 10 + 10)
    assert parameter_count(model) == expected == 2_697_610  # about 2.7 M, as Gani et al. report
    assert ViT.small_data(img_size=64, patch_size=8).num_patches == 64  # their 64-px setting


@pytest.mark.parametrize("name,count", [("tiny", 5_717_416), ("small", 22_050_664), ("base", 86_567_656)])
def test_paper_configs_match_timm_parameter_counts(name, count):
    """DeiT-Ti / DeiT-S / ViT-B/16 with a 1000-class head (timm's published counts), built on meta."""
    with torch.device("meta"):
        model = getattr(ViT, name)(num_classes=1000)
    assert parameter_count(model) == count
    assert vit_config(name) == VIT_CONFIGS[name] and vit_config(name) is not VIT_CONFIGS[name]
    assert ViT.from_config(name, depth=1, img_size=32, patch_size=16).embed_dim == VIT_CONFIGS[name]["embed_dim"]


def test_mae_weight_init():
    model = make_model(weight_init="mae")
    qkv = model.blocks[0].attn.qkv.weight
    bound = math.sqrt(6.0 / (qkv.shape[0] + qkv.shape[1]))  # Xavier-uniform over the fused [3D, D] weight
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.8 * bound
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)


# --------------------------------------------------------------------------------------- errors

def _bad_inputs():
    images = make_images()
    keep = random_keep(3, 16, 4)
    return [
        ("images", "4-D", dict(images=images[0])),
        ("images", "in_chans=3", dict(images=make_images(channels=1))),
        ("images", "floating-point", dict(images=images.to(torch.uint8))),
        ("images", "divisible by patch_size=4", dict(images=torch.randn(3, 3, 18, 18))),
        ("images", "dynamic_img_size=True", dict(images=make_images(size=20))),
        ("keep_idx", "int64", dict(images=images, keep_idx=keep.float())),
        ("keep_idx", r"int64 \[3, K\]", dict(images=images, keep_idx=keep[:2])),
        ("keep_idx", r"got int64 \[12\]", dict(images=images, keep_idx=keep.flatten())),
        ("pos_idx", r"int64 \[3, 4\]", dict(images=images, keep_idx=keep, pos_idx=keep[:, :3])),
        ("pos_idx", r"int64 \[3, 16\]", dict(images=images, pos_idx=keep)),
        ("keep_idx", r"\[0, 16\)", dict(images=images, keep_idx=keep + 13)),  # range: the op's check
        ("pos_idx", r"\[0, 16\)", dict(images=images, keep_idx=keep, pos_idx=keep - 4)),
    ]


@pytest.mark.parametrize("argument,message,kwargs", _bad_inputs(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_inputs_fail_before_the_blocks_run(argument, message, kwargs):
    model = make_model()
    ran = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: ran.append(True))
    with pytest.raises(ValueError, match=message) as error:
        model.forward_features(**kwargs)
    assert argument in str(error.value) and "got" in str(error.value)
    assert not ran


@pytest.mark.parametrize("kwargs,message", [
    (dict(pos_embed_kind="rope"), "pos_embed_kind"),
    (dict(attn_impl="flash"), "attn_impl"),
    (dict(global_pool="max"), "global_pool"),
    (dict(embed_dim=30, num_heads=4), "divisible by num_heads"),
    (dict(embed_dim=30, num_heads=3, pos_embed_kind="sincos"), "divisible by 4"),
    (dict(img_size=18), "divisible by patch_size"),
    (dict(depth=0), "depth"),
])
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViT(**{**TINY, **kwargs})


def test_unknown_config_name():
    with pytest.raises(ValueError, match="small_data"):
        ViT.from_config("huge")


# ------------------------------------------------------------------------------- torch.compile

def test_torch_compile_forward_backward_parity(assert_close):
    """Compiled (inductor, fullgraph) forward + backward equals eager, full and masked paths.

    Slow with a cold inductor cache (~50-70 s on a busy 2-core machine, ~10 s warm); kept in the default
    suite because the op's torch.library registration is what makes the model compile."""
    torch._dynamo.reset()
    model = make_model(img_size=8, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    compiled = torch.compile(model, fullgraph=True)
    images = make_images(batch=2, size=8)
    keep = torch.tensor([[3, 1], [0, 2]])
    pos = torch.tensor([[2, 1], [0, 3]])
    for args in [(), (keep, pos)]:  # the full-image graph and the masked + re-positioned one
        eager_out = model(images, *args)
        eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()), allow_unused=True)
        out = compiled(images, *args)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()), allow_unused=True)
        assert_close(out, eager_out, torch.float32, f"compiled forward {len(args)}")
        for (name, _), g, eg in zip(model.named_parameters(), grads, eager_grads):
            assert (g is None) == (eg is None), name
            if g is not None:
                assert_close(g, eg, torch.float32, f"compiled grad {name}")
