"""Recipe values of the paper presets (issue 13 items 2-5), pinned through --print-config and the code that uses them:
the global batch and gradient accumulation, the validation carve-out, RelViT's released schedule and drop-path, MAE's
weight-decay groups and probe pooling."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from vitfast.config import UserError, build_config, stage_config
from vitfast.data import load_splits
from vitfast.engine import Trainer
from vitfast.methods import get_method
from vitfast.nn.vit import DropPath
from vitfast.train import main

TINY = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=8, metrics="", progress=False)


def test_paper_presets_print_the_recipes(capsys):
    def printed_config(*args):  # what `python train.py ... --print-config` prints
        assert main([*args, "--print-config"]) == 0
        out = capsys.readouterr().out
        return json.loads(out[out.index("{"):])

    mae = printed_config("--method", "mae", "--preset", "paper")
    assert (mae["batch_size"], mae["accum_steps"], mae["base_lr"], mae["global_pool"]) == (4096, 16, 1.5e-4, "token")
    relvit = printed_config("--method", "relvit", "--preset", "paper")
    assert (relvit["drop_path"], relvit["lr_schedule"], relvit["min_lr"]) == (0.1, "quarter-cosine", 1.25e-6)
    assert relvit["method_config"]["crop_padding"] == 4
    for stage, values in relvit["stage_overrides"].items():  # warm-up: 10 % of every stage's epochs
        assert values["warmup_epochs"] == pytest.approx(0.1 * values["epochs"]), stage
    given = printed_config("--method", "mae", "--val-fraction", "0", "--batch-size", "96", "--accum-steps", "3")
    assert (given["val_fraction"], given["batch_size"], given["accum_steps"]) == (0, 96, 3)


def test_relvit_lr_follows_the_released_schedule_and_drop_path_is_on():
    config = stage_config(build_config("relvit", "paper", stage="upstream", model="tiny", image_size=None,
                                       batch_size=64, accum_steps=1, **TINY), "upstream")  # as run() builds it
    assert (config.epochs, config.warmup_epochs) == (100, 10)  # the stage's own values, not the run's defaults
    trainer = Trainer(config)
    total, peak = trainer.total_steps, trainer.peak_lr
    warmup = config.warmup_epochs * trainer.steps_per_epoch
    assert warmup == pytest.approx(0.1 * total)
    released = lambda step: peak - (peak - 1.25e-6) * (1 - math.cos(step / total * math.pi / 2))  # utils.py's form
    assert trainer.lr_at(total // 2) == pytest.approx(released(total // 2), rel=1e-12)
    assert trainer.lr_at(total - 1) == pytest.approx(released(total - 1), rel=1e-12)
    assert trainer.lr_at(int(warmup) - 1) == pytest.approx(peak)  # the end of the linear warm-up
    rates = [m.drop_prob for m in trainer.method.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.1)


def test_mae_decays_cls_and_mask_tokens_as_its_release():
    config = build_config("mae", "quick", **TINY, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    method = get_method("mae")(config, SimpleNamespace(channels=3, image_size=32, num_classes=10,
                                                       mean=(0.5,) * 3, std=(0.5,) * 3))
    names = {id(p): n for n, p in method.named_parameters()}
    decay, no_decay = ([names[id(p)] for p in g["params"]] for g in method.param_groups())
    assert {"model.cls_token", "decoder.mask_token"} <= set(decay)
    assert all(n.endswith(".bias") or "norm" in n for n in no_decay), no_decay
    assert not any(n.endswith(".bias") for n in decay)


def _one_step(accum_steps):
    config = build_config("relvit", "quick", stage="finetune", augment="none", batch_size=32, accum_steps=accum_steps,
                          epochs=1, lr=1e-3, warmup_epochs=0, **TINY)
    trainer = Trainer(config)
    images, labels, indices = next(iter(trainer.loader))
    metrics = trainer.train_step(images, labels, indices)
    return metrics["loss"], [p.detach().clone() for p in trainer.method.parameters()]


def test_accumulated_micro_batches_give_the_step_of_the_whole_batch():
    """A per-image loss (here RelViT fine-tuning, no augmentation): 4 micro-batches of 8 = one batch of 32."""
    whole_loss, whole = _one_step(1)
    split_loss, split = _one_step(4)
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(whole, split))


def test_global_batch_is_split_over_ranks_and_micro_batches():
    def rank_batch(batch_size, accum_steps, world, method="mae"):
        fake = SimpleNamespace(config=SimpleNamespace(batch_size=batch_size, accum_steps=accum_steps, method=method),
                               dist=SimpleNamespace(world_size=world))
        return Trainer._rank_batch(fake, get_method(method))

    assert rank_batch(256, 1, 1) == 256 and rank_batch(256, 1, 8) == 32 and rank_batch(256, 4, 2) == 128
    with pytest.raises(UserError, match="divisible by the number of processes"):
        rank_batch(100, 1, 8)
    with pytest.raises(UserError, match="divisible"):
        rank_batch(96, 5, 1)
    with pytest.raises(UserError, match="depends on the whole batch"):
        rank_batch(64, 2, 1, method="simclr")


def test_val_fraction_zero_trains_on_the_whole_train_split_and_selects_nothing(tmp_path):
    full = load_splits("digits", val_fraction=0.0)
    default = load_splits("digits")
    assert len(full["val"]) == 0 and len(full["train"]) == len(default["train"]) + len(default["val"])
    config = build_config("supervised", "quick", val_fraction=0.0, epochs=1, batch_size=64, out=str(tmp_path / "run"),
                          **{**TINY, "metrics": "knn,linear"}, probe_epochs=2)
    summary = Trainer(config).fit()
    assert "val_accuracy" not in summary and 0.0 <= summary["test_accuracy"] <= 1.0
    probe = summary["linear_probe"]
    assert probe["val_accuracy"] is None and probe["best_epoch"] is None and 0.0 <= probe["test_accuracy"] <= 1.0
    assert "knn_val_accuracy" not in summary


@pytest.mark.parametrize("image_size, given, expected", [(None, None, 4), (64, None, 8), (64, 4, 4)])
def test_relvit_paper_patch_follows_the_image_size_unless_given(image_size, given, expected):
    """The release: patch 4 on 32-px data, 8 on 64-px data; a --patch-size the user gives wins."""
    config = build_config("relvit", "paper", stage="upstream", image_size=image_size, patch_size=given,
                          embed_dim=32, depth=1, num_heads=2, metrics="", progress=False)
    trainer = Trainer(config)
    assert trainer.config.patch_size == trainer.method.model.patch_size == expected
    assert json.loads(trainer.config.to_json())["patch_size"] == expected  # what config.json will say


def test_print_config_with_a_stage_shows_the_values_that_stage_runs_with(capsys):
    assert main(["--method", "relvit", "--preset", "paper", "--stage", "finetune", "--print-config"]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{"):])
    assert (printed["stage"], printed["epochs"], printed["warmup_epochs"]) == ("finetune", 100, 10)
