"""The training engine: run folder, exact resume, atomic checkpoints, CLI errors, DDP equivalence."""
import json
import os
import subprocess
import sys

import pytest
import torch

from vitfast import checkpoint as ckpt
from vitfast.config import build_config
from vitfast.engine import CHECKPOINT, Trainer
from vitfast.train import main

# A model small enough for a few CPU steps per test.
TINY = dict(embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, patch_size=8, batch_size=32, decoder_dim=32,
            decoder_depth=1, decoder_heads=2, metrics="", progress=False, warmup_epochs=0.5)


def run(tmp_path, name, method="mae", **overrides):
    config = build_config(method, "quick", out=str(tmp_path / name), **{**TINY, **overrides})
    summary = Trainer(config).fit()
    return summary, ckpt.load(os.path.join(config.out, CHECKPOINT))


def test_run_folder_contents(tmp_path):
    summary, state = run(tmp_path, "run", method="supervised", epochs=2, metrics="knn")
    folder = tmp_path / "run"
    for name in ("config.json", "metrics.csv", CHECKPOINT, "summary.json", "loss.png", "accuracy.png"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "config.json").read_text())["method"] == "supervised"
    rows = (folder / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,step")
    written = json.loads((folder / "summary.json").read_text())
    for key in ("test_accuracy", "val_accuracy", "knn_accuracy"):
        assert 0.0 <= written[key] <= 1.0, key
    assert state["step"] == summary["steps"] > 0


@pytest.mark.parametrize("method", ["mae", "supervised"])
def test_resume_is_exact(tmp_path, method):
    """Stopping mid-epoch and resuming gives the same weights as an uninterrupted run (same data order and RNG)."""
    _, full = run(tmp_path, "full", method=method, epochs=2)
    steps = full["step"]
    assert steps >= 4
    config = build_config(method, "quick", out=str(tmp_path / "split"), epochs=2, max_steps=steps // 2 + 1,
                          **TINY)
    assert Trainer(config).fit() == {"stopped_at_step": steps // 2 + 1}
    config = build_config(method, "quick", out=str(tmp_path / "split"), epochs=2, resume=True, **TINY)
    Trainer(config).fit()
    resumed = ckpt.load(str(tmp_path / "split" / CHECKPOINT))
    assert resumed["step"] == steps
    for key, value in full["method"].items():
        assert torch.equal(value, resumed["method"][key]), key
    assert [r["loss"] for r in resumed["history"]] == pytest.approx([r["loss"] for r in full["history"]], rel=0, abs=0)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    ckpt.atomic_save({"format": 1, "value": 1}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_save({"format": 1, "value": 2}, path)
    monkeypatch.undo()
    assert ckpt.load(path)["value"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary file left behind


def test_corrupt_checkpoint_is_named(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="bad.pt is unreadable or corrupt"):
        ckpt.load(str(path))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ckpt.load(str(tmp_path / "missing.pt"))


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--method", "nope"])
    with pytest.raises(SystemExit, match="--resume needs --out"):
        main(["--resume"])
    with pytest.raises(SystemExit, match="unknown config keys"):
        main(["--set", "no_such_key=1", "--print-config"])
    assert main(["--method", "supervised", "--set", "epochs=3", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 3


def test_init_from_pretraining_run(tmp_path):
    """Fine-tuning: a supervised run initialised from an MAE run starts from the MAE encoder."""
    _, pretrained = run(tmp_path, "mae", method="mae", epochs=1, max_steps=2)
    config = build_config("supervised", "quick", out=str(tmp_path / "ft"), init=str(tmp_path / "mae"),
                          epochs=1, **TINY)
    trainer = Trainer(config)
    weight = trainer.method.model.blocks[0].attn.qkv.weight
    assert torch.equal(weight, pretrained["method"]["model.blocks.0.attn.qkv.weight"])


DDP_FLAGS = ["--method", "supervised", "--epochs", "1", "--max-steps", "3", "--no-progress",
             "--set", "augment=none", "--set", "metrics=", "--set", "embed_dim=32", "--set", "depth=1",
             "--set", "num_heads=2", "--set", "patch_size=8", "--set", "label_smoothing=0"]


def test_two_processes_equal_one_process_with_the_full_batch(tmp_path):
    """torchrun with 2 CPU processes x 16 images == 1 process x 32 images, to fp32 tolerance."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = tmp_path / "one"
    two = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "vitfast.train", *DDP_FLAGS, "--batch-size", "32", "--out", str(one)],
                   check=True, env=env, capture_output=True)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "vitfast.train", *DDP_FLAGS, "--batch-size", "16", "--out", str(two)],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = ckpt.load(str(one / CHECKPOINT)), ckpt.load(str(two / CHECKPOINT))
    assert a["step"] == b["step"] == 3
    for key, value in a["method"].items():
        torch.testing.assert_close(b["method"][key], value, rtol=1e-5, atol=1e-6, msg=key)
