"""SimCLR and MoCo v3 (vitfast/methods/simclr.py, mocov3.py) and the momentum teacher (vitfast/nn/momentum.py).

The losses are recomputed by hand from the methods' own modules (docs/methods.md §7.1, §7.2: dense logits, plain
cross-entropy), the schedule and the EMA against their formulas, the heads' layouts against MoCo v3's recipe, the
encode_view hook (DILEMMA's entry point) against what it promises, and both methods train, stop, resume exactly and
evaluate through the CLI. Cost: ~20 s on 2 cores (32-wide, 1-block ViTs; 320 digits for the training runs).
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitfast import checkpoint as ckpt
from vitfast.config import build_config
from vitfast.engine import CHECKPOINT, Trainer
from vitfast.methods import DataInfo, get_method
from vitfast.nn import MomentumTeacher, cosine_momentum
from vitfast.train import main

TINY = dict(embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, patch_size=8, proj_hidden_dim=48, proj_dim=16)
HEADS = {"simclr": {}, "mocov3": dict(pred_hidden_dim=40)}
DATA = DataInfo(channels=1, image_size=16, num_classes=10, mean=(0.5,), std=(0.25,))


def tiny(name, **overrides):
    torch.manual_seed(0)
    config = build_config(name, "quick", **TINY, **HEADS[name], **overrides)
    return get_method(name)(config, DATA).train()


def two_views(seed=0, batch=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 1, 16, 16, generator=g) for _ in range(2)]


def fixed_views(method, views):
    """The method sees exactly ``views`` (no random augmentation) and they are returned for the hand computation."""
    method.train_views = lambda images, generator: [v.clone() for v in views]
    return torch.zeros(views[0].shape[0], 1, 16, 16, dtype=torch.uint8)


def pooled(encoder, x):
    return encoder.forward_head(encoder.forward_features(x), pre_logits=True)


def cross_entropy_by_hand(logits, targets):
    """-log softmax(logits)[i, targets[i]], mean over rows, written out."""
    return (torch.logsumexp(logits, 1) - logits[torch.arange(logits.shape[0]), targets]).mean()


# --- the momentum schedule and the teacher --------------------------------------------------------------------

def test_cosine_momentum_schedule():
    assert cosine_momentum(0, 1000, 0.99) == 0.99
    assert cosine_momentum(1000, 1000, 0.99) == 1.0
    assert cosine_momentum(500, 1000, 0.99) == pytest.approx(0.995, abs=1e-12)
    assert cosine_momentum(250, 1000, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2, abs=1e-12)
    values = [cosine_momentum(s, 100, 0.9) for s in range(101)]
    assert all(a < b for a, b in zip(values, values[1:]))  # strictly rising
    assert cosine_momentum(150, 100, 0.9) == 1.0 and cosine_momentum(7, 0, 0.9) == 1.0
    with pytest.raises(ValueError, match="base and final must be in"):
        cosine_momentum(0, 10, 1.5)


def test_teacher_update_is_the_ema_of_parameters_and_copies_buffers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    teacher = MomentumTeacher(net=student)
    assert all(not p.requires_grad for p in teacher.parameters())
    student(torch.randn(8, 3))  # moves the student's running statistics
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.update({"net": student}, 0.9)
    for name, value in student.named_parameters():
        torch.testing.assert_close(teacher["net"].get_parameter(name), 0.9 * before["net." + name] + 0.1 * value,
                                   rtol=1e-6, atol=1e-7)
    for name, value in student.named_buffers():
        assert torch.equal(teacher["net"].get_buffer(name), value), name
    teacher.update({"net": student}, 1.0)  # m = 1 keeps the teacher
    teacher.copy_from({"net": student})
    assert all(torch.equal(a, b) for a, b in zip(teacher["net"].state_dict().values(), student.state_dict().values()))
    with pytest.raises(ValueError, match=r"student parts must be \['net'\]"):
        teacher.update({"other": student}, 0.5)


def test_mocov3_teacher_gets_no_gradient_and_follows_the_student_by_ema():
    method = tiny("mocov3")
    teacher_ids = {id(p) for p in method.teacher.parameters()}
    assert teacher_ids and not teacher_ids & {id(p) for g in method.param_groups() for p in g["params"]}
    optimizer = torch.optim.AdamW(method.param_groups(), lr=1e-2)
    images = fixed_views(method, two_views())
    old_teacher = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    loss, _ = method(images, None, None, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert method.model.blocks[0].attn.qkv.weight.grad is not None
    optimizer.step()
    method.after_step(3, 10)
    m = cosine_momentum(3, 10, 0.99)
    assert 0.99 < m < 1.0
    student = {"encoder." + k: v for k, v in method.model.state_dict().items()}
    student.update({"projector." + k: v for k, v in method.projector.state_dict().items()})
    moved = 0
    for name, param in method.teacher.named_parameters():
        expected = m * old_teacher[name] + (1 - m) * student[name]
        torch.testing.assert_close(param, expected, rtol=1e-6, atol=1e-7)
        moved += not torch.equal(param, old_teacher[name])
    assert moved > 0
    for name, buffer in method.teacher.named_buffers():
        assert torch.equal(buffer, student[name]), name


# --- heads -------------------------------------------------------------------------------------------------------

def test_mocov3_heads_projector_three_layers_predictor_two_last_bn_without_affine():
    method = tiny("mocov3")
    for head, dims in ((method.projector, [(32, 48), (48, 48), (48, 16)]), (method.predictor, [(16, 40), (40, 16)])):
        linears = [m for m in head if isinstance(m, nn.Linear)]
        assert [(l.in_features, l.out_features) for l in linears] == dims
        assert all(l.bias is None for l in linears)  # a BN follows every Linear
        norms = [m for m in head if isinstance(m, nn.BatchNorm1d)]
        assert len(norms) == len(linears) and isinstance(head[-1], nn.BatchNorm1d)
        assert not head[-1].affine and head[-1].weight is None
        assert all(n.affine for n in norms[:-1])
    x = torch.randn(5, 32)
    assert method.predictor(method.projector(x)).shape == (5, 16)
    assert set(method.teacher.keys()) == {"encoder", "projector"}  # the predictor has no momentum copy


def test_simclr_head_is_a_two_layer_mlp_without_batch_norm():
    method = tiny("simclr")
    linears = [m for m in method.projector if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(32, 48), (48, 16)]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in method.projector.modules())


# --- losses against the formulas -----------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_simclr_loss_is_ntxent(temperature):
    method = tiny("simclr", temperature=temperature)
    views = two_views()
    loss, metrics = method(fixed_views(method, views), None, None, torch.Generator().manual_seed(0))
    z = torch.cat([method.projector(pooled(method.model, v)) for v in views])
    z = z / z.norm(dim=1, keepdim=True)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(12, dtype=torch.bool), float("-inf"))  # a row is not its own negative
    partner = torch.cat([torch.arange(6, 12), torch.arange(6)])
    expected = cross_entropy_by_hand(logits, partner)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert metrics["ntxent"] == pytest.approx(expected.item(), rel=1e-5)


def test_mocov3_loss_is_symmetric_infonce_times_two_tau():
    tau = 0.2
    method = tiny("mocov3", temperature=tau)
    with torch.no_grad():  # a teacher that differs from the student, so keys and queries are not the same network
        for p in method.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    views = two_views(1)
    loss, metrics = method(fixed_views(method, views), None, None, torch.Generator().manual_seed(0))
    q = [F.normalize(method.predictor(method.projector(pooled(method.model, v))), dim=1) for v in views]
    with torch.no_grad():
        k = [F.normalize(method.teacher["projector"](pooled(method.teacher["encoder"], v)), dim=1) for v in views]
    diagonal = torch.arange(6)
    expected = 2 * tau * (cross_entropy_by_hand(q[0] @ k[1].T / tau, diagonal)
                          + cross_entropy_by_hand(q[1] @ k[0].T / tau, diagonal))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert metrics["infonce"] == pytest.approx(expected.item(), rel=1e-5)
    # The same pairs without the 2 tau factor, or one direction only, would be other numbers.
    assert not math.isclose(loss.item(), expected.item() / (2 * tau), rel_tol=1e-3)


# --- the encode_view hook (DILEMMA's entry point) ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["simclr", "mocov3"])
def test_encode_view_is_every_student_pass_and_its_extra_loss_is_added(name):
    method = tiny(name)
    plain_views = two_views(2)
    images = fixed_views(method, plain_views)
    base, _ = method(images, None, None, torch.Generator().manual_seed(0))
    seen, extras = [], iter([torch.tensor(0.3), torch.tensor(0.7)])
    encode_view = type(method).encode_view

    def hooked(self, x, generator):
        seen.append(x.clone())
        pooled_features, zero, _ = encode_view(self, x, generator)
        assert zero.ndim == 0 and zero.item() == 0.0
        return pooled_features, next(extras), {"probe": float(len(seen))}

    method.encode_view = hooked.__get__(method)
    loss, metrics = method(images, None, None, torch.Generator().manual_seed(0))
    assert len(seen) == 2 and all(torch.equal(a, b) for a, b in zip(seen, plain_views))  # the teacher never calls it
    torch.testing.assert_close(loss, base + 0.5, rtol=1e-6, atol=1e-6)  # + mean of the views' extra losses
    assert metrics["probe"] == 1.5  # metrics averaged over the views


# --- end to end through the CLI, with an exact resume ------------------------------------------------------------

def flags(name, metrics):
    values = {**TINY, **HEADS[name], "batch_size": 32, "epochs": 1, "warmup_epochs": 0.5, "image_size": 16,
              "metrics": metrics, "device": "cpu"}
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


@pytest.mark.parametrize("name", ["simclr", "mocov3"])
def test_train_stop_resume_exactly_and_evaluate(tmp_path, small_digits, name):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    assert main(["--method", name, "--out", full, "--no-progress", *flags(name, metrics="")]) == 0
    assert main(["--method", name, "--out", split, "--max-steps", "4", "--no-progress", *flags(name, "knn")]) == 0
    assert ckpt.load(os.path.join(split, CHECKPOINT))["step"] == 4
    torch.manual_seed(123)  # whatever the interrupted process left in the global RNG must not matter
    assert main(["--resume", "--out", split, "--no-progress"]) == 0
    a, b = ckpt.load(os.path.join(full, CHECKPOINT)), ckpt.load(os.path.join(split, CHECKPOINT))
    assert a["step"] == b["step"] == 10
    assert set(a["method"]) == set(b["method"])
    if name == "mocov3":
        assert any(key.startswith("teacher.encoder.") for key in a["method"])  # the teacher is in the checkpoint
    for key, value in a["method"].items():
        assert torch.equal(value, b["method"][key]), key
    with open(os.path.join(split, "summary.json")) as f:
        summary = json.load(f)
    assert 0.0 <= summary["knn_accuracy"] <= 1.0 and "random_init_knn_accuracy" in summary
    with open(os.path.join(split, "metrics.csv")) as f:
        assert ("ntxent" if name == "simclr" else "infonce") in f.readline()
