"""vitfast: fused kernels and training scripts for self-supervised Vision Transformers on small data."""
import torch  # noqa: F401  (vitfast._C registers its ops into torch's dispatcher)

from . import nn, ops
from .nn import DINOLoss, InfoNCELoss, NTXentLoss, RelationHead, SupConLoss, ViT
from .ops import available_backends

__version__ = "0.1.0"
__all__ = ["nn", "ops", "RelationHead", "ViT", "NTXentLoss", "InfoNCELoss", "SupConLoss", "DINOLoss",
           "available_backends", "__version__"]
