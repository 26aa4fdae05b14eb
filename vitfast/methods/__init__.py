"""Training methods: small classes over the shared engine (vitfast.engine), one module per method.

Each module holds the whole method: its settings dataclass (``Config``), its ``quick`` and ``paper``
presets, its model, views and loss. The registry below is the only other place that names it.
"""
from .base import DataInfo, Method, NoSettings
from .registry import METHODS, get_method, register_method

# The registry: one line per method ("module:Class").
register_method("vitfast.methods.supervised:Supervised")
register_method("vitfast.methods.mae:MAE")
register_method("vitfast.methods.relvit:RelViT")
register_method("vitfast.methods.simclr:SimCLR")
register_method("vitfast.methods.mocov3:MoCoV3")
register_method("vitfast.methods.lacvit:LaCViT")
register_method("vitfast.methods.dilemma:DILEMMA")
register_method("vitfast.methods.mae_ct:MAECT")
register_method("vitfast.methods.dino:DINO")

# Existing imports such as `from vitfast.methods import MAE` keep working; a new method needs no line here.
from .mae import MAE  # noqa: E402
from .relvit import RelViT  # noqa: E402
from .supervised import Supervised  # noqa: E402

__all__ = ["DataInfo", "Method", "NoSettings", "METHODS", "get_method", "register_method", "MAE", "RelViT",
           "Supervised"]
