"""Training configuration: what the engine uses, plus the settings the chosen method declares for itself.

``TrainConfig`` holds the shared fields (data, model, optimisation, evaluation, run) and, in
``method_config``, an instance of the method's own settings dataclass. Each method declares that
dataclass and its ``quick`` and ``paper`` presets beside its code (``vitfast/methods/<method>.py``;
docs/methods.md sections cited there). Presets: ``quick`` (minutes on a laptop CPU, on the embedded
``digits`` data) and ``paper`` (the paper's recipe).

Keys are flat everywhere a user types them (presets, ``--set key=value``, ``build_config(**overrides)``,
per-stage values): each key goes to the shared config or to the method's settings, whichever has it;
a key that neither has is refused with the list of known keys. ``config.json`` stores the nested
layout (``{"epochs": ..., "method_config": {"mask_ratio": ...}}``); folders written before the method
settings moved (one flat dict, "format 1") are read too.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

# Fields of the format-1 flat config that belonged to one method only; a format-1 folder of another method
# carries them with values that method never read, so reading it drops them.
FORMAT1_METHOD_FIELDS = ("label_smoothing", "mixup", "cutmix", "random_erasing", "autoaugment", "mask_ratio",
                         "norm_pix", "decoder_dim", "decoder_depth", "decoder_heads")


class UserError(ValueError):
    """A mistake in what was asked for (a value, a path, a device, a run folder). ``train.py`` prints it as one
    line (``train.py: error: ...``) and exits 2; any other exception is a bug and keeps its traceback."""


class Interval:
    """A range written as users read it: ``"[0, 1)"``, ``"(0, inf)"``, ``"[1, inf)"``."""

    def __init__(self, text: str):
        text = text.strip()
        if text[0] not in "[(" or text[-1] not in "])" or "," not in text:
            raise ValueError(f"an interval looks like '[0, 1)', got {text!r}")
        low, high = (float(part) for part in text[1:-1].split(","))
        self.text, self.low, self.high = text, low, high
        self.closed_low, self.closed_high = text[0] == "[", text[-1] == "]"

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.closed_low else value > self.low
        below = value <= self.high if self.closed_high else value < self.high
        return above and below


def setting(default: Any, help: str, within: Optional[str] = None) -> Any:
    """A field of a method's settings dataclass, with the help text ``train.py --help`` shows and, for a number,
    the range it must lie in (``within="[0, 1)"``), checked before a run starts."""
    metadata = {"help": help + (f"; in {within}" if within else "")}
    if within:
        metadata["within"] = Interval(within)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    method: str = "mae"
    preset: str = "quick"
    stage: Optional[str] = None            # multi-stage methods: run one stage only
    # data
    dataset: str = "digits"
    data_root: Optional[str] = None
    download: bool = False
    image_size: Optional[int] = None       # resize the dataset's images (e.g. STL-10 96 px -> 64)
    augment: str = "default"               # training views: "default" (the method's recipe) or "none"
    val_fraction: float = 0.1              # share of each class of the train split held out as val (0: none)
    # model (a vitfast.nn.VIT_CONFIGS name plus overrides)
    model: str = "tiny"
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    patch_size: Optional[int] = None
    patch_size_by_image_size: Dict[str, int] = field(default_factory=dict)  # a recipe's patch size per image side
                                           # ({"64": 8}): applied once the data is loaded, unless patch_size is given
    drop_path: float = 0.0
    global_pool: str = "token"             # features for evaluation and the classifier: "token" (CLS) or "avg"
    init: Optional[str] = None             # checkpoint (a run folder or .pt) whose encoder initialises this run
    # optimisation
    epochs: int = 10
    batch_size: int = 128                  # the global batch of one optimizer step (all ranks, all accum steps)
    accum_steps: int = 1                   # micro-batches per optimizer step (gradient accumulation)
    lr: Optional[float] = None             # absolute peak lr; None = base_lr * global batch / 256
    base_lr: Optional[float] = 1e-3        # None (unused) when lr is given
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 1.0
    lr_schedule: str = "cosine"            # after the warm-up: "cosine" (half-cosine to min_lr over the steps left) or
                                           # "quarter-cosine" (RelViT's release: lr - (lr - min_lr)(1 - cos(pi/2 step/total)))
    grad_clip: Optional[float] = None
    # evaluation
    knn_k: int = 20
    probe_epochs: int = 50
    eval_every: int = 0                    # epochs between k-NN evaluations during training (0 = at the end only)
    metrics: str = "knn,linear,clustering"  # final representation metrics ("" = none)
    # run
    precision: str = "fp32"                # fp32 | bf16 | fp16
    compile: bool = False                  # torch.compile every transformer block (encoder, decoder, teacher)
    seed: int = 0
    device: str = "auto"
    out: Optional[str] = None
    resume: bool = False
    max_steps: Optional[int] = None        # stop (with a checkpoint) after this many optimizer steps
    checkpoint_every: int = 0              # also checkpoint every N steps (0 = every epoch only)
    progress: bool = True
    stage_overrides: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # multi-stage methods: per-stage values
    # the method's own settings: an instance of its ``Config`` dataclass (vitfast/methods/<method>.py)
    method_config: Any = None

    def __post_init__(self):
        if self.method_config is None or isinstance(self.method_config, dict):  # defaults, or a stored dict
            self.method_config = _method_class(self.method).Config(**(self.method_config or {}))

    def to_dict(self) -> Dict[str, Any]:
        """The nested layout of config.json (method settings under "method_config")."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def flat(self) -> Dict[str, Any]:
        """Every key as a user types it: the shared fields and the method's settings side by side."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "method_config"}
        values.update(dataclasses.asdict(self.method_config) if self.method_config is not None else {})
        return values

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with ``changes`` (flat keys, routed like ``build_config``'s)."""
        return config_from_values(self.method, {**self.flat(), **changes})


SHARED_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "method_config")
_TUPLE_FIELDS = {name for name, hint in typing.get_type_hints(TrainConfig).items()
                 if typing.get_origin(hint) is tuple}


# The range of each numeric shared field; a method declares its settings' ranges with ``setting(within=...)``.
SHARED_RANGES = {name: Interval(text) for name, text in {
    "epochs": "[1, inf)", "batch_size": "[1, inf)", "accum_steps": "[1, inf)", "val_fraction": "[0, 1)", "lr": "(0, inf)", "base_lr": "(0, inf)", "min_lr": "[0, inf)",
    "weight_decay": "[0, inf)", "warmup_epochs": "[0, inf)", "grad_clip": "(0, inf)", "drop_path": "[0, 1)",
    "knn_k": "[1, inf)", "probe_epochs": "[0, inf)", "eval_every": "[0, inf)", "max_steps": "[1, inf)",
    "checkpoint_every": "[0, inf)", "image_size": "[1, inf)", "patch_size": "[1, inf)", "embed_dim": "[1, inf)",
    "depth": "[1, inf)", "num_heads": "[1, inf)", "mlp_ratio": "(0, inf)", "seed": "[0, inf)",
}.items()}
SHARED_CHOICES = {"precision": ("fp32", "bf16", "fp16"), "global_pool": ("token", "avg"),
                  "augment": ("default", "none"), "lr_schedule": ("cosine", "quarter-cosine")}
METRICS = ("knn", "linear", "clustering")


def _type_error(hint: Any, value: Any) -> Optional[str]:
    """What is wrong with ``value`` for a field annotated ``hint`` (None when it fits)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        errors = [_type_error(a, value) for a in args if a is not type(None)]
        return None if any(e is None for e in errors) else errors[0]
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin is tuple and args and args[-1] is not Ellipsis:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return f"a list of {len(args)} values, e.g. [0.9, 0.95]"
        return next((e for a, v in zip(args, value) if (e := _type_error(a, v))), None)
    return None  # dicts and Any: not checked here


def _check_field(name: str, value: Any, hint: Any, interval: Optional[Interval]) -> None:
    problem = _type_error(hint, value)
    if problem is not None:
        raise UserError(f"{name} must be {problem}, got {value!r}")
    if interval is not None and value is not None and not isinstance(value, bool) and value not in interval:
        raise UserError(f"{name} must be in {interval.text}, got {value!r}")


def validate(config: "TrainConfig") -> "TrainConfig":
    """Check every value's type and range (shared fields and the method's settings): a UserError naming the first
    bad one. Runs whenever a config is built from values, so nothing starts with an impossible value."""
    hints = typing.get_type_hints(TrainConfig)
    for name in SHARED_FIELDS:
        if name not in ("stage_overrides", "method"):
            _check_field(name, getattr(config, name), hints[name], SHARED_RANGES.get(name))
    for name, choices in SHARED_CHOICES.items():
        if getattr(config, name) not in choices:
            raise UserError(f"{name} must be one of {', '.join(choices)}, got {getattr(config, name)!r}")
    table = config.patch_size_by_image_size
    if not isinstance(table, dict) or not all(isinstance(k, str) and k.isdigit() and isinstance(v, int)
                                              and not isinstance(v, bool) and v >= 1 for k, v in table.items()):
        raise UserError(f'patch_size_by_image_size must map image sides to patch sizes, e.g. {{"64": 8}}, '
                        f"got {table!r}")
    unknown = [m for m in (m.strip() for m in config.metrics.split(",")) if m and m not in METRICS]
    if unknown:
        raise UserError(f"metrics must be a comma-separated subset of {', '.join(METRICS)}, got {config.metrics!r}")
    from .nn.vit import VIT_CONFIGS  # noqa: PLC0415 (the model table; torch loads here, not at CLI start)
    if config.model not in VIT_CONFIGS:
        raise UserError(f"model must be one of {', '.join(sorted(VIT_CONFIGS))}, got {config.model!r}")
    _method_class(config.method).stage_of(config)  # an unknown --stage fails here, before anything starts
    settings = config.method_config
    setting_hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        _check_field(f.name, getattr(settings, f.name), setting_hints[f.name], f.metadata.get("within"))
    return config


def _method_class(method: str):
    from .methods import get_method  # the methods import this module: resolve them at call time
    return get_method(method)


def config_from_values(method: str, values: Dict[str, Any]) -> TrainConfig:
    """A TrainConfig from flat ``values``: shared keys to the config, the method's settings to its ``Config``."""
    cls = _method_class(method)
    own = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(values) - set(SHARED_FIELDS) - own)
    if unknown:
        from .methods import METHODS
        elsewhere = {k: [m for m, c in sorted(METHODS.items()) if k in {f.name for f in dataclasses.fields(c.Config)}]
                     for k in unknown}
        hint = "; ".join(f"{k} is a setting of {', '.join(ms)}" for k, ms in elsewhere.items() if ms)
        raise UserError(f"unknown config keys {unknown} for method {method!r}" + (f" ({hint})" if hint else "")
                         + f"; its settings: {sorted(own)}; shared: {sorted(set(SHARED_FIELDS) - {'method'})}")
    for stage, per_stage in values.get("stage_overrides", {}).items():
        bad = sorted(set(per_stage) - set(SHARED_FIELDS) - own)
        if bad:
            raise UserError(f"unknown config keys {bad} in the values of stage {stage!r} of method {method!r}")
    shared = {k: (tuple(v) if k in _TUPLE_FIELDS and isinstance(v, list) else v)
              for k, v in values.items() if k in SHARED_FIELDS and k != "method"}
    config = TrainConfig(method=method, **shared,
                         method_config=cls.Config(**{k: v for k, v in values.items() if k in own}))
    return validate(_resolved(config))


def _resolved(config: "TrainConfig") -> "TrainConfig":
    """Say nothing false: an explicit ``lr`` makes ``base_lr`` unused (None), and the model's sizes are those of
    its table entry (``vitfast.nn.VIT_CONFIGS``) unless given, so ``--print-config`` and config.json show the real
    model."""
    if config.lr is not None:
        config.base_lr = None
    elif config.base_lr is None:
        raise UserError("give lr (the peak learning rate) or base_lr (scaled by the global batch / 256)")
    from .nn.vit import VIT_CONFIGS  # noqa: PLC0415
    table = VIT_CONFIGS.get(config.model, {})
    for key in ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size"):
        if getattr(config, key) is None and key in table:
            setattr(config, key, table[key])
    return config


def build_config(method: str, preset: str = "quick", **overrides: Any) -> TrainConfig:
    """The config of ``method`` with its ``preset``; ``overrides`` (flat keys, None = not given) win."""
    cls = _method_class(method)
    if preset not in cls.presets:
        raise UserError(f"unknown preset {preset!r} for {method}; available: {sorted(cls.presets)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    values = {**cls.presets[preset], **given, "preset": preset}
    if "patch_size" in given and "patch_size_by_image_size" not in given:
        values["patch_size_by_image_size"] = {}  # a patch size the user gives wins on every image size
    # Precedence: preset < the preset's per-stage values < what the user gave (for every stage).
    values["stage_overrides"] = {stage: {k: v for k, v in per_stage.items() if k not in given}
                                 for stage, per_stage in values.get("stage_overrides", {}).items()}
    if cls.stages and not values.get("stage"):
        _budget_epochs(cls, values, cls.presets[preset], given.get("epochs"))
    return config_from_values(method, values)


def stage_config(config: "TrainConfig", name: str, **changes: Any) -> "TrainConfig":
    """The config of one stage: the run's values, the preset's per-stage values, then ``changes``."""
    return config.replace(**{**config.stage_overrides.get(name, {}), **changes})


def with_total_epochs(config: "TrainConfig", total: int) -> "TrainConfig":
    """``config`` (a multi-stage run's, e.g. on ``--resume --epochs N``) with its stages rescaled to ``total`` epochs
    as ``build_config`` does it; a single-stage config just gets ``epochs = total``."""
    cls = _method_class(config.method)
    if not cls.stages or config.stage:
        return config.replace(epochs=total)
    values = {**config.flat(), "stage_overrides": {k: dict(v) for k, v in config.stage_overrides.items()}}
    _budget_epochs(cls, values, {"epochs": config.epochs, "stage_overrides": config.stage_overrides}, total)
    return config_from_values(config.method, values)


def _budget_epochs(cls, values: Dict[str, Any], preset: Dict[str, Any], total: Optional[int]) -> None:
    """Multi-stage methods: ``epochs`` is the budget of the whole pipeline (its stages other than the baselines).
    ``--epochs N`` scales those stages in proportion to the preset's split so that they add up to N (at least one
    epoch each); a baseline stage (``Method.baselines``) gets the sum of the stages it is measured against, so the
    budgets stay equal. Without ``--epochs`` the per-stage values (the preset's, or those given) stand."""
    per_stage = values["stage_overrides"]
    pipeline = [s for s in cls.stages if s not in cls.baselines]
    if total is None:
        default = values.get("epochs", TrainConfig.epochs)
        planned = {s: per_stage.get(s, {}).get("epochs", default) for s in pipeline}
    else:
        default = preset.get("epochs", TrainConfig.epochs)
        planned = {s: preset.get("stage_overrides", {}).get(s, {}).get("epochs", default) for s in pipeline}
        share, left, scaled = sum(planned.values()), total, {}
        for i, stage in enumerate(pipeline):
            rest = len(pipeline) - i - 1
            scaled[stage] = max(1, left - rest if not rest else min(left - rest, round(total * planned[stage] / share)))
            left -= scaled[stage]
        planned = scaled
    for stage, epochs in planned.items():
        per_stage.setdefault(stage, {})["epochs"] = epochs
    for baseline, measured_against in cls.baselines.items():
        if total is not None or "epochs" not in per_stage.get(baseline, {}):
            per_stage.setdefault(baseline, {})["epochs"] = sum(planned[s] for s in measured_against)
    # The pipeline's total; a value below one epoch per stage stays as given (a Trainer built on this config alone
    # trains that many).
    values["epochs"] = total if total is not None and total < len(pipeline) else sum(planned.values())


def config_from_dict(stored: Dict[str, Any], source: str = "config") -> TrainConfig:
    """A TrainConfig from a stored config.json: the nested layout, or the flat one of format 1."""
    values = dict(stored)
    nested = values.pop("method_config", None)
    method = values.get("method")
    try:
        cls = _method_class(method)
    except ValueError as error:
        raise UserError(f"{source}: {error}") from None
    if nested is None:  # format 1: every method's settings in one flat dict
        own = {f.name for f in dataclasses.fields(cls.Config)}
        values = {k: v for k, v in values.items() if k not in FORMAT1_METHOD_FIELDS or k in own}
    else:
        values.update(nested)
    try:
        return config_from_values(method, values)
    except (TypeError, ValueError) as error:
        raise UserError(f"{source} does not fit this vitfast's {method!r} method ({error}); "
                         f"start a new run folder") from None


def parse_value(text: str) -> Any:
    """``--set key=value`` values: JSON when it parses (numbers, true/false, null, lists), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
