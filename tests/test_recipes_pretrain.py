"""Paper presets of the pre-training methods as released (issue 13 item 6): small-data DINO (Gani et al.,
hananshafi/vits-for-small-scale-datasets), MAE-CT (ml-jku/MAE-CT stage-2/3 yamls) and LaCViT (longkukuhi/LaCViT).

Each value through ``--print-config`` (per stage: the printed run values under the stage's own), then the values
that code turns into something else through that code: the peak lr from base_lr and the global batch, the warm-up
and the cosine floor (``Trainer.lr_at``), the layer-wise lr scales of MAE-CT's ct stage, the patch size chosen by
image size, drop-path and pooling in the built encoder. Cost: about 10 s on 2 loaded CPU cores (tiny encoders,
digits).
"""
import json

import pytest

from vitfast.config import build_config, stage_config
from vitfast.engine import Trainer
from vitfast.methods.supervised import PAPER_RECIPE
from vitfast.nn.vit import DropPath
from vitfast.train import main

TINY = dict(model="tiny", embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, metrics="", progress=False)


@pytest.fixture
def printed(capsys):
    """The settings of each stage of ``python train.py --method M --preset paper --print-config``."""
    def stages(method):
        assert main(["--method", method, "--preset", "paper", "--print-config"]) == 0
        out = capsys.readouterr().out
        run = json.loads(out[out.index("{"):])
        base = {**{k: v for k, v in run.items() if k not in ("method_config", "stage_overrides")}, **run["method_config"]}
        return {stage: {**base, **values} for stage, values in run["stage_overrides"].items()}
    return stages


def pick(values, *keys):
    return tuple(values[k] for k in keys)


def trainer(method, stage, **overrides):
    """The stage's Trainer as ``run`` builds it (the paper preset's per-stage values, then ``overrides``)."""
    return Trainer(stage_config(build_config(method, "paper", stage=stage, **{**TINY, **overrides}), stage))


# ------------------------------------------------------------------------------------------------- small-data DINO

def test_dino_paper_prints_the_released_recipe(printed):
    s = printed("dino")
    d = s["dino"]
    assert pick(d, "model", "embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size") == (
        "small_data", 192, 9, 12, 2.0, 4)
    assert d["patch_size_by_image_size"] == {"32": 4, "64": 8}  # README: --patch_size 8 for 64-px Tiny-ImageNet
    assert pick(d, "drop_path", "global_pool", "precision", "betas") == (0.1, "token", "fp32", [0.9, 0.999])
    # train_ssl.py: --lr 1e-4 per 256 images, README 2 x --batch_size_per_gpu 256, 30 warm-up epochs, min_lr 1e-6,
    # wd 0.04 -> 0.4, clip 3.0, 200 epochs, freeze_last_layer 1
    assert pick(d, "batch_size", "base_lr", "lr", "warmup_epochs", "min_lr", "weight_decay", "weight_decay_end",
                "grad_clip", "epochs", "freeze_prototypes_epochs") == (
        512, 1e-4, None, 30, 1e-6, 0.04, 0.4, 3.0, 200, 1)
    assert pick(d, "head_hidden_dim", "bottleneck_dim", "n_prototypes", "n_local_crops", "local_crop_size") == (
        512, 256, 1024, 8, 0)
    assert pick(d, "student_temp", "teacher_temp", "warmup_teacher_temp", "warmup_teacher_temp_epochs",
                "centre_momentum", "momentum", "evaluate_teacher") == (0.1, 0.07, 0.04, 10, 0.9, 0.996, True)
    f, b = s["finetune"], s["baseline"]
    assert {k: f[k] for k in PAPER_RECIPE} == {k: b[k] for k in PAPER_RECIPE} == PAPER_RECIPE
    assert pick(f, "epochs", "warmup_epochs", "drop_path") == (100, 10, 0.1) and b["epochs"] == 300


def test_dino_paper_lr_and_patch_through_the_trainer():
    t = trainer("dino", "dino")  # digits are 32 px: the recipe's patch 4
    assert t.config.patch_size == 4 and t.method.model.patch_size == 4
    assert t.peak_lr == pytest.approx(1e-4 * 512 / 256)  # the release's linear rule on its global batch
    warmup = 30 * t.steps_per_epoch
    assert t.lr_at(warmup - 1) == pytest.approx(t.peak_lr) and t.lr_at(t.total_steps) == pytest.approx(1e-6)
    student = [m.drop_prob for m in t.method.model.modules() if isinstance(m, DropPath)]
    teacher = [m.drop_prob for m in t.method.teacher.modules() if isinstance(m, DropPath)]
    assert max(student) == pytest.approx(0.1) and student[0] == 0.0 and teacher and not any(teacher)


# ------------------------------------------------------------------------------------------------------------ MAE-CT

def test_mae_ct_paper_prints_the_released_recipe(printed):
    s = printed("mae-ct")
    assert pick(s["mae"], "batch_size", "accum_steps", "base_lr", "epochs", "warmup_epochs") == (
        4096, 16, 1.5e-4, 800, 40)  # MAE's own paper preset
    for stage, topk in (("head", 1), ("ct", 20)):
        v = s[stage]
        # yamls: effective_batch_size 1024, max_epochs 20, end_percent 20, lr 1e-4 x (2 views x 1024) / 256
        assert pick(v, "batch_size", "accum_steps", "base_lr", "epochs", "warmup_epochs", "min_lr") == (
            1024, 1, 2e-4, 20, 4, 0.0), stage
        assert pick(v, "betas", "weight_decay", "head_weight_decay", "drop_path", "global_pool") == (
            [0.9, 0.95], 0.05, 1e-5, 0.0, "avg"), stage
        assert pick(v, "temperature", "queue_size", "topk", "proj_hidden_dim", "proj_dim", "pred_hidden_dim") == (
            0.15, 65536, topk, 2048, 256, 4096), stage
        assert pick(v, "layer_decay", "projector_momentum", "encoder_momentum", "min_crop_scale", "flip") == (
            0.65, 0.99, 0.9999, 0.08, True), stage


def test_mae_ct_paper_lr_and_layer_scales_through_the_trainer():
    small = dict(patch_size=8, proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16, queue_size=64)
    head = trainer("mae-ct", "head", **small)
    assert head.peak_lr == pytest.approx(8e-4)  # the release's lr 1e-4 scaled by its 2 views x 1024 / 256
    assert head.lr_at(4 * head.steps_per_epoch - 1) == pytest.approx(8e-4)  # 20 % warm-up
    ct = trainer("mae-ct", "ct", **{**small, "depth": 4})
    assert ct.peak_lr == pytest.approx(8e-4)
    scales = sorted({round(g["lr_scale"], 12) for g in ct.optimizer.param_groups})
    assert scales == [round(0.65 ** 2, 12), 0.65, 1.0]  # blocks 2, 3 of 4 learn (the lower half is frozen)


# ------------------------------------------------------------------------------------------------------------ LaCViT

def test_lacvit_paper_prints_the_released_recipe(printed):
    s = printed("lacvit")
    sup = s["supcon"]
    assert pick(sup, "model", "image_size", "patch_size", "drop_path", "global_pool") == ("base", 224, 16, 0.1, "avg")
    # readme: --batch_size 128 --accum_iter 32, 500 epochs, --temp 0.1; no warm-up; cosine to lr x 1e-12
    assert pick(sup, "batch_size", "epochs", "warmup_epochs", "min_lr", "lr") == (4096, 500, 0, 0.0, 1e-4)
    assert pick(sup, "supcon_temperature", "base_temperature", "projection_dim") == (0.1, 0.07, 128)
    # main_linear.py: batch 128, 100 epochs, no weight decay, cosine to 0.2^3 of the peak
    assert pick(s["probe"], "batch_size", "epochs", "warmup_epochs", "weight_decay", "lr", "min_lr") == (
        128, 100, 0, 0.0, 1e-3, pytest.approx(1e-3 * 0.2 ** 3))
    for stage, epochs in (("finetune", 100), ("baseline", 600)):  # main_ce.py: batch 128, cosine to 0.2^3
        assert pick(s[stage], "batch_size", "epochs", "warmup_epochs", "lr", "min_lr", "label_smoothing") == (
            128, epochs, 0, 1e-4, pytest.approx(1e-4 * 0.2 ** 3), 0.0), stage


def test_lacvit_paper_schedule_drop_path_and_pooling_through_the_trainer():
    supcon = trainer("lacvit", "supcon", image_size=32, patch_size=8, batch_size=64)
    assert supcon.lr_at(0) == pytest.approx(1e-4) and supcon.lr_at(supcon.total_steps) == 0.0  # no warm-up, to 0
    assert supcon.method.model.global_pool == "avg"
    assert max(m.drop_prob for m in supcon.method.model.modules() if isinstance(m, DropPath)) == pytest.approx(0.1)
    probe = trainer("lacvit", "probe", image_size=32, patch_size=8)
    assert probe.config.batch_size == 128 and probe.lr_at(0) == pytest.approx(1e-3)
    assert probe.lr_at(probe.total_steps) == pytest.approx(8e-6)
