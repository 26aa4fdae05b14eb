"""The method registry: ``--method NAME`` -> its class. ``vitfast/methods/__init__.py`` registers the built-ins.

    register_method("vitfast.methods.mae:MAE")     # a "module:Class" path (imported now) or the class itself
    cls = get_method("mae")                         # ValueError naming the available methods otherwise

Registration checks what the engine and the CLI rely on, so a new method fails here, with its name,
instead of in the middle of a run: a ``Method`` subclass with a unique ``name``, a ``Config`` dataclass
whose fields do not shadow the shared config, and ``quick`` and ``paper`` presets whose keys exist.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Dict, Type, Union

from ..config import SHARED_FIELDS, UserError
from .base import Method

METHODS: Dict[str, Type[Method]] = {}
# Names the CLI uses for its own flags: a method setting may not take them either.
RESERVED = set(SHARED_FIELDS) | {"set", "print_config", "no_progress", "help"}


def register_method(method: Union[str, Type[Method]]) -> Type[Method]:
    """Add a method (a class or a "module:Class" path) to the registry; returns the class."""
    if isinstance(method, str):
        module, _, attribute = method.partition(":")
        method = getattr(importlib.import_module(module), attribute)
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise TypeError(f"register_method: expected a vitfast.methods.Method subclass, got {method!r}")
    name = method.name
    where = f"register_method({method.__module__}.{method.__qualname__})"
    if not isinstance(name, str) or not name or name == Method.name:
        raise ValueError(f"{where}: the class needs its own `name` (what --method takes), got {name!r}")
    if name in METHODS and METHODS[name] is not method:
        raise ValueError(f"{where}: the name {name!r} is taken by {METHODS[name].__module__}.{METHODS[name].__name__}")
    if not dataclasses.is_dataclass(method.Config):
        raise TypeError(f"{where}: `Config` must be a dataclass of the method's settings, got {method.Config!r}")
    own = {f.name for f in dataclasses.fields(method.Config)}
    clash = sorted(own & RESERVED)
    if clash:
        raise ValueError(f"{where}: settings {clash} clash with the shared config or the CLI; rename them")
    missing = sorted({"quick", "paper"} - set(method.presets))
    if missing:
        raise ValueError(f"{where}: presets {missing} are missing (every method has quick and paper)")
    for preset, values in method.presets.items():
        for stage, keys in [(None, values)] + list(values.get("stage_overrides", {}).items()):
            unknown = sorted(set(keys) - set(SHARED_FIELDS) - own)
            if unknown:
                at = f"preset {preset!r}" + (f", stage {stage!r}" if stage else "")
                raise ValueError(f"{where}: {at} sets unknown keys {unknown}")
    METHODS[name] = method
    return method


def get_method(name: str) -> Type[Method]:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]
