"""Fused ops. Each op lives in its own module with its reference; importing it registers it.

``available_backends(op=None)`` lists the backends that can run on this machine now;
``backends_needing_a_device(op=None)`` those built or installed that need a device that is not here.
"""
from ._backend import ENV_VAR, available_backends, backends_needing_a_device
from .contrastive_loss import contrastive_loss, contrastive_loss_reference
from .dino_loss import dino_loss, dino_loss_reference
from .masked_patch_embed import masked_patch_embed, masked_patch_embed_reference
from .masked_pixel_loss import MaskedPixelLoss, masked_pixel_loss, masked_pixel_loss_reference
from .masking import corrupt_positions, random_masking
from .nn_topk import nn_topk, nn_topk_reference
from .relation_loss import relation_logits, relation_loss, relation_loss_reference, relation_targets
from .self_attention import self_attention, self_attention_reference
from .relation_mlp_loss import relation_mlp_loss, relation_mlp_loss_reference, relation_mlp_outputs, relation_offsets

__all__ = [
    "ENV_VAR", "available_backends", "backends_needing_a_device",
    "contrastive_loss", "contrastive_loss_reference",
    "dino_loss", "dino_loss_reference", "nn_topk", "nn_topk_reference",
    "masked_patch_embed", "masked_patch_embed_reference",
    "masked_pixel_loss", "masked_pixel_loss_reference", "MaskedPixelLoss",
    "relation_loss", "relation_loss_reference", "relation_logits", "relation_targets",
    "relation_mlp_loss", "relation_mlp_loss_reference", "relation_mlp_outputs", "relation_offsets",
    "self_attention", "self_attention_reference",
    "random_masking", "corrupt_positions",
]
