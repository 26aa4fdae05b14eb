"""Supervised baseline: a ViT trained from scratch (or fine-tuned from ``--init``) with cross-entropy.

Recipe of the paper preset: the released fine-tune recipe of Gani et al. 2022 (docs/methods.md §5.2, the
release's finetune.py). Per image: flip -> random crop (4-px zero padding) -> AutoAugment with the
dataset's policy (uint8) -> normalise -> random erasing (filled with the dataset mean in [0, 1] units).
Per batch: with probability 0.5 cutmix or mixup (equal odds, alpha 1, a random permutation as partner),
then cross-entropy with label smoothing on the (mixed) targets. An epoch is 3 passes over the data
(repeated augmentation, ``BatchLoader(repeats=3)``). Evaluation: accuracy of the classifier on val and
test (the final epoch's model: never selected on test).

Label smoothing with mixing: the release computes lam·LS(out, y_a) + (1 − lam)·LS(out, y_b) with timm's
LabelSmoothingCrossEntropy(0.1); that loss is linear in the target, so it equals the cross-entropy of
``F.cross_entropy(label_smoothing=0.1)`` on the mixed soft target lam·y_a + (1 − lam)·y_b, which is what
``forward`` computes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import setting
from ..data import augment
from ..data.autoaugment import POLICIES, policy_for_dataset
from ..data.regularizers import autoaugment, mix_batch, random_erasing
from .base import DataInfo, Method


@dataclass
class SupervisedConfig:
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy", within="[0, 1]")
    mixup: float = setting(0.0, "mixup Beta alpha (0 = off)", within="[0, inf)")
    cutmix: float = setting(0.0, "cutmix Beta alpha (0 = off)", within="[0, inf)")
    mix_prob: float = setting(1.0, "probability that a batch is mixed (mixup or cutmix); else plain targets",
                              within="[0, 1]")
    random_erasing: float = setting(0.0, "probability of erasing one box per image (filled with the dataset mean)",
                                    within="[0, 1]")
    autoaugment: bool = setting(False, "AutoAugment, one sub-policy per image, after crop and flip")
    autoaugment_policy: str = setting("auto", "AutoAugment policy: auto (the release's choice by dataset: cifar10 "
                                      "for CIFAR/digits/shapes, svhn for SVHN, imagenet otherwise), cifar10, svhn, "
                                      "imagenet")
    repeated_augmentation: int = setting(1, "passes over the training set per epoch, each freshly augmented "
                                         "(the release's repeated augmentation: 3)", within="[1, inf)")


# The released fine-tune recipe (docs/methods.md §5.2; the release's finetune.py defaults), shared by every stage
# that trains with it (dino's finetune / baseline). Deliberate differences from the release, with the reason:
# - weight decay skips biases, norms, the CLS token and the position embedding (the release decays every
#   parameter): vitfast's one AdamW grouping for every method (Method.param_groups);
# - min_lr 1e-6 at the end of the cosine (the release's scheduler, utils/scheduler.py, is not pinned here);
# - the headline is the final epoch's classifier (the release reports the best test epoch: selection on test);
# - AutoAugment's pixel arithmetic is vitfast's batched version of the PIL operations (vitfast.data.autoaugment:
#   rounding may differ from PIL by one grey level; shears resample with grid_sample's bicubic);
# - one-channel images are erased with their own mean (the release writes mean[1] of a 3-value list there).
PAPER_RECIPE = dict(
    batch_size=256,             # finetune.py -b 256, drop_last
    lr=1e-3, weight_decay=0.05, min_lr=1e-6,
    label_smoothing=0.1,        # LabelSmoothingCrossEntropy() default 0.1 (the --smoothing flag is never read)
    mixup=1.0, cutmix=1.0,      # --alpha 1.0 (mixup), --beta 1.0 (cutmix), both on (--mu, --cm)
    mix_prob=0.5,               # --mix_prob 0.5: half the batches are mixed, the others plain
    random_erasing=0.25,        # --re 0.25, --re_sh 0.4, --re_r1 0.3, filled with the dataset mean
    autoaugment=True,           # --aa: the dataset's policy (utils/autoaug.py), one draw per image
    repeated_augmentation=3,    # --ra 3: RASampler(len_factor=3), an epoch is 3 passes
)


class Supervised(Method):
    """A ViT trained with cross-entropy on the labels, from scratch or from --init (fine-tuning)."""

    name = "supervised"
    Config = SupervisedConfig
    random_init_baseline = False
    presets = {
        # A small ViT (96 wide, 4 blocks, patch 8 on 32-px images: 16 tokens) trained from scratch on
        # digits: about a minute on 2 CPU cores, ~92 % test accuracy.
        "quick": dict(model="tiny", embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0, patch_size=8,
                      epochs=100, batch_size=64, lr=1e-3, warmup_epochs=5, weight_decay=0.05,
                      label_smoothing=0.1, grad_clip=1.0),
        # docs/methods.md §5.2: the release's finetune.py (Gani et al. 2022). See PAPER_RECIPE for the values and
        # the deliberate differences.
        "paper": dict(model="small_data", epochs=100, warmup_epochs=10, drop_path=0.1, **PAPER_RECIPE),
    }

    def __init__(self, config, data: DataInfo):
        super().__init__(config, data)
        self.model = self.build_encoder(num_classes=data.num_classes)
        c = config.method_config
        size = data.image_size
        if c.autoaugment_policy != "auto" and c.autoaugment_policy not in POLICIES:
            raise ValueError(f"autoaugment_policy must be auto, {', '.join(POLICIES)}, got {c.autoaugment_policy!r}")
        self.autoaugment_policy = (policy_for_dataset(config.dataset) if c.autoaugment_policy == "auto"
                                   else c.autoaugment_policy)
        # The release: flip, then random crop with 4-px zero padding at every image size.
        steps = [("resize", dict(size=size))]
        if config.augment != "none":
            steps += [("horizontal_flip", dict(p=0.5)), ("random_crop", dict(size=size, padding=4))]
        # uint8 -> float views in [0, 1], unnormalised: AutoAugment works on the bytes between these and normalising.
        self.geometry = augment.Augment(steps, name="supervised_geometry")
        self.train_views = augment.Augment(steps, data.mean, data.std, name="supervised_train")

    @property
    def encoder(self):
        return self.model

    def forward(self, images, labels, indices, generator) -> Tuple[Tensor, Dict[str, float]]:
        c = self.config.method_config
        if c.autoaugment:
            x = self.geometry(images, generator)  # exact byte values: padding 0, gathers only
            x = autoaugment(x.mul(255).round_().to(torch.uint8), self.autoaugment_policy, generator)
            x = augment.normalize(augment.to_float(x), self.data.mean, self.data.std)
        else:
            x = self.train_views(images, generator)
        x = random_erasing(x, c.random_erasing, generator, fill=self.data.mean)  # per image, before mixing
        targets = F.one_hot(labels, self.data.num_classes).to(x.dtype)
        x, targets = mix_batch(x, targets, c.mixup, c.cutmix, generator, probability=c.mix_prob)
        logits = self.model(x)
        loss = F.cross_entropy(logits, targets, label_smoothing=c.label_smoothing)
        accuracy = (logits.argmax(1) == labels).float().mean()
        return loss, {"train_accuracy": accuracy.item()}

    def classifier(self):
        return self.model

