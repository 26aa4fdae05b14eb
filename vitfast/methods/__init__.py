"""Training methods: small classes over the shared engine (vitfast.engine). One module per method."""
from .base import DataInfo, Method
from .mae import MAE
from .relvit import RelViT
from .supervised import Supervised

METHODS = {cls.name: cls for cls in (Supervised, MAE, RelViT)}

__all__ = ["DataInfo", "Method", "METHODS", "MAE", "RelViT", "Supervised"]
