"""Modules: the ViT (timm parameter names), its position embeddings, method heads and loss state."""
from .pos_embed import resample_pos_embed, sincos_1d_pos_embed, sincos_2d_pos_embed
from .contrastive import InfoNCELoss, NTXentLoss, SupConLoss, cached_contrastive_backward
from .dino import DINOHead, DINOLoss
from .heads import MLPHead, prediction_head, projection_head
from .loss_state import FeatureQueue, MomentumCentre
from .mae_decoder import MAEDecoder
from .momentum import MomentumTeacher, cosine_momentum
from .nnclr import NNCLRLoss
from .relation_head import RelationHead
from .vit import VIT_CONFIGS, Attention, Block, DropPath, Mlp, PatchEmbed, ViT, vit_config

__all__ = [
    "ViT", "RelationHead", "MAEDecoder", "VIT_CONFIGS", "vit_config", "PatchEmbed", "Attention", "Mlp", "Block", "DropPath",
    "sincos_1d_pos_embed", "sincos_2d_pos_embed", "resample_pos_embed",
    "MLPHead", "projection_head", "prediction_head", "MomentumCentre", "FeatureQueue",
    "NTXentLoss", "InfoNCELoss", "SupConLoss", "cached_contrastive_backward",
    "MomentumTeacher", "cosine_momentum", "NNCLRLoss", "DINOHead", "DINOLoss",
]
