"""Modules: the ViT (timm parameter names) and its position embeddings."""
from .pos_embed import resample_pos_embed, sincos_1d_pos_embed, sincos_2d_pos_embed
from .vit import VIT_CONFIGS, Attention, Block, DropPath, Mlp, PatchEmbed, ViT, vit_config

__all__ = [
    "ViT", "VIT_CONFIGS", "vit_config", "PatchEmbed", "Attention", "Mlp", "Block", "DropPath",
    "sincos_1d_pos_embed", "sincos_2d_pos_embed", "resample_pos_embed",
]
