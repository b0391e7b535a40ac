"""Checkpoints: atomic saves, loads, and rebuilding a model from a checkpoint.

A checkpoint is a ``dict`` saved with :func:`torch.save`. It holds at least

* ``model``: the state dict of the trained weights;
* ``model_args``: the :func:`~dyshuffle.models.create_model` keywords (``name``, ``num_classes``,
  ``stem``, ``mixer``, ``pointwise``, ``in_chans`` and the mixer keywords);
* ``class_names``, ``input_size`` (``[C, H, W]``), ``mean``, ``std``;
* ``epoch`` (completed epochs) and ``config`` (the resolved run configuration);

and, written by ``dyshuffle train``: ``ema`` (the EMA weights, when enabled), ``tau`` (the
temperature of the dynamic layers), ``optimizer``, ``scheduler``, ``scaler``, ``rng``,
``step_in_epoch``, ``global_step``, ``best_top1``, ``metrics``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "REQUIRED_KEYS",
    "load_checkpoint",
    "model_from_checkpoint",
    "save_checkpoint",
    "set_tau",
]

REQUIRED_KEYS = (
    "model",
    "model_args",
    "class_names",
    "input_size",
    "mean",
    "std",
    "epoch",
    "config",
)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder, are flushed and ``fsync``-ed, and the
    file is renamed over ``path`` with :func:`os.replace`: a reader (or a process killed at any
    moment) sees either the old file or the complete new one.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint ``dict``; a run folder means its ``last.pt``.

    Raises:
        FileNotFoundError: naming the missing path.
        ValueError: when the file is not a checkpoint written by this package.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # unpickling errors come in many types
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(state, dict) or "model" not in state or "model_args" not in state:
        raise ValueError(
            f"{path} is not a dyshuffle checkpoint "
            f"(expected a dict with keys {', '.join(REQUIRED_KEYS)})"
        )
    return state


def set_tau(model: nn.Module, tau: float) -> None:
    """Set the softmax temperature of every dynamic-shuffle layer of ``model``."""
    from dyshuffle.layers import DynamicShuffle

    for m in model.modules():
        if isinstance(m, DynamicShuffle):
            m.tau = float(tau)


def model_from_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", weights: str = "auto"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint and load its weights.

    Args:
        path: a checkpoint file or a run folder (its ``last.pt``).
        map_location: passed to :func:`torch.load`.
        weights: ``"auto"`` (the EMA weights when the run kept them, else ``model``),
            ``"model"`` or ``"ema"``.

    Returns:
        ``(model in eval mode, checkpoint dict)``.
    """
    from dyshuffle.models import create_model

    if weights not in ("auto", "model", "ema"):
        raise ValueError(f"unknown weights {weights!r}; valid: 'auto', 'model', 'ema'")
    state = load_checkpoint(path, map_location)
    if weights == "ema" and state.get("ema") is None:
        raise ValueError(f"checkpoint {path} holds no EMA weights")
    use_ema = weights == "ema" or (weights == "auto" and state.get("ema") is not None)
    model = create_model(**state["model_args"])
    model.load_state_dict(state["ema"] if use_ema else state["model"])
    if state.get("tau") is not None:
        set_tau(model, state["tau"])
    return model.eval(), state
