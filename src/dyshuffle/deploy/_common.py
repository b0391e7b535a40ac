"""Helpers shared by the deploy commands: loading a checkpoint with clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dyshuffle.train.checkpoint import CheckpointError, load_model

__all__ = ["CheckpointError", "fields_of", "input_size_of", "load_model", "metadata"]


def input_size_of(state: dict[str, Any]) -> tuple[int, int, int]:
    """``(C, H, W)`` recorded in a checkpoint."""
    size = state.get("input_size")
    if size is None or len(size) != 3:
        raise CheckpointError(f"checkpoint has no valid 'input_size' [C, H, W], got {size!r}")
    return tuple(int(s) for s in size)  # type: ignore[return-value]


def fields_of(state: dict[str, Any], path: str | Path, *keys: str) -> list[Any]:
    """The values of ``keys`` in a checkpoint; a missing one raises naming it and the file."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {missing[0]!r}")
    return [state[k] for k in keys]


def metadata(state: dict[str, Any]) -> dict[str, str]:
    """What a deployed file needs besides the graph: classes, normalization, input size."""
    keys = ("class_names", "mean", "std", "input_size", "model_args", "epoch")
    meta = {k: state[k] for k in keys if k in state}
    return {"dyshuffle": json.dumps(meta, default=str)}
