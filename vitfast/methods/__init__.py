"""Training methods: small classes over the shared engine (vitfast.engine). One module per method."""
from .base import DataInfo, Method
from .mae import MAE
from .supervised import Supervised

METHODS = {cls.name: cls for cls in (Supervised, MAE)}

__all__ = ["DataInfo", "Method", "METHODS", "MAE", "Supervised"]
