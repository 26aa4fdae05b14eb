"""MAE (He et al. 2021, docs/methods.md §1): masked-patch reconstruction with the fused ops.

The encoder embeds only the kept patches (``masked_patch_embed`` through the ViT's keep_idx path) and
the loss never materialises the normalised targets (``masked_pixel_loss``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from torch import Tensor

from .. import ops
from ..config import setting
from ..data import augment
from ..nn.mae_decoder import MAEDecoder
from .base import DataInfo, Method


@dataclass
class MAEConfig:
    mask_ratio: float = setting(0.75, "fraction of the patches removed from the encoder's input", within="[0, 1)")
    norm_pix: bool = setting(True, "reconstruct each patch normalised by its own mean and std")
    decoder_dim: int = setting(64, "width of the MAE decoder", within="[1, inf)")
    decoder_depth: int = setting(2, "blocks of the MAE decoder", within="[0, inf)")
    decoder_heads: int = setting(4, "attention heads of the MAE decoder", within="[1, inf)")
    # Off for run folders written before it existed (their optimizer state has the old groups); the presets turn it on.
    decay_tokens: bool = setting(False, "weight decay on cls_token and mask_token too, as MAE's release does")


class MAE(Method):
    """Masked autoencoder: reconstruct the removed patches (He et al. 2021)."""

    name = "mae"
    Config = MAEConfig
    presets = {
        # The same small ViT as the supervised quick preset, decoder 64 wide x 2 blocks, 60 epochs on digits.
        "quick": dict(model="tiny", embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0, patch_size=8,
                      decoder_dim=64, decoder_depth=2, decoder_heads=4, epochs=60, batch_size=64,
                      lr=1.5e-3, warmup_epochs=5, weight_decay=0.05, betas=(0.9, 0.95), mask_ratio=0.75,
                      norm_pix=True, global_pool="avg", decay_tokens=True),
        # docs/methods.md §1.4 (He et al. 2021, facebookresearch/mae main_pretrain.py): AdamW β (0.9, 0.95), wd 0.05
        # on every parameter with more than one dimension (cls_token and mask_token included: ``param_groups``),
        # lr 1.5e-4·batch/256 with the effective batch 4096 (here 16 accumulated micro-batches of 256 per process:
        # --accum-steps and the number of processes split it, the recipe stays the same), 40 warm-up epochs, cosine,
        # RRC (0.2, 1) + flip, mask 0.75, norm_pix, 800 epochs, decoder 512 wide × 8 blocks × 16 heads; the linear
        # probe reads the CLS token (main_linprobe.py's default; global_pool="avg" is the option). Deliberate
        # difference: the encoder is the small-data ViT (patch 4) on 32-px data (ViT-B/16 needs 224-px images).
        "paper": dict(model="small_data", epochs=800, batch_size=4096, accum_steps=16, base_lr=1.5e-4,
                      warmup_epochs=40, weight_decay=0.05, betas=(0.9, 0.95), mask_ratio=0.75, norm_pix=True,
                      decoder_dim=512, decoder_depth=8, decoder_heads=16, global_pool="token", decay_tokens=True),
    }

    def __init__(self, config, data: DataInfo):
        super().__init__(config, data)
        s = config.method_config
        self.model = self.build_encoder(pos_embed="sincos", weight_init="mae")
        self.decoder = MAEDecoder(num_patches=self.model.num_patches, grid_size=self.model.grid_size,
                                  patch_size=self.model.patch_size, in_chans=data.channels,
                                  encoder_dim=self.model.embed_dim, decoder_dim=s.decoder_dim,
                                  depth=s.decoder_depth, num_heads=s.decoder_heads)
        size = data.image_size
        self.train_views = (augment.eval_transform(size, data.mean, data.std) if config.augment == "none"
                            else augment.mae_pretrain(size, data.mean, data.std))

    @property
    def encoder(self):
        return self.model

    def param_groups(self):
        """With ``decay_tokens`` (the presets), MAE's own grouping (its main_pretrain.py: timm's add_weight_decay
        without a skip list): every parameter with more than one dimension is decayed, ``cls_token`` and
        ``mask_token`` included; biases and norms are not. (The position embeddings are fixed sin-cos tables, not
        parameters that train.) Without it, the shared rule (tokens not decayed)."""
        if not self.config.method_config.decay_tokens:
            return super().param_groups()
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
        return [{"params": decay, "weight_decay": self.config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def forward(self, images, labels, indices, generator) -> Tuple[Tensor, Dict[str, float]]:
        x = self.train_views(images, generator)
        s = self.config.method_config
        keep_idx, ids_restore, mask = ops.random_masking(x.shape[0], self.model.num_patches, s.mask_ratio,
                                                         generator=generator, device=x.device)
        tokens = self.model.forward_features(x, keep_idx)
        pred = self.decoder(tokens, ids_restore)
        loss = ops.masked_pixel_loss(pred, x, mask, self.model.patch_size, norm_pix=s.norm_pix)
        return loss, {}
