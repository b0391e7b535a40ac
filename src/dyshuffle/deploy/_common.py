"""Helpers shared by the deploy commands: loading a checkpoint with clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["CheckpointError", "fields_of", "input_size_of", "load_model", "metadata"]


class CheckpointError(ValueError):
    """A checkpoint is missing or lacks what a deploy command needs; the message names it."""


def load_model(path: str | Path, weights: str = "auto") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a training checkpoint, in ``eval()`` mode.

    Args:
        path: a checkpoint written by :func:`dyshuffle.train.checkpoint.save_checkpoint`, or a
            run folder (its ``last.pt``).
        weights: ``"auto"`` (the weights the run evaluated), ``"model"`` or ``"ema"``.

    Returns:
        ``(model, state)``; ``state`` is the checkpoint dictionary.

    Raises:
        CheckpointError: the file does not exist or is not a dyshuffle checkpoint.
    """
    path = Path(path)
    file = path / "last.pt" if path.is_dir() else path
    if not file.is_file():
        what = "has no last.pt" if path.is_dir() else "does not exist"
        raise CheckpointError(
            f"checkpoint {str(path)!r} {what}; pass a file written by 'dyshuffle train' "
            "(e.g. runs/NAME/last.pt) or its run folder"
        )
    from dyshuffle.train.checkpoint import model_from_checkpoint

    try:
        model, state = model_from_checkpoint(file, map_location="cpu", weights=weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{str(path)!r} is not a loadable dyshuffle checkpoint: {e}") from e
    return model.eval(), state


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
