"""MAE (He et al. 2021, docs/methods.md §1): masked-patch reconstruction with the fused ops.

The encoder embeds only the kept patches (``masked_patch_embed`` through the ViT's keep_idx path) and
the loss never materialises the normalised targets (``masked_pixel_loss``).
"""
from __future__ import annotations

from typing import Dict, Tuple

from torch import Tensor

from .. import ops
from ..data import augment
from ..nn.mae_decoder import MAEDecoder
from .base import DataInfo, Method


class MAE(Method):
    name = "mae"

    def __init__(self, config, data: DataInfo):
        super().__init__(config, data)
        self.model = self.build_encoder(pos_embed="sincos", weight_init="mae")
        self.decoder = MAEDecoder(num_patches=self.model.num_patches, grid_size=self.model.grid_size,
                                  patch_size=self.model.patch_size, in_chans=data.channels,
                                  encoder_dim=self.model.embed_dim, decoder_dim=config.decoder_dim,
                                  depth=config.decoder_depth, num_heads=config.decoder_heads)
        size = data.image_size
        self.train_views = (augment.eval_transform(size, data.mean, data.std) if config.augment == "none"
                            else augment.mae_pretrain(size, data.mean, data.std))

    @property
    def encoder(self):
        return self.model

    def forward(self, images, labels, indices, generator) -> Tuple[Tensor, Dict[str, float]]:
        x = self.train_views(images, generator)
        keep_idx, ids_restore, mask = ops.random_masking(x.shape[0], self.model.num_patches, self.config.mask_ratio,
                                                         generator=generator, device=x.device)
        tokens = self.model.forward_features(x, keep_idx)
        pred = self.decoder(tokens, ids_restore)
        loss = ops.masked_pixel_loss(pred, x, mask, self.model.patch_size, norm_pix=self.config.norm_pix)
        return loss, {}
