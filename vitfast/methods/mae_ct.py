"""MAE-CT (Lehner et al., AAAI 2024; docs/methods.md §6): MAE, then an NNCLR head, then contrastive tuning.

Stages (one command runs all three in <out>/mae, <out>/head, <out>/ct; ``--stage S`` runs one from the sibling
folder of the stage before it, or ``--init RUN_DIR``):
  mae   exactly ``--method mae`` (vitfast/methods/mae.py: its model, decoder, views and loss, held as ``self.mae``);
        its final evaluation (k-NN, linear probe, clustering, beside the random-init encoder's) is the MAE-only
        baseline that the ct stage's numbers are read against
  head  the mae encoder frozen (no gradient, eval mode), full images without masking, two views; only the NNCLR
        projector and predictor learn, with the plain nearest neighbour (topk = 1); keys = the projector's own
        outputs (detached), as MAE-CT's stage 2; no evaluation (the encoder is the mae stage's)
  ct    from the head stage (encoder, projector, predictor and queue): patch embedding, CLS, position embedding and
        the lower half of the blocks frozen; block i of the upper half learns at lr·0.65^(depth − i) (the top block
        too at 0.65), the final norm and the heads at lr; keys and queue entries from an EMA copy of the projector
        (0.99, constant, as the release); top-20 draw with self-exclusion; InfoNCE over the gathered predictions
        (``NNCLRLoss``); an EMA of the encoder is what ``encoder`` returns (evaluation, checkpoint "encoder")

BatchNorm in the heads (and the in-batch pool) makes the loss depend on the batch composition, so gradient
accumulation would not equal a larger batch (docs/methods.md §6.3): stages head and ct refuse ``accum_steps`` > 1 (the
mae stage accumulates as MAE does). Under DDP the heads' BatchNorms are per process (no SyncBatchNorm), as MoCo v3's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from ..config import setting
from ..data import augment
from ..nn.heads import prediction_head, projection_head
from ..nn.momentum import MomentumTeacher
from ..nn.nnclr import NNCLRLoss
from .base import DataInfo, Method
from .mae import MAE, MAEConfig

__all__ = ["MAECT", "MAECTConfig"]


@dataclass
class MAECTConfig(MAEConfig):
    temperature: float = setting(0.15, "NNCLR softmax temperature (stages head, ct)", within="(0, inf)")
    queue_size: int = setting(65536, "entries of the NNCLR feature queue", within="[1, inf)")
    topk: int = setting(1, "the lookup draws one of the topk nearest queue entries (presets: head 1, ct 20)",
                        within="[1, inf)")
    proj_hidden_dim: int = setting(2048, "hidden width of the 3-layer projector", within="[1, inf)")
    proj_dim: int = setting(256, "output width of the projector (and the predictor)", within="[1, inf)")
    pred_hidden_dim: int = setting(4096, "hidden width of the 2-layer predictor", within="[1, inf)")
    head_weight_decay: float = setting(1e-5, "weight decay of the projector and predictor", within="[0, inf)")
    layer_decay: float = setting(0.65, "stage ct: block i learns at lr·layer_decay^(depth − i)", within="(0, 1]")
    projector_momentum: float = setting(0.99, "stage ct: EMA momentum of the key projector", within="[0, 1]")
    encoder_momentum: float = setting(0.9999, "stage ct: EMA momentum of the evaluated encoder", within="[0, 1]")
    min_crop_scale: float = setting(0.08, "smallest area of the random-resized crops (stages head, ct)",
                                    within="(0, 1]")
    flip: bool = setting(True, "random horizontal flips in the views of stages head and ct")


# The stages' own training values; everything else (model, decoder, masking, betas, pooling) is shared. The mae stage
# trains with MAE's preset values (its accumulation too: MAE's loss is a mean per image, so micro-batches change
# nothing), the head and ct stages with theirs.
_TRAINING = ("epochs", "batch_size", "accum_steps", "lr", "base_lr", "warmup_epochs")


def _stages(mae_preset: Dict, head: Dict, ct: Dict) -> Tuple[Dict, Dict]:
    """(shared values, per-stage values) from an MAE preset and the head / ct stage values."""
    shared = {k: v for k, v in mae_preset.items() if k not in _TRAINING}
    mae = {k: v for k, v in mae_preset.items() if k in _TRAINING}
    return shared, {"mae": dict(mae, metrics="knn,linear,clustering"), "head": dict(head, metrics=""),
                    "ct": dict(ct, metrics="knn,linear,clustering")}


# quick: MAE's quick preset is the mae stage; the head and ct stages train on digits with small heads (256 / 64 / 256
# wide) and a queue of 1024 entries (the train split has 1295 images: an id is at most twice in it), crops (0.5, 1)
# without flips (a mirrored digit is another symbol), batch 64 (20 steps per epoch). ct 40 epochs: 20 reached k-NN
# 95.3 % (raw encoder) / 94.7 % (EMA 0.99), 40 95.8 % (EMA 0.99; val 94.4 % vs 92.3 % for the MAE encoder).
_QUICK_SHARED, _QUICK_STAGES = _stages(MAE.presets["quick"],
                                       head=dict(epochs=10, batch_size=64, lr=1e-3, warmup_epochs=2, topk=1),
                                       ct=dict(epochs=40, batch_size=64, lr=1e-3, warmup_epochs=4, topk=20))
# paper: the released ViT-B/16 stage-2 and stage-3 yamls (yamls/stage2_maect_prepare_head/base16.yaml,
# yamls/stage3_maect_contrastive_tuning/base16.yaml): effective_batch_size 1024, max_epochs 20 each, lr 1e-4 with a
# linear warm-up over 20 % of the updates (end_percent: 20, here 4 of 20 epochs) then a cosine to 0. base_lr 2e-4
# (peak 8e-4 at batch 1024): the release's yaml says lr 1e-4, but its trainer scales the lr by the number of *views*
# times the batch / 256 (trainers/base/trainer_base.py initialize_model: a multi_crop_wrapper with 2 views gives
# lr_scaler_factor 2 x 1024; optimizers/lr_scalers/linear_lr_scaler.py: lr x factor / 256), so its peak lr is
# 1e-4 x 2048 / 256 = 8e-4 in both stages; vitfast scales by the images of the batch, hence base_lr 2e-4.
# Stage 2 looks up the plain nearest neighbour (nnclr_head, topk 0 = arg-max: topk 1 here), stage 3 the top 20.
_PAPER_SHARED, _PAPER_STAGES = _stages(MAE.presets["paper"],
                                       head=dict(epochs=20, batch_size=1024, base_lr=2e-4, warmup_epochs=4, topk=1),
                                       ct=dict(epochs=20, batch_size=1024, base_lr=2e-4, warmup_epochs=4, topk=20))


class MAECT(Method):
    """MAE-CT: MAE pre-training, an NNCLR head on the frozen encoder, then contrastive tuning of its upper half."""

    name = "mae-ct"
    Config = MAECTConfig
    presets = {
        # Encoder and decoder as MAE's quick preset. Encoder EMA 0.99 instead of 0.9999: over 400 ct steps 0.9999 left
        # the EMA within ~4 % of its start (measured: the ct k-NN stayed at the mae stage's 93.0 %); the release's
        # 0.9999 over ~25k steps averages about its last 40 %, 0.99 here the last ~100 of 800 steps. docs §6.4.
        "quick": dict(_QUICK_SHARED, temperature=0.15, queue_size=1024, proj_hidden_dim=256, proj_dim=64,
                      pred_hidden_dim=256, min_crop_scale=0.5, flip=False, encoder_momentum=0.99,
                      stage_overrides=_QUICK_STAGES),
        # docs/methods.md §6 and ml-jku/MAE-CT's ViT-B/16 yamls (yamls/stage2_maect_prepare_head/base16.yaml,
        # yamls/stage3_maect_contrastive_tuning/base16.yaml), value by value: AdamW β (0.9, 0.95); batch 1024; peak lr
        # 8e-4 (base_lr 2e-4 per 256 images: see _PAPER_STAGES) in both stages, 20 % warm-up then cosine to 0; 20 + 20
        # epochs; encoder wd 0.05 (biases and norms excluded, optimizer_wrapper.py); head wd 1e-5; nnclr τ 0.15,
        # queue 65536, proj_hidden_dim 2048, output_dim 256, pred_hidden_dim 4096; stage 3: target_factor 0.99 (key
        # projector), layerwise_lr_decay 0.65 (block i at 0.65^(depth − i), the final norm at 1), blocks 0-5 of 12
        # frozen (with patch embedding and CLS: vit_block_freezer.py, freeze_stem_if_block0_is_frozen), the encoder's
        # ema_logger 0.9999; views: random-resized crop (0.08, 1) + flip (n_views 2); pooling mean_patch; no
        # drop-path (vit_mae.py default 0). Deliberate differences, with the reason:
        # - stage 1 is MAE's paper preset on the small-data ViT (patch 4, 32-px data), not ViT-B/16 at 224 px, and
        #   every stage pools the mean of the patch tokens as the release's ViT-B (MAE's own preset probes CLS);
        # - fp32 unless --precision bf16 (official: precision bfloat16 in both yamls);
        # - the queue starts from the head stage's and, while not full, the lookup also searches the current batch
        #   (official: random unit vectors, contrastive_head_base.py; docs §6.4: a deterministic start);
        # - the release's schedules skip their end points (exclude_first / exclude_last, schedules/base/
        #   basic_schedule.py: the warm-up never sits at 0, the cosine never reaches 0); vitfast's per-step schedule
        #   (engine.lr_at) differs from it by about one step.
        "paper": dict(_PAPER_SHARED, global_pool="avg", temperature=0.15, queue_size=65536, proj_hidden_dim=2048,
                      proj_dim=256, pred_hidden_dim=4096, head_weight_decay=1e-5, layer_decay=0.65,
                      projector_momentum=0.99, encoder_momentum=0.9999, min_crop_scale=0.08, flip=True,
                      stage_overrides=_PAPER_STAGES),
    }
    stages = ("mae", "head", "ct")
    stage_init = {"head": "mae", "ct": "head"}

    def __init__(self, config, data: DataInfo):
        super().__init__(config, data)
        self.stage = stage = self.stage_of(config)
        self.random_init_baseline = stage == "mae"  # head and ct start from the mae encoder, evaluated there
        if stage == "mae":
            self.mae = MAE(config, data)  # the MAE method itself, built from the same random numbers
            return
        self.accumulates = False  # BatchNorm in the heads and in-batch negatives: the engine refuses --accum-steps
        s = config.method_config
        self.model = self.build_encoder(pos_embed="sincos", weight_init="mae")
        self.projector = projection_head(self.model.embed_dim, "mae-ct", hidden_dim=s.proj_hidden_dim,
                                         out_dim=s.proj_dim)
        self.predictor = prediction_head(s.proj_dim, "mae-ct", hidden_dim=s.pred_hidden_dim)
        self.criterion = NNCLRLoss(s.proj_dim, s.queue_size, s.temperature, s.topk)
        self.train_views = self.build_views()
        if stage == "head":
            self.model.requires_grad_(False)
        else:
            frozen = [self.model.patch_embed, *self.model.blocks[:len(self.model.blocks) // 2]]
            for module in frozen:
                module.requires_grad_(False)
            self.model.cls_token.requires_grad_(False)
            if self.model.pos_embed is not None:
                self.model.pos_embed.requires_grad_(False)
            self.target = MomentumTeacher(projector=self.projector)  # the key projector
            self.ema = MomentumTeacher(encoder=self.model)              # the evaluated encoder

    def build_views(self) -> augment.MultiView:
        """Two views of MAE-CT's stages 2 and 3: random-resized crop (min_crop_scale, 1) and flip (unless off)."""
        data, s = self.data, self.config.method_config
        if self.config.augment == "none":
            return augment.MultiView([augment.eval_transform(data.image_size, data.mean, data.std)], [2], name="none")
        view = augment.mae_pretrain(data.image_size, data.mean, data.std, scale=(s.min_crop_scale, 1.0))
        if not s.flip:
            view.steps = [step for step in view.steps if step.name != "horizontal_flip"]
        return augment.MultiView([view], [2], name="mae_ct_views")

    @property
    def encoder(self):
        if self.stage == "mae":
            return self.mae.model
        return self.ema["encoder"] if self.stage == "ct" else self.model

    def init_from(self, state, source: str):
        """head: the mae encoder. ct: the head stage's encoder, projector, predictor and queue (any other run: its
        encoder, and whatever heads fit); the EMA copies start as the loaded weights."""
        report = super().init_from(state, source)  # into ``encoder``: for ct the EMA copy
        if self.stage != "ct":
            return report
        self.model.load_state_dict(self.ema["encoder"].state_dict())
        own, theirs = self.state_dict(), state.get("method", {})
        heads = {k: v for k, v in theirs.items() if k.split(".")[0] in ("projector", "predictor", "criterion")
                 and k in own and own[k].shape == v.shape}
        queue = [k for k in own if k.startswith("criterion.queue.")]
        if not all(k in heads for k in queue):  # the queue loads whole or not at all (pointer, fill, rows)
            heads = {k: v for k, v in heads.items() if k not in queue}
        self.load_state_dict(heads, strict=False)
        self.target.copy_from({"projector": self.projector})
        report["heads_loaded"] = len(heads)
        report["heads_skipped"] = sorted(k for k in own if k.split(".")[0] in ("projector", "predictor", "criterion")
                                         and k not in heads)
        return report

    def train(self, mode: bool = True):
        """The head stage's frozen encoder stays in eval mode (no drop-path) while the heads train."""
        super().train(mode)
        if self.stage == "head":
            self.model.eval()
        return self

    def lr_scales(self) -> Dict[int, float]:
        """Stage ct: id(parameter) -> its lr factor; block i of ``depth`` at layer_decay^(depth − i), the rest 1."""
        decay, depth = self.config.method_config.layer_decay, len(self.model.blocks)
        return {id(p): decay ** (depth - i) for i, block in enumerate(self.model.blocks) for p in block.parameters()}

    def param_groups(self) -> List[Dict]:
        """Base's decay / no-decay split of what learns; stages head and ct: the heads' weight decay is
        head_weight_decay, and stage ct splits the groups by their layer-wise "lr_scale"."""
        if self.stage == "mae":
            return self.mae.param_groups()
        groups = super().param_groups()
        heads = {id(p) for p in (*self.projector.parameters(), *self.predictor.parameters())}
        scales = self.lr_scales() if self.stage == "ct" else {}
        split: Dict[Tuple[float, float], List] = {}
        for group in groups:
            for param in group["params"]:
                decay = group["weight_decay"]
                if id(param) in heads and decay:
                    decay = self.config.method_config.head_weight_decay
                split.setdefault((decay, scales.get(id(param), 1.0)), []).append(param)
        return [{"params": params, "weight_decay": decay, "lr_scale": scale}
                for (decay, scale), params in split.items()]

    def forward(self, images, labels, indices, generator) -> Tuple[Tensor, Dict[str, float]]:
        if self.stage == "mae":
            return self.mae(images, labels, indices, generator)
        predictions, keys = [], []
        for x in self.train_views(images, generator):
            with torch.set_grad_enabled(self.stage == "ct" and torch.is_grad_enabled()):
                pooled = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
            projected = self.projector(pooled)
            predictions.append(self.predictor(projected))
            if self.stage == "head":  # MAE-CT's stage 2 looks up with the projector itself
                keys.append(projected.detach())
            else:
                with torch.no_grad():
                    keys.append(self.target["projector"](pooled.detach()))
        loss = self.criterion(predictions, keys, indices, generator)
        return loss, {"nnclr": loss.item(), "nn_similarity": self.criterion.last_similarity}

    def before_optimizer_step(self, optimizer, step: int, total_steps: int) -> None:
        if self.stage == "mae":
            self.mae.before_optimizer_step(optimizer, step, total_steps)

    def after_step(self, step: int, total_steps: int) -> None:
        if self.stage == "mae":
            self.mae.after_step(step, total_steps)
        elif self.stage == "ct":
            s = self.config.method_config
            self.target.update({"projector": self.projector}, s.projector_momentum)
            self.ema.update({"encoder": self.model}, s.encoder_momentum)
