"""LaCViT and DILEMMA: their losses against plain formulas, what the student and the teacher see, stages, budgets,
the frozen probe, --init, and the CLI end to end on a tiny model. Cost: about 1 min on 2 cores."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from vitfast import checkpoint as ckpt
from vitfast.config import build_config
from vitfast.engine import CHECKPOINT, Trainer
from vitfast.methods import DataInfo, get_method
from vitfast.train import main

DATA = DataInfo(channels=1, image_size=32, num_classes=10, mean=(0.5,), std=(0.25,))
TINY = dict(embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, patch_size=8, batch_size=32, progress=False)
TINY_FLAGS = ["--no-progress", "--batch-size", "32", "--set", "embed_dim=32", "--set", "depth=1",
              "--set", "num_heads=2", "--set", "patch_size=8"]


def method(name, stage=None, **overrides):
    config = build_config(name, "quick", stage=stage, **{**TINY, **overrides})
    if stage is not None:  # the preset's per-stage values, as the engine applies them
        config = config.replace(**{k: v for k, v in config.stage_overrides.get(stage, {}).items()
                                   if k not in overrides})
    torch.manual_seed(0)
    return get_method(name)(config, DATA)


def batch(size=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (size, 1, 32, 32), dtype=torch.uint8, generator=g)
    return images, torch.arange(size) % classes, torch.arange(size)


# ----------------------------------------------------------------------------------------------------- LaCViT

def supcon_formula(z, labels, tau, tau_base):
    """docs/methods.md §4.1 written out anchor by anchor (float64): z [2B, P] unnormalised, labels [2B]."""
    z = F.normalize(z.double(), dim=1)
    total = 0.0
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            continue  # contributes 0
        log_denominator = math.log(sum(math.exp(z[i].dot(z[a]).item() / tau) for a in others))
        total += -(tau / tau_base) * sum(z[i].dot(z[p]).item() / tau - log_denominator
                                         for p in positives) / len(positives)
    return total / len(z)


def test_supcon_stage_loss_is_the_formula():
    """The supcon stage's loss on two fixed views equals §4.1 on the projections (labels with a singleton class)."""
    m = method("lacvit", "supcon", supcon_temperature=0.1, base_temperature=0.07)
    images, _, indices = batch()
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 4, 5])  # 4 and 5: singletons, positive only with their other view
    x1, x2 = torch.randn(2, 8, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    m.train_views = lambda images, generator: [x1, x2]
    loss, _ = m(images, labels, indices, torch.Generator())
    with torch.no_grad():
        z = torch.cat([m.projector(m.model.forward_head(m.model.forward_features(x), pre_logits=True))
                       for x in (x1, x2)])
    assert z.shape == (16, 128)
    expected = supcon_formula(z, torch.cat([labels, labels]), 0.1, 0.07)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    projector = [type(layer).__name__ for layer in m.projector]
    assert projector == ["Linear", "ReLU", "Linear"] and m.projector[0].out_features == 32


def test_lacvit_stages_and_budgets():
    cls = get_method("lacvit")
    assert cls.stages == ("supcon", "probe", "baseline")
    assert cls.stage_init == {"probe": "supcon", "finetune": "supcon"}
    for preset in ("quick", "paper"):
        epochs = {stage: values["epochs"] for stage, values in cls.presets[preset]["stage_overrides"].items()}
        assert epochs["baseline"] == epochs["supcon"] + epochs["probe"] == epochs["supcon"] + epochs["finetune"]
    scaled = build_config("lacvit", "quick", epochs=100).stage_overrides  # --epochs: the pipeline's total
    assert [scaled[s]["epochs"] for s in ("supcon", "probe", "baseline")] == [80, 20, 100]
    c = build_config("lacvit", "paper")
    assert (c.method_config.supcon_temperature, c.model, c.patch_size) == (0.1, "base", 16)
    with pytest.raises(ValueError, match="lacvit stage must be one of"):
        method("lacvit", "upstream")
    # Only the supcon stage is a representation to compare with its random init; the others are classifiers.
    assert method("lacvit", "supcon").random_init_baseline and not method("lacvit", "baseline").random_init_baseline
    assert method("lacvit", "finetune").model.head.out_features == 10


def test_probe_freezes_the_encoder(tmp_path):
    """--stage probe: two optimizer steps leave every encoder weight as it was (no gradient reaches it), move the
    classifier, and keep the encoder in eval mode."""
    config = build_config("lacvit", "quick", stage="probe", out=str(tmp_path / "probe"), epochs=1, max_steps=2,
                          metrics="", **TINY)
    trainer = Trainer(config)
    model = trainer.method.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]) != name.startswith("head."), name
    assert all(p.grad is None and not p.requires_grad for n, p in model.named_parameters() if not n.startswith("head."))
    trainer.method.train()
    assert not model.blocks.training and model.head.training and trainer.method.training
    assert [type(layer).__name__ for layer in model.head] == ["BatchNorm1d", "Linear"] and not model.head[0].affine
    assert trainer.method.train_views.name == "eval"  # frozen features of the un-augmented images


def test_second_stage_starts_from_the_supcon_encoder(tmp_path):
    """The probe / finetune stage loads the supcon encoder: from the sibling folder by default, or from --init."""
    supcon = build_config("lacvit", "quick", stage="supcon", out=str(tmp_path / "supcon"), epochs=1, max_steps=2,
                          metrics="", **TINY)
    Trainer(supcon).fit()
    stored = ckpt.load(str(tmp_path / "supcon" / CHECKPOINT))["encoder"]
    for stage in ("probe", "finetune"):
        config = build_config("lacvit", "quick", stage=stage, out=str(tmp_path / stage), epochs=1,
                              init=str(tmp_path / "supcon"), **TINY)
        trainer = Trainer(config)
        skipped = trainer.init_report["skipped"]  # the new classifier (probe: BatchNorm without affine + Linear)
        assert skipped and all(name.startswith("head.") for name in skipped), skipped
        for name, value in trainer.method.model.state_dict().items():
            if not name.startswith("head."):
                assert torch.equal(value, stored[name]), name
    # The CLI finds the sibling supcon folder by itself.
    assert main(["--method", "lacvit", "--stage", "probe", "--out", str(tmp_path / "probe-cli"), "--max-steps", "1",
                 *TINY_FLAGS]) == 0


def test_lacvit_end_to_end(tmp_path):
    """python train.py --method lacvit: supcon -> probe -> baseline in one command, each stage's accuracy reported."""
    out = tmp_path / "run"
    assert main(["--method", "lacvit", "--out", str(out), "--epochs", "2", *TINY_FLAGS, "--batch-size", "128",
                 "--set", "probe_epochs=2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    assert list(stages) == ["supcon", "probe", "baseline"]
    supcon = stages["supcon"]
    for value in (supcon["knn_accuracy"], supcon["random_init_knn_accuracy"], supcon["clustering"]["accuracy"],
                  supcon["linear_probe"]["test_accuracy"]):
        assert 0.0 <= value <= 1.0
    for stage in ("probe", "baseline"):
        assert 0.0 <= stages[stage]["test_accuracy"] <= 1.0
    assert stages["baseline"]["epochs"] == stages["supcon"]["epochs"] + stages["probe"]["epochs"] == 2
    supcon = ckpt.load(str(out / "supcon" / CHECKPOINT))
    probe = ckpt.load(str(out / "probe" / CHECKPOINT))
    for name, value in supcon["encoder"].items():  # the probe trained on the supcon encoder and left it as it was
        assert torch.equal(probe["encoder"][name], value), name


# ---------------------------------------------------------------------------------------------------- DILEMMA

@pytest.fixture
def recorded(monkeypatch):
    """What the method's masking and corruption drew (the dilemma module calls them through vitfast.ops)."""
    from vitfast import ops
    seen = {}
    masking, corrupt = ops.random_masking, ops.corrupt_positions

    def record_masking(*args, **kwargs):
        out = masking(*args, **kwargs)
        seen["keep_idx"] = out[0]
        return out

    def record_corrupt(*args, **kwargs):
        out = corrupt(*args, **kwargs)
        seen["pos_idx"], seen["corrupted"] = out
        return out

    monkeypatch.setattr(ops, "random_masking", record_masking)
    monkeypatch.setattr(ops, "corrupt_positions", record_corrupt)
    return seen


@pytest.mark.parametrize("base,mask_ratio", [("mocov3", 0.5), ("simclr", 0.75)])
def test_corrupted_tokens_carry_a_wrong_position_at_the_first_block(recorded, base, mask_ratio):
    """At the input of the ViT's first block, patch token k is patch_embed(kept patch) + pos_embed[pos_idx]; the
    position it carries is its own exactly where it is not corrupted, and (r >= 0.5) a corrupted token's position
    is that of no visible token. The detection loss is λ·BCE(detector(tokens), corruption labels)."""
    m = method("dilemma", base=base, mask_ratio=mask_ratio, corrupt_probability=0.5, detection_weight=0.7)
    inputs, outputs = [], []
    m.model.blocks[0].register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    m.model.norm.register_forward_hook(lambda module, args, out: outputs.append(out))  # the output tokens
    x = torch.randn(6, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    _, extra, metrics = m.encode_view(x, torch.Generator().manual_seed(3))
    keep_idx, pos_idx, corrupted = recorded["keep_idx"], recorded["pos_idx"], recorded["corrupted"].bool()
    assert keep_idx.shape == (6, int(16 * (1 - mask_ratio))) and corrupted.any() and not corrupted.all()
    tokens = inputs[0][:, 1:]
    with torch.no_grad():
        patches = m.model.patch_embed(x)                      # [B, N, D], grid order
        table = m.model.pos_embed[0, 1:]                      # [N, D]
    kept = torch.gather(patches, 1, keep_idx[..., None].expand(-1, -1, patches.shape[-1]))
    torch.testing.assert_close(tokens, kept + table[pos_idx])
    # Which position each token carries, read back from the block input alone (nearest table row).
    carried = torch.cdist(tokens - kept, table[None].expand(6, -1, -1)).argmin(-1)
    assert torch.equal(carried, pos_idx)
    assert torch.equal(carried != keep_idx, corrupted)       # wrong exactly where corrupted
    for b in range(6):
        visible = set(keep_idx[b].tolist())
        assert not any(carried[b, k].item() in visible for k in torch.nonzero(corrupted[b]).flatten().tolist())
    with torch.no_grad():
        bce = F.binary_cross_entropy_with_logits(m.detector(outputs[0][:, 1:]).squeeze(-1), corrupted.float())
    assert extra.item() == pytest.approx(0.7 * bce.item(), rel=1e-5)
    assert metrics["detection_bce"] == pytest.approx(bce.item(), rel=1e-5)


def test_teacher_sees_the_clean_full_views(recorded):
    """MoCo v3 base: the student's two passes are sparse and corrupted, the teacher encodes the two augmented views
    whole (every patch, its own positions), and the loss is the symmetric 2τ-InfoNCE plus the mean detection BCE."""
    m = method("dilemma", base="mocov3")
    images, labels, indices = batch()
    views = [v.clone() for v in m.train_views(images, torch.Generator().manual_seed(4))]
    teacher = m.teacher["encoder"]
    calls = {"student": [], "teacher": []}
    for who, encoder in (("student", m.model), ("teacher", teacher)):
        original = encoder.forward_features
        encoder.forward_features = (lambda original, who: lambda x, keep_idx=None, pos_idx=None: (
            calls[who].append((x.clone(), keep_idx, pos_idx)) or original(x, keep_idx, pos_idx)))(original, who)
    loss, metrics = m(images, labels, indices, torch.Generator().manual_seed(4))
    assert len(calls["teacher"]) == len(calls["student"]) == 2
    for (x, keep_idx, pos_idx), view in zip(calls["teacher"], views):
        assert keep_idx is None and pos_idx is None and torch.equal(x, view)
    for (x, keep_idx, pos_idx), view in zip(calls["student"], views):
        assert keep_idx.shape == (8, 8) and torch.equal(x, view)
    assert loss.item() == pytest.approx(metrics["infonce"] + metrics["detection_bce"], rel=1e-5)
    loss.backward()
    assert m.detector.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.teacher.parameters())


def test_dilemma_base_is_a_setting(capsys):
    assert main(["--method", "dilemma", "--base", "simclr", "--mask-ratio", "0.75", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)["method_config"]
    assert (printed["base"], printed["mask_ratio"], printed["corrupt_probability"]) == ("simclr", 0.75, 0.2)
    assert type(method("dilemma", base="simclr")).__mro__[1:3] == (get_method("dilemma"), get_method("simclr"))
    with pytest.raises(ValueError, match="dilemma: base must be one of \\['mocov3', 'simclr'\\], got 'dino'"):
        method("dilemma", base="dino")


@pytest.mark.parametrize("base", ["mocov3", "simclr"])
def test_dilemma_end_to_end(tmp_path, base):
    """python train.py --method dilemma --base B --max-steps 2: trains, checkpoints, and resumes to step 3."""
    out = str(tmp_path / base)
    flags = ["--method", "dilemma", "--base", base, "--out", out, "--set", "proj_hidden_dim=32",
             "--set", "pred_hidden_dim=32", *TINY_FLAGS]
    assert main([*flags, "--max-steps", "2"]) == 0
    assert main(["--resume", "--out", out, "--max-steps", "3", "--no-progress"]) == 0
    state = ckpt.load(os.path.join(out, CHECKPOINT))
    assert state["step"] == 3 and "detector.weight" in state["method"]
    assert state["config"]["method_config"]["base"] == base
