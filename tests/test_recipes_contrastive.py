"""Recipe values of the contrastive paper presets (issue 13 item 6: SimCLR, MoCo v3, DILEMMA), pinned through
--print-config and through the code that uses them: MoCo v3's momentum and lr at a given step against the
release's formulas (facebookresearch/moco-v3 main_moco.py), the temperature each loss receives, the heads' widths,
the frozen patch projection, the views, DILEMMA's sparsity and corruption probability. The deliberate differences
listed beside the presets are pinned too (SimCLR's symmetric views without blur or solarize, the one-step warm-up
offset), so that changing one without its comment fails here. Cost: ~5 s on 2 CPU cores."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

import vitfast.ops
from vitfast.config import build_config
from vitfast.engine import Trainer
from vitfast.methods import get_method
from vitfast.train import main

TINY = dict(model="tiny", embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=8, metrics="", progress=False)
SMALL_HEADS = dict(proj_hidden_dim=64, proj_dim=16, pred_hidden_dim=64)
DATA = SimpleNamespace(channels=3, image_size=32, num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.fixture
def printed_config(capsys):
    def printed(*args):  # what `python train.py ... --print-config` prints
        assert main([*args, "--print-config"]) == 0
        out = capsys.readouterr().out
        return json.loads(out[out.index("{"):])
    return printed


# The released values, as the comments beside the presets list them (source files there).
MOCOV3_RELEASE = dict(model="small_data", epochs=300, batch_size=4096, base_lr=1.5e-4, warmup_epochs=40,
                      weight_decay=0.1, betas=[0.9, 0.999], global_pool="token", lr_schedule="cosine", min_lr=0.0,
                      drop_path=0.0, grad_clip=None, probe_epochs=90)
MOCOV3_METHOD = dict(temperature=0.2, momentum=0.99, proj_hidden_dim=4096, proj_dim=256, pred_hidden_dim=4096,
                     random_patch_projection=True, min_crop_scale=0.08, jitter_strength=0.5, flip=True)
SIMCLR_RELEASE = dict(model="small_data", epochs=1000, batch_size=512, base_lr=1.5e-4, warmup_epochs=10,
                      weight_decay=0.1, betas=[0.9, 0.999], global_pool="token", lr_schedule="cosine", min_lr=0.0,
                      probe_epochs=100)
SIMCLR_METHOD = dict(temperature=0.5, proj_hidden_dim=0, proj_dim=128, min_crop_scale=0.08, jitter_strength=0.5,
                     flip=True)


def test_paper_presets_print_the_released_recipes(printed_config):
    for method, shared, own in (("mocov3", MOCOV3_RELEASE, MOCOV3_METHOD), ("simclr", SIMCLR_RELEASE, SIMCLR_METHOD),
                                ("dilemma", dict(MOCOV3_RELEASE, batch_size=1024),
                                 dict(MOCOV3_METHOD, base="mocov3", mask_ratio=0.75, corrupt_probability=0.2,
                                      detection_weight=1.0))):
        printed = printed_config("--method", method, "--preset", "paper")
        assert {k: printed[k] for k in shared} == shared, method
        assert {k: printed["method_config"][k] for k in own} == own, method
        assert printed["lr"] is None  # the peak lr is base_lr * global batch / 256, as main_moco.py / run.py scale it


def test_mocov3_momentum_and_lr_follow_the_released_schedules():
    """The teacher's EMA at step i uses main_moco.py's adjust_moco_momentum(i / iters_per_epoch); after the
    warm-up the lr is its adjust_learning_rate; in the warm-up the engine is one step ahead (listed difference)."""
    config = build_config("mocov3", "paper", **TINY, **SMALL_HEADS, batch_size=64)
    trainer = Trainer(config)
    method, total, iters = trainer.method, trainer.total_steps, trainer.steps_per_epoch
    assert total == 300 * iters and trainer.peak_lr == pytest.approx(1.5e-4 * 64 / 256, rel=1e-12)

    def released_lr(i):  # main_moco.py adjust_learning_rate(epoch + i / iters_per_epoch)
        epoch = i / iters
        if epoch < 40:
            return trainer.peak_lr * epoch / 40
        return trainer.peak_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 40) / (300 - 40)))

    for step in (40 * iters, total // 2, total - 1):
        assert trainer.lr_at(step) == pytest.approx(released_lr(step), rel=1e-12, abs=1e-15), step
    assert trainer.lr_at(7) == pytest.approx(released_lr(8), rel=1e-12)  # the warm-up's one-step offset

    step = total // 3
    m = 1.0 - 0.5 * (1.0 + math.cos(math.pi * (step / iters) / 300)) * (1.0 - 0.99)  # adjust_moco_momentum
    student = dict(method.projector.named_parameters())
    teacher = dict(method.teacher["projector"].named_parameters())
    with torch.no_grad():
        for name, param in student.items():
            param.add_(torch.randn_like(param))  # student and teacher now differ
    before = {name: param.detach().clone() for name, param in teacher.items()}
    method.after_step(step, total)
    for name, param in teacher.items():
        torch.testing.assert_close(param, m * before[name] + (1 - m) * student[name].detach(), rtol=1e-6, atol=1e-7)


def test_mocov3_paper_heads_patch_projection_and_temperature(monkeypatch):
    """The preset's widths reach the heads (3-layer projector 4096/256, 2-layer predictor 4096, bias-free, last BN
    without affine as builder.py), the patch projection is frozen, and the loss gets τ 0.2 scaled by 2τ."""
    method = get_method("mocov3")(build_config("mocov3", "paper", **TINY), DATA)
    linears = lambda head: [(m.in_features, m.out_features, m.bias is None) for m in head
                            if isinstance(m, torch.nn.Linear)]
    assert linears(method.projector) == [(32, 4096, True), (4096, 4096, True), (4096, 256, True)]
    assert linears(method.predictor) == [(256, 4096, True), (4096, 256, True)]
    for head in (method.projector, method.predictor):
        last = head[-1]
        assert isinstance(last, torch.nn.BatchNorm1d) and not last.affine
    assert not any(p.requires_grad for p in method.model.patch_embed.parameters())
    frozen = {n for n, p in method.model.named_parameters() if not p.requires_grad}
    assert frozen == {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"}  # pos_embed: fixed sin-cos

    seen = []
    real = vitfast.ops.contrastive_loss
    monkeypatch.setattr(vitfast.ops, "contrastive_loss", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    q, k = torch.randn(4, 256), torch.randn(4, 256)
    method.infonce(q, k)
    assert (seen[0]["temperature"], seen[0]["scale"], seen[0]["positives"]) == (0.2, 0.4, "diagonal")


def test_simclr_paper_views_head_and_temperature(monkeypatch):
    """SimCLR's released views (crops (0.08, 1), aspect (3/4, 4/3), flips, jitter 0.5 = (0.4, 0.4, 0.4, 0.1) p 0.8,
    grayscale p 0.2, no blur), its head (hidden = the encoder's width, output 128) and τ 0.5 in the loss; the patch
    projection trains (listed difference). MoCo v3 uses the same symmetric views (listed difference: no BYOL
    blur / solarize)."""
    for name in ("simclr", "mocov3"):
        method = get_method(name)(build_config(name, "paper", **TINY, **({} if name == "simclr" else SMALL_HEADS)),
                                  DATA)
        (view,) = method.train_views.pipelines
        assert method.train_views.repeats == [2]
        steps = {step.name: step.params for step in view.steps}
        assert list(steps) == ["random_resized_crop", "horizontal_flip", "color_jitter", "grayscale"], name
        assert (steps["random_resized_crop"]["scale"], steps["random_resized_crop"]["ratio"]) == ((0.08, 1.0),
                                                                                                 (3 / 4, 4 / 3))
        jitter = steps["color_jitter"]
        assert [jitter[k] for k in ("brightness", "contrast", "saturation", "hue", "p")] == pytest.approx(
            [0.4, 0.4, 0.4, 0.1, 0.8])
        assert (steps["horizontal_flip"]["p"], steps["grayscale"]["p"]) == (0.5, 0.2)

    simclr = get_method("simclr")(build_config("simclr", "paper", **TINY), DATA)
    linears = [(m.in_features, m.out_features) for m in simclr.projector if isinstance(m, torch.nn.Linear)]
    assert linears == [(32, 32), (32, 128)]
    assert all(p.requires_grad for p in simclr.model.patch_embed.parameters())
    seen = []
    real = vitfast.ops.contrastive_loss
    monkeypatch.setattr(vitfast.ops, "contrastive_loss", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    simclr.train()
    simclr(torch.rand(4, 3, 32, 32), None, None, torch.Generator().manual_seed(0))
    assert (seen[0]["temperature"], seen[0]["positives"]) == (0.5, "ntxent")


def test_dilemma_paper_sparsity_corruption_and_weight(monkeypatch):
    """DILEMMA's student keeps int(N·(1 − 0.75)) of N tokens, corrupts each with p 0.2, adds λ = 1 times the
    detection BCE; the teacher is MoCo v3's (τ 0.2) and the patch projection is frozen."""
    method = get_method("dilemma")(build_config("dilemma", "paper", **TINY, **SMALL_HEADS), DATA)
    n = method.model.num_patches  # 16 at 32 px, patch 8
    seen = []
    real = vitfast.ops.corrupt_positions
    monkeypatch.setattr(vitfast.ops, "corrupt_positions",
                        lambda ids, keep, p, **kw: seen.append((keep, p)) or real(ids, keep, p, **kw))
    x = torch.rand(3, 3, 32, 32)
    pooled, extra, metrics = method.encode_view(x, torch.Generator().manual_seed(0))
    assert seen == [(int(n * 0.25), 0.2)]
    assert extra.item() == pytest.approx(1.0 * metrics["detection_bce"], rel=1e-6)
    assert method.config.method_config.temperature == 0.2
    assert not any(p.requires_grad for p in method.model.patch_embed.parameters())
