"""DINO (vitfast/nn/dino.py, vitfast/methods/dino.py; docs/methods.md §5.1): the head, the loss module against DINO's
formula written out (teacher temperature, centre), the method's student / teacher / schedules / frozen prototypes
through the engine's own train_step, and the stage pipeline through the CLI. Cost: about 25 s on 2 cores (32-wide,
1-block ViTs; 320 digits at 16 px for the CLI runs)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from vitfast import checkpoint as ckpt
from vitfast import engine
from vitfast.config import UserError, build_config
from vitfast.engine import CHECKPOINT, Trainer
from vitfast.methods import DataInfo, get_method
from vitfast.methods.dino import cosine_schedule
from vitfast.methods.supervised import PAPER_RECIPE
from vitfast.nn import DINOHead, DINOLoss, DropPath, cosine_momentum
from vitfast.train import main

DATA = DataInfo(channels=1, image_size=16, num_classes=10, mean=(0.5,), std=(0.25,))
TINY = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=4, head_hidden_dim=24, bottleneck_dim=8,
            n_prototypes=12, n_local_crops=2, local_crop_size=8, evaluate_teacher=True, batch_size=6, progress=False)


def dino(stage="dino", **overrides):
    config = build_config("dino", "quick", stage=stage, **{**TINY, **overrides})
    config = config.replace(**{k: v for k, v in config.stage_overrides.get(stage, {}).items() if k not in overrides})
    torch.manual_seed(0)
    return get_method("dino")(config, DATA).train()


def fixed_views(method, seed=0, batch=6):
    """The method sees fixed crops (2 global 16 px, 2 local 8 px); returns (uint8 images, the crops)."""
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randn(batch, 1, 16, 16, generator=g) for _ in range(2)]
    crops += [torch.randn(batch, 1, 8, 8, generator=g) for _ in range(2)]
    method.train_views = lambda images, generator: [c.clone() for c in crops]
    return torch.zeros(batch, 1, 16, 16, dtype=torch.uint8), crops


def pooled(encoder, x):
    return encoder.forward_head(encoder.forward_features(x), pre_logits=True)


# --- the head and the loss module -----------------------------------------------------------------------------------

def test_head_layout_and_unit_rows():
    head = DINOHead(20, hidden_dim=16, bottleneck_dim=8, n_prototypes=33)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert [m.out_features for m in head.mlp if hasattr(m, "out_features")] == [16, 16, 8]
    assert head.prototypes.shape == (33, 8) and head.n_prototypes == 33
    x = torch.randn(5, 20)
    z = head(x)
    assert z.shape == (5, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    # The dense last layer (inspection only): unit rows against the unit prototypes, a cosine in [-1, 1].
    torch.testing.assert_close(head.logits(x), z @ (head.prototypes / head.prototypes.norm(dim=1, keepdim=True)).T)
    with pytest.raises(ValueError, match="n_prototypes must be a positive int, got 0"):
        DINOHead(20, n_prototypes=0)


def dino_formula(s, t, v_s, v_t, centre, n_student, n_teacher, student_temp, teacher_temp):
    """docs/methods.md §5.1 written out in float64, one (teacher view j, student view v != j) pair and image at a
    time."""
    s, t, centre = s.double(), t.double(), centre.double().flatten()
    w_s, w_t = v_s.double() / v_s.double().norm(dim=1, keepdim=True), v_t.double() / v_t.double().norm(dim=1,
                                                                                                       keepdim=True)
    batch = s.shape[0] // n_student
    total, pairs = 0.0, 0
    for j in range(n_teacher):
        for v in range(n_student):
            if v == j:
                continue
            for b in range(batch):
                q = torch.softmax((w_t @ t[j * batch + b] - centre) / teacher_temp, 0)
                log_p = torch.log_softmax(w_s @ s[v * batch + b] / student_temp, 0)
                total += -(q * log_p).sum().item()
            pairs += 1
    return total / (pairs * batch), (t @ w_t.T).mean(0)


def test_teacher_temperature_schedule():
    loss = DINOLoss(8, n_student_views=4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=10)
    # DINO's np.linspace(0.04, 0.07, 10) at integer epochs, then 0.07; linear in between.
    for epoch, expected in [(0, 0.04), (1, 0.04 + 0.03 / 9), (4.5, 0.055), (9, 0.07), (10, 0.07), (250, 0.07)]:
        assert loss.teacher_temp_at(epoch) == pytest.approx(expected, abs=1e-12), epoch
    assert DINOLoss(8, 4, warmup_teacher_temp_epochs=0).teacher_temp_at(0) == 0.07
    one = DINOLoss(8, 4, warmup_teacher_temp_epochs=1)  # linspace(0.04, 0.07, 1) = [0.04]
    assert (one.teacher_temp_at(0), one.teacher_temp_at(1)) == (0.04, 0.07)


@pytest.mark.parametrize("epoch", [0, 3, 12])
def test_loss_and_centre_are_the_formula(epoch):
    gen = torch.Generator().manual_seed(epoch)
    n_student, n_teacher, batch, d, k = 5, 2, 3, 6, 11
    s = F.normalize(torch.randn(n_student * batch, d, generator=gen), dim=1).requires_grad_()
    t = F.normalize(torch.randn(n_teacher * batch, d, generator=gen), dim=1)
    v_s, v_t = torch.randn(k, d, generator=gen).requires_grad_(), torch.randn(k, d, generator=gen)
    criterion = DINOLoss(k, n_student, n_teacher, student_temp=0.2, teacher_temp=0.09, warmup_teacher_temp=0.05,
                         warmup_teacher_temp_epochs=5, centre_momentum=0.8)
    centre = torch.randn(1, k, generator=gen)
    criterion.centre.centre.copy_(centre)
    tau_t = 0.05 + 0.04 * min(1.0, epoch / 4)
    want, teacher_mean = dino_formula(s, t, v_s, v_t, centre, n_student, n_teacher, 0.2, tau_t)
    loss = criterion(s, t, v_s, v_t, epoch)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # The centre moves after the loss: c <- m c + (1 - m) mean of the teacher's logits.
    torch.testing.assert_close(criterion.centre.centre.double(), 0.8 * centre.double() + 0.2 * teacher_mean[None],
                               rtol=1e-5, atol=1e-6)
    loss.backward()
    assert s.grad is not None and v_s.grad is not None and v_s.grad.abs().sum() > 0
    # In eval mode the centre stays.
    before = criterion.centre.centre.clone()
    criterion.eval()(s, t, v_s, v_t, epoch)
    assert torch.equal(criterion.centre.centre, before)


# --- the method ------------------------------------------------------------------------------------------------------

def test_student_sees_every_crop_the_teacher_the_globals_without_drop_path():
    method = dino(drop_path=0.3)
    images, crops = fixed_views(method)
    assert len(method.criterion.centre.centre[0]) == 12 and method.criterion.n_student_views == 4
    student_rates = [m.drop_prob for m in method.model.modules() if isinstance(m, DropPath)]
    assert max(student_rates) == pytest.approx(0.3)
    assert all(m.drop_prob == 0.0 for m in method.teacher.modules() if isinstance(m, DropPath))
    centre = method.criterion.centre.centre.clone()
    loss, metrics = method(images, None, None, torch.Generator())
    with torch.no_grad():
        teacher = method.teacher["head"](pooled(method.teacher["encoder"], torch.cat(crops[:2])))
    assert metrics["teacher_temp"] == pytest.approx(0.04)
    # The teacher is deterministic in train mode (no drop-path) and gets no gradient.
    again = method.teacher["head"](pooled(method.teacher["encoder"], torch.cat(crops[:2])))
    torch.testing.assert_close(again, teacher, rtol=0, atol=0)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert method.head.prototypes.grad is not None and method.model.patch_embed.proj.weight.grad is not None
    # The loss used the centre before this step; the step moved it towards the teacher's logits.
    teacher_mean = (teacher @ F.normalize(method.teacher["head"].prototypes, dim=1).T).mean(0)
    torch.testing.assert_close(method.criterion.centre.centre, 0.9 * centre + 0.1 * teacher_mean[None])


def test_loss_is_the_formula_on_the_method_modules():
    method = dino()
    images, crops = fixed_views(method)
    method.model.eval()  # no randomness in the student either (drop_path is 0 here anyway)
    centre = method.criterion.centre.centre.clone()
    loss, _ = method(images, None, None, torch.Generator())
    with torch.no_grad():
        student = torch.cat([method.head(pooled(method.model, torch.cat(crops[:2]))),
                             method.head(pooled(method.model, torch.cat(crops[2:])))])
        teacher = method.teacher["head"](pooled(method.teacher["encoder"], torch.cat(crops[:2])))
    want, _ = dino_formula(student, teacher, method.head.prototypes, method.teacher["head"].prototypes, centre, 4, 2,
                           0.1, 0.04)
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_steps_lower_the_loss_on_a_toy_batch():
    method = dino()
    images, _ = fixed_views(method)
    optimizer = torch.optim.AdamW(method.param_groups(), lr=3e-3)
    method.steps_per_epoch = 1  # the prototypes are frozen in epoch 1 only
    losses = []
    for step in range(8):
        loss, _ = method(images, None, None, torch.Generator())
        optimizer.zero_grad()
        loss.backward()
        method.before_optimizer_step(optimizer, step, 8)
        optimizer.step()
        method.after_step(step + 1, 8)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_prototypes_frozen_in_epoch_one_and_the_schedules(tmp_path, small_digits):
    """Through the engine's own train_step (clip, hook, step): the prototypes keep their values during the first
    epoch and move after; weight decay and teacher momentum follow their cosines at the steps taken."""
    config = build_config("dino", "quick", stage="dino", out=str(tmp_path / "dino"), epochs=2, metrics="",
                          **{**TINY, "batch_size": 32})
    trainer = Trainer(config.replace(**config.stage_overrides["dino"]))
    method = trainer.method
    batches = [batch for _ in range(2) for batch in trainer.loader][:12]  # epoch 1, then 2 steps of epoch 2
    assert trainer.config.grad_clip == 3.0 and trainer.steps_per_epoch == 10 and trainer.total_steps == 20
    s = trainer.config.method_config
    decayed, plain = trainer.optimizer.param_groups
    assert any(p is method.head.prototypes for p in decayed["params"]) and plain["weight_decay"] == 0.0
    for step, batch in enumerate(batches):
        prototypes = method.head.prototypes.detach().clone()
        student = method.model.patch_embed.proj.weight.detach().clone()
        teacher = method.teacher["encoder"].patch_embed.proj.weight.detach().clone()
        trainer.train_step(*batch)
        moved = not torch.equal(method.head.prototypes, prototypes)
        assert moved == (step >= 10), step
        assert not torch.equal(method.model.patch_embed.proj.weight, student)
        # Weight decay of this step on the decayed group only; DINO's m at this iteration for the teacher.
        assert decayed["weight_decay"] == pytest.approx(cosine_schedule(step, 20, 0.04, 0.4))
        assert plain["weight_decay"] == 0.0
        m = cosine_momentum(step, 20, s.momentum)
        torch.testing.assert_close(method.teacher["encoder"].patch_embed.proj.weight,
                                   m * teacher + (1 - m) * method.model.patch_embed.proj.weight, rtol=1e-6, atol=1e-7)
    assert int(method.steps_done) == 12 and method.epoch() == 1


def test_cosine_schedule_values():
    assert cosine_schedule(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine_schedule(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine_schedule(25, 100, 0.04, 0.4) == pytest.approx(0.4 - 0.36 * (1 + math.cos(math.pi / 4)) / 2)
    assert cosine_schedule(100, 100, 0.04, 0.4) == pytest.approx(0.4) == cosine_schedule(130, 100, 0.04, 0.4)


def test_presets_stages_and_errors():
    cls = get_method("dino")
    assert cls.stages == ("dino", "finetune", "baseline") and cls.stage_init == {"finetune": "dino"}
    for preset in ("quick", "paper"):
        epochs = {s: v["epochs"] for s, v in cls.presets[preset]["stage_overrides"].items()}
        assert epochs["baseline"] == epochs["dino"] + epochs["finetune"]
    paper = build_config("dino", "paper")
    d, f = paper.stage_overrides["dino"], paper.stage_overrides["finetune"]
    assert (paper.model, d["epochs"], d["warmup_epochs"], d["base_lr"], d["weight_decay"], d["grad_clip"]) == (
        "small_data", 200, 30, 1e-4, 0.04, 3.0)
    s = paper.method_config
    assert (s.n_local_crops, s.head_hidden_dim, s.bottleneck_dim, s.n_prototypes, s.momentum, s.weight_decay_end,
            s.student_temp, s.teacher_temp, s.warmup_teacher_temp, s.warmup_teacher_temp_epochs) == (
        8, 512, 256, 1024, 0.996, 0.4, 0.1, 0.07, 0.04, 10)
    assert f["epochs"] == 100 and f["warmup_epochs"] == 10 and f["lr"] == 1e-3 and f["autoaugment"]
    assert {k: f[k] for k in PAPER_RECIPE} == PAPER_RECIPE  # the supervised paper recipe, as the supervised method
    assert dino().random_init_baseline and not dino("finetune").random_init_baseline
    student = dino(evaluate_teacher=False)
    teacher = dino(evaluate_teacher=True)
    assert student.encoder is student.model and teacher.encoder is teacher.teacher["encoder"]
    assert dino("finetune").classifier().head.out_features == 10
    with pytest.raises(UserError, match="local_crop_size must be a multiple of patch_size 4, got 6 px"):
        dino(local_crop_size=6)
    with pytest.raises(UserError, match="dino stage must be one of"):
        dino("upstream")


# --- end to end through the CLI --------------------------------------------------------------------------------------

@pytest.fixture
def small_digits(monkeypatch):
    """The first 320 / 64 / 64 images of digits at 16 px (10 steps of 32 per epoch), and no plots."""
    load_splits, cache = engine.load_splits, {}

    def first_images(name, **kwargs):
        if not cache:
            sizes = {"train": 320, "val": 64, "test": 64}
            cache.update({s: split.subset(range(sizes[s])) for s, split in load_splits(name, image_size=16).items()})
        return cache

    monkeypatch.setattr(engine, "load_splits", first_images)
    monkeypatch.setattr(Trainer, "_plot", lambda self: None)


FLAGS = [arg for key, value in {**TINY, "batch_size": 32, "probe_epochs": 2}.items() if key != "progress"
         for arg in ("--set", f"{key}={json.dumps(value)}")] + ["--no-progress"]


def test_stages_end_to_end(tmp_path, small_digits):
    """train.py --method dino: dino -> finetune -> baseline; the finetune starts from the dino teacher's encoder."""
    out = tmp_path / "run"
    assert main(["--method", "dino", "--out", str(out), "--epochs", "2", *FLAGS]) == 0
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert list(stages) == ["dino", "finetune", "baseline"]
    first = stages["dino"]
    for value in (first["knn_accuracy"], first["random_init_knn_accuracy"], first["clustering"]["accuracy"],
                  first["linear_probe"]["test_accuracy"], first["random_init"]["clustering"]["accuracy"]):
        assert 0.0 <= value <= 1.0
    assert 0.0 <= stages["finetune"]["test_accuracy"] <= 1.0 and 0.0 <= stages["baseline"]["test_accuracy"] <= 1.0
    assert stages["baseline"]["epochs"] == stages["dino"]["epochs"] + stages["finetune"]["epochs"] == 2
    state = ckpt.load(str(out / "dino" / CHECKPOINT))
    for name, value in state["encoder"].items():  # the exported encoder is the teacher's
        assert torch.equal(value, state["method"]["teacher.encoder." + name]), name
    fc1 = "blocks.0.mlp.fc1.weight"
    assert not torch.equal(state["encoder"][fc1], state["method"]["model." + fc1])  # the student has moved on
    # --stage finetune from the sibling dino folder loads that encoder (all but the new classifier).
    trainer = Trainer(build_config("dino", "quick", stage="finetune", out=str(tmp_path / "finetune"), epochs=1,
                                   init=str(out / "dino"), **{**TINY, "batch_size": 32}))
    assert trainer.init_report["skipped"] == ["head.bias", "head.weight"]
    for name, value in trainer.method.encoder.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(value, state["encoder"][name]), name
    assert main(["--method", "dino", "--stage", "finetune", "--out", str(out / "finetune-cli"), "--max-steps", "1",
                 *FLAGS]) == 0
