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


def setting(default: Any, help: str) -> Any:
    """A field of a method's settings dataclass, with the help text ``train.py --help`` shows."""
    return field(default=default, metadata={"help": help})


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
        raise ValueError(f"unknown config keys {unknown} for method {method!r}" + (f" ({hint})" if hint else "")
                         + f"; its settings: {sorted(own)}; shared: {sorted(set(SHARED_FIELDS) - {'method'})}")
    for stage, per_stage in values.get("stage_overrides", {}).items():
        bad = sorted(set(per_stage) - set(SHARED_FIELDS) - own)
        if bad:
            raise ValueError(f"unknown config keys {bad} in the values of stage {stage!r} of method {method!r}")
    shared = {k: (tuple(v) if k in _TUPLE_FIELDS and isinstance(v, list) else v)
              for k, v in values.items() if k in SHARED_FIELDS and k != "method"}
    return TrainConfig(method=method, method_config=cls.Config(**{k: v for k, v in values.items() if k in own}),
                       **shared)


def build_config(method: str, preset: str = "quick", **overrides: Any) -> TrainConfig:
    """The config of ``method`` with its ``preset``; ``overrides`` (flat keys, None = not given) win."""
    cls = _method_class(method)
    if preset not in cls.presets:
        raise ValueError(f"unknown preset {preset!r} for {method}; available: {sorted(cls.presets)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    values = {**cls.presets[preset], **given, "preset": preset}
    # Precedence: preset < the preset's per-stage values < what the user gave (for every stage).
    values["stage_overrides"] = {stage: {k: v for k, v in per_stage.items() if k not in given}
                                 for stage, per_stage in values.get("stage_overrides", {}).items()}
    return config_from_values(method, values)


def config_from_dict(stored: Dict[str, Any], source: str = "config") -> TrainConfig:
    """A TrainConfig from a stored config.json: the nested layout, or the flat one of format 1."""
    values = dict(stored)
    nested = values.pop("method_config", None)
    method = values.get("method")
    try:
        cls = _method_class(method)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    if nested is None:  # format 1: every method's settings in one flat dict
        own = {f.name for f in dataclasses.fields(cls.Config)}
        values = {k: v for k, v in values.items() if k not in FORMAT1_METHOD_FIELDS or k in own}
    else:
        values.update(nested)
    try:
        return config_from_values(method, values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source} does not fit this vitfast's {method!r} method ({error}); "
                         f"start a new run folder") from None


def parse_value(text: str) -> Any:
    """``--set key=value`` values: JSON when it parses (numbers, true/false, null, lists), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
