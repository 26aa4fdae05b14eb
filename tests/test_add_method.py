"""The README's "Adding a method" recipe, followed literally: one new file plus one registry line.

The method file below is written to a temporary folder at test time (a toy self-supervised method: tell
which of 4 rotations each image got); ``register_method("toy_rotation:Rotation")`` is the registry line
(in the repository it goes into vitfast/methods/__init__.py). Then it trains through the CLI: stopped,
resumed, evaluated, listed in --help, its settings reachable by flag and --set, its encoder usable as
another run's --init. Cost: ~15 s on 2 cores (a 32-wide, 1-block ViT, one epoch of digits).
"""
import dataclasses
import json

import pytest
import torch

from vitfast import checkpoint as ckpt
from vitfast.config import build_config, setting
from vitfast.engine import CHECKPOINT, Trainer
from vitfast.methods import METHODS, Method, register_method
from vitfast.train import main

TOY_METHOD = '''
"""Toy rotation prediction (RotNet-style): a self-supervised method in one file."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitfast.config import setting
from vitfast.data import augment
from vitfast.methods import Method


@dataclass
class RotationConfig:
    rotations: int = setting(4, "tell apart rotations by k x 90 degrees, k < rotations")


class Rotation(Method):
    """Tell which rotation each image got (a toy self-supervised method)."""

    name = "toy-rotation"
    Config = RotationConfig
    presets = {
        "quick": dict(model="tiny", embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, patch_size=8, epochs=1,
                      batch_size=64, lr=1e-3, warmup_epochs=0.2, metrics="knn"),
        "paper": dict(model="small_data", epochs=100, batch_size=256, lr=5e-4),
    }

    def __init__(self, config, data):
        super().__init__(config, data)
        self.model = self.build_encoder()
        self.head = nn.Linear(self.model.embed_dim, config.method_config.rotations)
        self.views = augment.eval_transform(data.image_size, data.mean, data.std)

    @property
    def encoder(self):
        return self.model

    def forward(self, images, labels, indices, generator):
        x = self.views(images, generator)
        turns = torch.randint(self.config.method_config.rotations, (x.shape[0],), generator=generator,
                              device=x.device)
        x = torch.where((turns == 1).view(-1, 1, 1, 1), x.rot90(1, (2, 3)), x)
        x = torch.where((turns == 2).view(-1, 1, 1, 1), x.rot90(2, (2, 3)), x)
        x = torch.where((turns == 3).view(-1, 1, 1, 1), x.rot90(3, (2, 3)), x)
        logits = self.head(self.model.forward_head(self.model.forward_features(x), pre_logits=True))
        loss = F.cross_entropy(logits, turns)
        return loss, {"rotation_accuracy": (logits.argmax(1) == turns).float().mean().item()}
'''


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    (tmp_path / "toy_rotation.py").write_text(TOY_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = register_method("toy_rotation:Rotation")  # the one registry line
    yield cls
    METHODS.pop(cls.name, None)


def test_a_method_in_one_file_trains_resumes_and_evaluates(tmp_path, toy_method, capsys):
    run = str(tmp_path / "run")
    assert main(["--method", "toy-rotation", "--out", run, "--max-steps", "3", "--no-progress"]) == 0
    assert ckpt.load(f"{run}/{CHECKPOINT}")["step"] == 3
    assert main(["--resume", "--out", run, "--no-progress"]) == 0
    with open(f"{run}/summary.json") as f:
        summary = json.load(f)
    assert summary["method"] == "toy-rotation" and summary["steps"] == 1295 // 64
    assert 0.0 <= summary["knn_accuracy"] <= 1.0 and "random_init_knn_accuracy" in summary
    with open(f"{run}/metrics.csv") as f:
        assert "rotation_accuracy" in f.readline()
    with open(f"{run}/config.json") as f:
        assert json.load(f)["method_config"] == {"rotations": 4}
    # Another method starts from its encoder through the method API (encoder_state_dict / load_encoder).
    config = build_config("supervised", "quick", init=run, embed_dim=32, depth=1, num_heads=2, patch_size=8,
                          out=str(tmp_path / "ft"), progress=False)
    trainer = Trainer(config)
    stored = ckpt.load(f"{run}/{CHECKPOINT}")["encoder"]
    assert trainer.init_report["loaded"] == len(stored)  # every tensor (the toy encoder has no classifier head)
    assert torch.equal(trainer.method.model.blocks[0].attn.qkv.weight, stored["blocks.0.attn.qkv.weight"])


def test_the_registry_drives_help_choices_and_settings(toy_method, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "toy-rotation" in text and "Tell which rotation each image got" in text
    assert "--rotations VALUE" in text and "toy-rotation: tell apart rotations" in text
    assert main(["--method", "toy-rotation", "--rotations", "2", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["method_config"] == {"rotations": 2}
    assert main(["--method", "toy-rotation", "--preset", "paper", "--set", "rotations=3", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["model"], printed["epochs"], printed["method_config"]["rotations"]) == ("small_data", 100, 3)


def test_registration_refuses_what_would_fail_later():
    @dataclasses.dataclass
    class Clashing:
        epochs: int = setting(3, "a setting named like a shared field")

    def method(name="toy-bad", config=Clashing, presets=None):
        return type("Bad", (Method,), {"name": name, "Config": config,
                                       "presets": presets if presets is not None else {"quick": {}, "paper": {}}})

    with pytest.raises(ValueError, match=r"settings \['epochs'\] clash with the shared config"):
        register_method(method())
    with pytest.raises(ValueError, match=r"presets \['paper'\] are missing"):
        register_method(method(config=dataclasses.make_dataclass("NoneHere", []), presets={"quick": {}}))
    with pytest.raises(ValueError, match=r"preset 'quick' sets unknown keys \['mask_ratio'\]"):
        register_method(method(config=dataclasses.make_dataclass("NoneHere", []),
                               presets={"quick": {"mask_ratio": 0.5}, "paper": {}}))
    with pytest.raises(ValueError, match="the name 'mae' is taken"):
        register_method(method(name="mae", config=dataclasses.make_dataclass("NoneHere", [])))
    with pytest.raises(TypeError, match="expected a vitfast.methods.Method subclass"):
        register_method(dict)
    assert "toy-bad" not in METHODS
