"""Atomic checkpoints and the random state an exact resume needs.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
the target (``os.replace`` is atomic on POSIX): a crash mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Dict, Optional

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, foreign or too new; the message names the file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file at the checkpoint's path."""


def atomic_save(obj: Any, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load(path: str, map_location="cpu", newest_format: Optional[int] = None) -> Dict[str, Any]:
    """Load a checkpoint; a truncated, foreign or too new (format above ``newest_format``) file gives an error
    that names it."""
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # truncated zip, pickle error, ...
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{path} is not a vitfast checkpoint")
    if newest_format is not None and state["format"] > newest_format:
        raise CheckpointError(f"{path} was written by a newer vitfast (checkpoint format {state['format']}; this one "
                           f"reads up to {newest_format}): update vitfast to use it")
    return state


def encoder_weights(state: Dict[str, Any]) -> Dict[str, Any]:
    """The encoder weights a checkpoint holds (its method's ``encoder_state_dict()``), for ``--init``."""
    if "encoder" in state:
        return state["encoder"]
    # Format 1 stored no encoder of its own; every method of that time (supervised, mae, relvit) kept its
    # encoder as the submodule ``model``.
    return {k[len("model."):]: v for k, v in state["method"].items() if k.startswith("model.")}


def rng_state(generators: Optional[Dict[str, torch.Generator]] = None) -> Dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def set_rng_state(state: Dict[str, Any], generators: Optional[Dict[str, torch.Generator]] = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        g.set_state(state["generators"][name])
