"""The contract between a training method and the shared engine (vitfast.engine).

A method is an ``nn.Module`` that owns every trainable module of its stage. The engine moves it to
the device, wraps it in DDP, builds the optimizer from ``param_groups``, runs the loop, checkpoints,
and calls ``evaluate`` at the end. A method defines its model, its views and its loss — no loop.

Class attributes the registry, the CLI and the engine read (README "Adding a method"):
  name                   what ``--method`` takes
  Config                 a dataclass of the method's own settings (``vitfast.config.setting`` fields carry
                         the help text); the instance arrives as ``config.method_config``
  presets                {"quick": {...}, "paper": {...}}: flat keys (shared fields and settings),
                         optionally "stage_overrides": {stage: {...}}
  stages, stage_init     multi-stage methods: the stages one command runs, and which stage's encoder
                         initialises which
  baselines              multi-stage methods: a baseline stage -> the stages whose total epochs it trains for
                         (``--epochs N`` scales the other stages to add up to N and gives the baseline N)
  random_init_baseline   report the k-NN accuracy of the encoder at initialisation (a self-supervised
                         method's yardstick; a classifier trained with labels has no use for it)
  accumulates            whether the mean of the losses of micro-batches is the loss of their batch (False for
                         contrastive and batch-statistic losses: --accum-steps is then refused)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import checkpoint
from ..config import TrainConfig, UserError
from ..eval.classification import classification_accuracy
from ..nn import ViT


@dataclass
class DataInfo:
    """What a method needs to know of the dataset."""

    channels: int
    image_size: int
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


@dataclass
class NoSettings:
    """The settings of a method that has none of its own."""


class Method(nn.Module):
    name = "method"
    Config: type = NoSettings
    presets: Dict[str, Dict[str, Any]] = {}
    stages: Tuple[str, ...] = ()       # multi-stage methods: the stages one command runs, in order
    stage_init: Dict[str, str] = {}    # stage -> the stage whose encoder initialises it
    baselines: Dict[str, Tuple[str, ...]] = {}  # baseline stage -> the stages whose epochs it gets (equal budget)
    all_stages: Tuple[str, ...] = ()   # every stage --stage accepts (default: ``stages``)
    random_init_baseline = True
    accumulates = True                 # False: the loss couples the batch (in-batch negatives, BatchNorm in the
                                       # loss path, batch statistics), so --accum-steps > 1 is refused

    def __init__(self, config: TrainConfig, data: DataInfo):
        super().__init__()
        self.config, self.data = config, data
        self.steps_per_epoch = 1  # the engine sets the real value before training

    @classmethod
    def stage_of(cls, config: TrainConfig) -> str:
        """The stage ``config`` runs: ``--stage``, else the first of ``stages`` (a one-line error if unknown)."""
        known = cls.all_stages or cls.stages
        if not known:
            if config.stage:
                raise UserError(f"{cls.name} has no stages, got --stage {config.stage}")
            return ""
        stage = config.stage or known[0]
        if stage not in known:
            raise UserError(f"{cls.name} stage must be one of {', '.join(known)}, got {stage!r}")
        return stage

    def build_encoder(self, num_classes: int = 0, pos_embed: str = "learned", **kwargs) -> ViT:
        c = self.config
        overrides = dict(img_size=self.data.image_size, in_chans=self.data.channels, num_classes=num_classes,
                         drop_path_rate=c.drop_path, pos_embed_kind=pos_embed, global_pool=c.global_pool, **kwargs)
        for key in ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size"):
            if getattr(c, key) is not None:
                overrides[key] = getattr(c, key)
        return ViT.from_config(c.model, **overrides)

    @property
    def encoder(self) -> ViT:
        """The backbone whose features are evaluated (k-NN, linear probe, clustering)."""
        raise NotImplementedError

    def encoder_state_dict(self) -> Dict[str, Tensor]:
        """The encoder's weights as another run's ``--init`` loads them (timm names; the checkpoint stores them)."""
        return self.encoder.state_dict()

    def load_encoder(self, weights: Dict[str, Tensor], source: str = "the checkpoint") -> Dict[str, Any]:
        """Initialise the encoder from ``weights`` (an ``encoder_state_dict``): every tensor whose name and shape
        fit, except the classifier ``head.``; returns {"loaded": count, "skipped": [names left as they were]}."""
        own = self.encoder.state_dict()
        loadable = {k: v for k, v in weights.items()
                    if k in own and own[k].shape == v.shape and not k.startswith("head.")}
        if not loadable:
            raise RuntimeError(f"{source} holds no encoder weights that fit this model")
        self.encoder.load_state_dict(loadable, strict=False)
        return {"loaded": len(loadable), "skipped": sorted(set(own) - set(loadable))}

    def init_from(self, state: Dict[str, Any], source: str) -> Dict[str, Any]:
        """``--init`` and ``stage_init``: start from a checkpoint ``state`` (its encoder, by default). A stage that
        continues more than the encoder of an earlier stage (e.g. its heads) reads ``state["method"]`` here."""
        return self.load_encoder(checkpoint.encoder_weights(state), source)

    def forward(self, images: Tensor, labels: Tensor, indices: Tensor, generator: torch.Generator
                ) -> Tuple[Tensor, Dict[str, float]]:
        """One training step's loss on a uint8 batch [B, C, H, W] on the device, plus scalar metrics."""
        raise NotImplementedError

    def param_groups(self) -> List[Dict]:
        """AdamW groups: no weight decay on biases, norms, tokens and position embeddings."""
        decay, no_decay = [], []
        skip = set()
        for module in self.modules():
            if hasattr(module, "no_weight_decay") and module is not self:
                prefix = next(n for n, m in self.named_modules() if m is module)
                skip |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 or name in skip or name.endswith(".bias") else decay).append(param)
        return [{"params": decay, "weight_decay": self.config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]
    # A group may carry "lr_scale": the engine sets its lr to the scheduled lr times that (layer-wise decay).

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, step: int, total_steps: int) -> None:
        """Hook between backward (and gradient clipping) and the optimizer step: per-step optimizer values
        (e.g. a weight-decay schedule), or gradients set to None for parameters frozen for a while."""

    def after_step(self, step: int, total_steps: int) -> None:
        """Hook after each optimizer step (EMA teachers, schedules); ``step`` counts finished steps."""

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Pooled encoder features [B, D] of a normalised float batch."""
        tokens = self.encoder.forward_features(images)
        return self.encoder.forward_head(tokens, pre_logits=True)

    def classifier(self) -> Optional[nn.Module]:
        """The model whose logits [B, classes] are scored (uint8 images -> eval transform -> logits), for a method or
        stage that trains a classifier; None otherwise."""
        return None

    def evaluate(self, splits, transform, device, progress: bool) -> Dict:
        """Method-specific final metrics (the engine adds the representation metrics): a classifier's val and test
        accuracy of the final weights."""
        model = self.classifier()
        return {} if model is None else classification_accuracy(model, splits, transform, device)

    def epoch_metrics(self, splits, transform, device) -> Dict[str, float]:
        """Logged after every epoch (the val curve of accuracy.png): a classifier's val accuracy; never test."""
        model = self.classifier()
        return {} if model is None else classification_accuracy(model, splits, transform, device, which=("val",))
