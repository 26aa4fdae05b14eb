"""Exact resume in every training mode: stop mid-epoch (--max-steps), --resume, and compare bit for bit.

tests/test_train.py checks the plain fp32 case. Here: stochastic layers (drop-path and dropout), the
supervised recipe's random augmentations (mixup / cutmix, random erasing, AutoAugment on torch's global
RNG), fp16 with its GradScaler, bf16, every method, and a multi-stage RelViT run interrupted inside a
later stage. Every parameter, every optimizer and GradScaler state tensor, the RNG states, the loader
position and the per-epoch losses must be equal (torch.equal, not a tolerance).

Cost: a 2-block, 32-wide ViT on 320 16-px digits (patch 8, batch 32: 10 steps per epoch), one epoch per run.
"""
import os

import pytest
import torch

from vitfast import checkpoint as ckpt
from vitfast import engine
from vitfast.config import build_config
from vitfast.engine import CHECKPOINT, Trainer
from vitfast.methods.base import Method

# 16-px digits (a 2 x 2 grid of 8-px patches), 320 training images, batch 32: 10 steps per epoch.
TINY = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=8, batch_size=32, metrics="",
            progress=False, warmup_epochs=0.5, device="cpu", image_size=16, epochs=1)
MAE_TINY = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)  # MAE's own settings


_SPLITS = {}


@pytest.fixture(autouse=True)
def small_and_quiet(monkeypatch):
    """The first 320 / 64 / 64 images of digits' splits, and no plots (matplotlib costs seconds, holds no state)."""
    load_splits = engine.load_splits

    def first_images(name, **kwargs):
        key = (name, tuple(sorted(kwargs.items())))
        if key not in _SPLITS:  # loaded once per test session
            sizes = {"train": 320, "val": 64, "test": 64}
            _SPLITS[key] = {s: split.subset(range(sizes[s])) for s, split in load_splits(name, **kwargs).items()}
        return _SPLITS[key]

    monkeypatch.setattr(engine, "load_splits", first_images)
    monkeypatch.setattr(Trainer, "_plot", lambda self: None)


def assert_same_state(full, resumed, path=""):
    """Every tensor equal (torch.equal), every other leaf equal, in nested dicts / lists / tuples."""
    if isinstance(full, torch.Tensor):
        assert isinstance(resumed, torch.Tensor) and full.dtype == resumed.dtype, path
        assert torch.equal(full, resumed), f"{path} differs after resume"
    elif isinstance(full, dict):
        assert set(full) == set(resumed), f"{path}: keys {sorted(map(str, full))} != {sorted(map(str, resumed))}"
        for key in full:
            assert_same_state(full[key], resumed[key], f"{path}.{key}")
    elif isinstance(full, (list, tuple)):
        assert len(full) == len(resumed), path
        for i, (a, b) in enumerate(zip(full, resumed)):
            assert_same_state(a, b, f"{path}[{i}]")
    elif hasattr(full, "shape") and hasattr(full, "dtype"):  # numpy arrays of the RNG state
        assert (full == resumed).all(), f"{path} differs after resume"
    else:
        assert full == resumed, f"{path}: {full!r} != {resumed!r}"


def assert_resumed_equals_full(full, resumed):
    assert resumed["step"] == full["step"]
    for key in ("method", "optimizer", "scaler", "loader", "rng", "baseline"):
        assert_same_state(full[key], resumed[key], key)
    # Per-epoch rows: every training metric equal; wall-clock columns naturally differ.
    clock = {"seconds", "images_per_second"}
    strip = [{k: v for k, v in row.items() if k not in clock} for row in full["history"]]
    assert strip == [{k: v for k, v in row.items() if k not in clock} for row in resumed["history"]]


def train_full_and_split(tmp_path, method, stop_at, **overrides):
    """(checkpoint of an uninterrupted run, checkpoint of the run stopped at ``stop_at`` then resumed)."""
    settings = {**TINY, **(MAE_TINY if method == "mae" else {}), **overrides}
    Trainer(build_config(method, "quick", out=str(tmp_path / "full"), **settings)).fit()
    split = str(tmp_path / "split")
    assert Trainer(build_config(method, "quick", out=split, max_steps=stop_at, **settings)).fit() == \
        {"stopped_at_step": stop_at}
    # Anything the interrupted process left in torch's global RNG must not matter to the resumed one.
    torch.manual_seed(12345)
    Trainer(build_config(method, "quick", out=split, resume=True, **settings)).fit()
    return (ckpt.load(str(tmp_path / "full" / CHECKPOINT)), ckpt.load(os.path.join(split, CHECKPOINT)))


@pytest.fixture
def with_dropout(monkeypatch):
    """Every encoder built with attention, projection and pos-embed dropout (the config has no dropout field)."""
    build = Method.build_encoder

    def build_with_dropout(self, *args, **kwargs):
        return build(self, *args, attn_drop_rate=0.1, proj_drop_rate=0.1, pos_drop_rate=0.1, **kwargs)

    monkeypatch.setattr(Method, "build_encoder", build_with_dropout)


# (method, mid-epoch stop step, overrides); the epoch has 10 steps.
CASES = {
    "supervised-droppath-dropout-recipe": ("supervised", 6, dict(drop_path=0.3, mixup=0.8, cutmix=1.0,
                                                                  random_erasing=0.25, autoaugment=True)),
    "supervised-fp16": ("supervised", 3, dict(precision="fp16", drop_path=0.2, mixup=0.8, cutmix=1.0)),
    # With the per-epoch k-NN in the history and the random-init k-NN baseline (both compared).
    "mae-bf16-droppath": ("mae", 6, dict(precision="bf16", drop_path=0.3, eval_every=1, metrics="knn")),
    "mae-fp16": ("mae", 3, dict(precision="fp16")),
    "relvit-upstream-bf16": ("relvit", 6, dict(precision="bf16", drop_path=0.3)),
    "simclr-bf16-droppath": ("simclr", 6, dict(precision="bf16", drop_path=0.3)),
    # The momentum teacher (its EMA weights and copied BatchNorm buffers) is part of the compared state.
    "mocov3-fp16-knn": ("mocov3", 3, dict(precision="fp16", eval_every=1, metrics="knn")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_exact_in_every_mode(tmp_path, case, with_dropout):
    method, stop_at, overrides = CASES[case]
    full, resumed = train_full_and_split(tmp_path, method, stop_at, **overrides)
    assert full["step"] == 10 and len(full["history"]) == 1
    if overrides.get("eval_every"):
        assert "knn_accuracy" in full["history"][0] and "random_init_knn_accuracy" in full["baseline"]
    assert_resumed_equals_full(full, resumed)
    if overrides.get("precision") == "fp16":
        # The scaler is really in use (enabled, its scale saved); its state is compared above.
        assert full["scaler"] and full["scaler"]["scale"] > 0


def test_fp16_scaler_state_survives_a_resume(tmp_path):
    """The GradScaler's scale and growth tracker are restored, not re-initialised: a run whose scale has
    moved away from the initial 2**16 (skipped steps on overflow) still resumes bit for bit."""
    full, resumed = train_full_and_split(tmp_path, "supervised", 3, precision="fp16", lr=0.5)
    assert full["scaler"]["scale"] < 2.0 ** 16, "the scale never moved: this test would not see a lost scaler"
    assert_resumed_equals_full(full, resumed)


def test_resume_after_a_crash_from_a_periodic_checkpoint(tmp_path, monkeypatch):
    """A process killed mid-epoch (not a clean --max-steps stop) resumes from its last checkpoint_every
    checkpoint, here step 4 of 10, and still ends equal to the uninterrupted run."""
    settings = dict(TINY, checkpoint_every=2, drop_path=0.2, random_erasing=0.5, precision="fp16")
    Trainer(build_config("supervised", "quick", out=str(tmp_path / "full"), **settings)).fit()
    train_step = Trainer.train_step

    def crash_at_step_5(self, *args):
        if self.step == 5:
            raise KeyboardInterrupt("killed")
        return train_step(self, *args)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_5)
    split = str(tmp_path / "split")
    with pytest.raises(KeyboardInterrupt):
        Trainer(build_config("supervised", "quick", out=split, **settings)).fit()
    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert ckpt.load(os.path.join(split, CHECKPOINT))["step"] == 4
    torch.manual_seed(7)
    Trainer(build_config("supervised", "quick", out=split, resume=True, **settings)).fit()
    assert_resumed_equals_full(ckpt.load(str(tmp_path / "full" / CHECKPOINT)), ckpt.load(os.path.join(split, CHECKPOINT)))


def test_multi_stage_run_resumes_inside_a_later_stage(tmp_path):
    """RelViT upstream (1 epoch) -> finetune (2 epochs, initialised from upstream) -> scratch, stopped mid-epoch
    inside finetune (--max-steps counts each stage's own steps), then resumed with one command: every stage's
    final checkpoint equals the uninterrupted run's."""
    epochs = {"upstream": {"epochs": 1}, "finetune": {"epochs": 2}, "scratch": {"epochs": 1}}
    settings = dict({k: v for k, v in TINY.items() if k != "epochs"}, drop_path=0.2, stage_overrides=epochs)
    engine.run(build_config("relvit", "quick", out=str(tmp_path / "full"), **settings))
    split = str(tmp_path / "split")
    assert engine.run(build_config("relvit", "quick", out=split, max_steps=15, **settings)) == {"stopped_at_step": 15}
    assert os.path.isfile(os.path.join(split, "upstream", "summary.json"))
    assert not os.path.exists(os.path.join(split, "scratch"))
    torch.manual_seed(999)
    engine.run(build_config("relvit", "quick", out=split, resume=True, **settings))
    for stage, steps in (("upstream", 10), ("finetune", 20), ("scratch", 10)):
        full = ckpt.load(str(tmp_path / "full" / stage / CHECKPOINT))
        resumed = ckpt.load(os.path.join(split, stage, CHECKPOINT))
        assert full["step"] == steps, stage
        assert_resumed_equals_full(full, resumed)
