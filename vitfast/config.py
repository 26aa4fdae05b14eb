"""Training configuration: one flat dataclass, and per-method presets as data.

Presets: ``quick`` (default; minutes on a laptop CPU, on the embedded ``digits`` data) and ``paper``
(the recipe of the method's paper, docs/methods.md section cited beside each). Command-line flags
override preset values; ``--set key=value`` reaches every field.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple


@dataclass
class TrainConfig:
    method: str = "mae"
    preset: str = "quick"
    stage: Optional[str] = None            # two-stage methods: run one stage only
    # data
    dataset: str = "digits"
    data_root: Optional[str] = None
    download: bool = False
    image_size: Optional[int] = None       # resize the dataset's images (e.g. STL-10 96 px -> 64)
    # model (a vitfast.nn.VIT_CONFIGS name plus overrides)
    model: str = "tiny"
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    patch_size: Optional[int] = None
    drop_path: float = 0.0
    global_pool: str = "token"             # features for evaluation and the classifier: "token" (CLS) or "avg"
    init: Optional[str] = None             # checkpoint (a run folder or .pt) whose encoder initialises this run
    # optimisation
    epochs: int = 10
    batch_size: int = 128                  # per process
    lr: Optional[float] = None             # absolute peak lr; None = base_lr * global batch / 256
    base_lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 1.0
    grad_clip: Optional[float] = None
    # supervised
    label_smoothing: float = 0.0
    mixup: float = 0.0                     # mixup alpha (0 = off)
    cutmix: float = 0.0                    # cutmix alpha (0 = off)
    random_erasing: float = 0.0            # probability
    autoaugment: bool = False              # torchvision's CIFAR-10 AutoAugment policy (one draw per group of 8 images)
    augment: str = "default"               # "default" (the method's recipe) or "none"
    # MAE
    mask_ratio: float = 0.75
    norm_pix: bool = True
    decoder_dim: int = 64
    decoder_depth: int = 2
    decoder_heads: int = 4
    # evaluation
    knn_k: int = 20
    probe_epochs: int = 50
    eval_every: int = 0                    # epochs between k-NN evaluations during training (0 = at the end only)
    metrics: str = "knn,linear,clustering"  # final representation metrics ("" = none)
    # run
    precision: str = "fp32"                # fp32 | bf16 | fp16
    seed: int = 0
    device: str = "auto"
    out: Optional[str] = None
    resume: bool = False
    max_steps: Optional[int] = None        # stop (with a checkpoint) after this many optimizer steps
    checkpoint_every: int = 0              # also checkpoint every N steps (0 = every epoch only)
    progress: bool = True
    stage_overrides: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # multi-stage methods: per-stage values

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Per method and preset: values that differ from the dataclass defaults.
PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "supervised": {
        # A small ViT (96 wide, 4 blocks, patch 8 on 32-px images: 16 tokens) trained from scratch on
        # digits: about a minute on 2 CPU cores, ~92 % test accuracy.
        "quick": dict(model="tiny", embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0, patch_size=8,
                      epochs=100, batch_size=64, lr=1e-3, warmup_epochs=5, weight_decay=0.05,
                      label_smoothing=0.1, grad_clip=1.0),
        # docs/methods.md §5.2, fine-tune recipe of Gani et al. (2022): small-data ViT, AdamW lr 1e-3, wd 0.05,
        # 100 epochs, 10 warm-up, mixup/cutmix, label smoothing 0.1, random erasing 0.25, drop-path 0.1.
        "paper": dict(model="small_data", epochs=100, batch_size=128, lr=1e-3, warmup_epochs=10, weight_decay=0.05,
                      label_smoothing=0.1, mixup=0.8, cutmix=1.0, random_erasing=0.25, drop_path=0.1,
                      min_lr=1e-6, autoaugment=True),
    },
    "mae": {
        # The same small ViT as the supervised quick preset, decoder 64 wide x 2 blocks, 60 epochs on digits.
        "quick": dict(model="tiny", embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0, patch_size=8,
                      decoder_dim=64, decoder_depth=2, decoder_heads=4, epochs=60, batch_size=64,
                      lr=1.5e-3, warmup_epochs=5, weight_decay=0.05, betas=(0.9, 0.95), mask_ratio=0.75,
                      norm_pix=True, global_pool="avg"),
        # docs/methods.md §1 (He et al. 2021): AdamW β (0.9, 0.95), wd 0.05, lr 1.5e-4·batch/256, 40 warm-up epochs,
        # cosine, RRC (0.2, 1) + flip, mask 0.75, norm_pix, 800 epochs, decoder 512 wide × 8 blocks × 16 heads.
        # The encoder is the small-data ViT (patch 4) on 32-px data (ViT-B/16 needs 224-px images).
        "paper": dict(model="small_data", epochs=800, batch_size=256, base_lr=1.5e-4, warmup_epochs=40,
                      weight_decay=0.05, betas=(0.9, 0.95), mask_ratio=0.75, norm_pix=True,
                      decoder_dim=512, decoder_depth=8, decoder_heads=16, global_pool="avg"),
    },
}


PRESETS["relvit"] = {
    # The quick supervised model; upstream 40 epochs, then fine-tune 60; the scratch baseline gets the same
    # total number of epochs (100) with the fine-tune recipe.
    "quick": dict(model="tiny", embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0, patch_size=8, batch_size=64,
                  lr=1e-3, warmup_epochs=5, weight_decay=0.05, grad_clip=1.0,
                  stage_overrides={"upstream": dict(epochs=40, metrics="knn"),
                                   "finetune": dict(epochs=60, label_smoothing=0.1, metrics=""),
                                   "scratch": dict(epochs=100, label_smoothing=0.1, metrics=""),
                                   "joint": dict(epochs=100, metrics="")}),
    # docs/methods.md §2: ViT-S (384/12/6), patch 4 on 32-px data, AdamW lr 5e-4, wd 0.1, batch 256, grad-clip 1.0,
    # 100 upstream + 100 downstream epochs.
    "paper": dict(model="small", patch_size=4, batch_size=256, lr=5e-4, weight_decay=0.1, grad_clip=1.0,
                  warmup_epochs=5,
                  stage_overrides={"upstream": dict(epochs=100, metrics="knn"),
                                   "finetune": dict(epochs=100, metrics=""),
                                   "scratch": dict(epochs=200, metrics=""),
                                   "joint": dict(epochs=100, metrics="")}),
}


def build_config(method: str, preset: str = "quick", **overrides: Any) -> TrainConfig:
    if method not in PRESETS:
        raise ValueError(f"unknown method {method!r}; available: {sorted(PRESETS)}")
    if preset not in PRESETS[method]:
        raise ValueError(f"unknown preset {preset!r} for {method}; available: {sorted(PRESETS[method])}")
    given = {k: v for k, v in overrides.items() if v is not None}
    values = {**PRESETS[method][preset], **given}
    # Precedence: preset < the preset's per-stage values < what the user gave (for every stage).
    values["stage_overrides"] = {stage: {k: v for k, v in per_stage.items() if k not in given}
                                 for stage, per_stage in values.get("stage_overrides", {}).items()}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known: {sorted(names)}")
    return TrainConfig(method=method, preset=preset, **values)


def parse_value(text: str) -> Any:
    """``--set key=value`` values: JSON when it parses (numbers, true/false, null, lists), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
