"""Checkpoints: atomic saves, loads, and rebuilding a model from a checkpoint.

A checkpoint is a ``dict`` saved with :func:`torch.save`. It holds at least

* ``model``: the state dict of the trained weights;
* ``model_args``: the :func:`~dyshuffle.models.create_model` keywords (``name``, ``num_classes``,
  ``stem``, ``mixer``, ``pointwise``, ``in_chans`` and the mixer keywords);
* ``class_names``, ``input_size`` (``[C, H, W]``), ``mean``, ``std``;
* ``epoch`` (completed epochs) and ``config`` (the resolved run configuration);

and, written by ``dyshuffle train``: ``ema`` (the EMA weights, when enabled), ``tau`` (the
temperature of the dynamic layers), ``layer_defaults`` (:func:`layer_defaults` when it was
written, so that a later change of a default, such as the generator width, does not change the
model a checkpoint rebuilds), ``optimizer``, ``scheduler``, ``scaler``, ``rng``,
``step_in_epoch``, ``global_step``, ``best_top1``, ``metrics``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._atomic import atomic_write

__all__ = [
    "EARLIER_LAYER_DEFAULTS",
    "REQUIRED_KEYS",
    "CheckpointError",
    "add_assignment_argument",
    "assignment_options",
    "layer_assignments",
    "layer_defaults",
    "load_checkpoint",
    "load_model",
    "model_from_checkpoint",
    "resolve_weights",
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

#: mixers whose layers take :class:`~dyshuffle.layers.DynamicShuffle`'s keywords
_DYNAMIC_MIXERS = ("dynamic", "learned", "static_dynamic")

#: defaults of :class:`~dyshuffle.layers.DynamicShuffle` that earlier versions had, newest first:
#: tried, with a warning, on checkpoints written before ``layer_defaults`` was saved with them
#: whose weights do not fit the current defaults (``reduction`` was 4 until commit 0d13c4c)
EARLIER_LAYER_DEFAULTS: tuple[dict[str, Any], ...] = ({"reduction": 4},)


def layer_defaults() -> dict[str, Any]:
    """The keyword defaults of :class:`~dyshuffle.layers.DynamicShuffle` (``dyshuffle train``
    saves them with each checkpoint)."""
    from dyshuffle.layers import DynamicShuffle

    params = inspect.signature(DynamicShuffle.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _with_layer_keywords(
    model_args: dict[str, Any], keywords: dict[str, Any], replace: bool = False
) -> dict[str, Any]:
    """``model_args`` with ``keywords`` given to the dynamic layers (the mixer's, and
    ``pointwise_kwargs`` for ``pointwise="sds"``): wherever the arguments do not set them, or in
    place of what they set with ``replace``."""
    args = dict(model_args)
    if not keywords:
        return args

    def added(kw: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in keywords.items() if replace or k not in kw}

    if args.get("mixer") in _DYNAMIC_MIXERS:
        args.update(added(args))
    if args.get("pointwise") == "sds":
        kw = dict(args.get("pointwise_kwargs") or {})
        kw.update(added(kw))
        args["pointwise_kwargs"] = kw
    return args


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder, are flushed and ``fsync``-ed, and the
    file is renamed over ``path`` with :func:`os.replace`: a reader (or a process killed at any
    moment) sees either the old file or the complete new one.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = atomic_write(path, lambda f: torch.save(state, f), durable=True)
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


#: the error of ``weights="ema"`` for a checkpoint without EMA weights
_NO_EMA = "the checkpoint holds no EMA weights (its run had no --ema); valid weights: auto, model"


def resolve_weights(state: dict[str, Any], weights: str = "auto") -> str:
    """The weights of checkpoint ``state`` that ``weights`` names: ``"model"`` or ``"ema"``.

    ``"auto"`` is the run's own choice (``eval_weights``, saved by ``dyshuffle train``: what its
    validation, ``best.pt`` and ``results.json`` used); for checkpoints without it, the EMA
    weights when the run kept them.

    Raises:
        ValueError: an unknown ``weights``, or ``"ema"`` for a checkpoint without EMA weights.
    """
    if weights not in ("auto", "model", "ema"):
        raise ValueError(f"unknown weights {weights!r}; valid: 'auto', 'model', 'ema'")
    has_ema = state.get("ema") is not None
    if weights == "ema" and not has_ema:
        raise ValueError(_NO_EMA)
    if weights == "auto":
        weights = "ema" if has_ema and state.get("eval_weights", "ema") == "ema" else "model"
    return weights


def _with_layer_options(
    model_args: dict[str, Any], options: dict[str, Any], path: str | os.PathLike
) -> dict[str, Any]:
    """``model_args`` with the dynamic layers' keywords ``options`` set (replacing the trained
    ones), for the mixer's layers and, with ``pointwise="sds"``, the SDS layers'."""
    mixer, pointwise = model_args.get("mixer"), model_args.get("pointwise", "conv")
    if options and mixer not in _DYNAMIC_MIXERS and pointwise != "sds":
        raise CheckpointError(
            f"checkpoint {path} has no dynamic-shuffle layers (mixer {mixer!r}, pointwise "
            f"{pointwise!r}) for the layer options {options}"
        )
    return _with_layer_keywords(model_args, options, replace=True)


def add_assignment_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """``--assignment`` of the commands that rebuild a checkpoint (evaluate, inspect, export):
    the binarization in place of the trained one, given to :func:`model_from_checkpoint` by
    :func:`assignment_options`; ``example`` ends the help text."""
    from dyshuffle.layers.permutation import ASSIGNMENT_METHODS

    parser.add_argument(
        "--assignment",
        choices=ASSIGNMENT_METHODS,
        default=None,
        help=f"binarize the dynamic layers' factors so instead of as trained ({example})",
    )


def assignment_options(assignment: str | None) -> dict[str, Any] | None:
    """The ``layer_options`` of an ``--assignment`` (``None``: as trained)."""
    return None if assignment is None else {"assignment": assignment}


def layer_assignments(model: nn.Module) -> list[str]:
    """The ``assignment`` (binarization) of the dynamic layers of ``model``, each once, sorted
    (empty without dynamic layers): what ``layer_options={"assignment": ...}`` set."""
    from dyshuffle.layers import DynamicShuffle

    return sorted({m.assignment for m in model.modules() if isinstance(m, DynamicShuffle)})


def model_from_checkpoint(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    weights: str = "auto",
    layer_options: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint and load its weights.

    Args:
        path: a checkpoint file or a run folder (its ``last.pt``).
        map_location: passed to :func:`torch.load`.
        weights: ``"auto"`` (the weights the run evaluated, see :func:`resolve_weights`),
            ``"model"`` or ``"ema"``.
        layer_options: keywords of :class:`~dyshuffle.layers.DynamicShuffle` that replace the
            trained ones in every dynamic layer (the mixer's, and the SDS layers'), e.g.
            ``{"assignment": "optimal"}`` to apply the nearest permutations to a network
            trained with the greedy ones; the weights must still fit the layers.

    Returns:
        ``(model in eval mode, checkpoint dict)``; its ``model_args`` are those of the model
        built (with ``layer_options``).

    Raises:
        ValueError: an unknown ``weights``, or ``"ema"`` for a checkpoint without EMA weights
            (:func:`resolve_weights`); :class:`CheckpointError` (a ValueError) for
            ``layer_options`` and a model without dynamic layers.
    """
    from dyshuffle.models import create_model

    if weights not in ("auto", "model", "ema"):
        raise ValueError(f"unknown weights {weights!r}; valid: 'auto', 'model', 'ema'")
    state = load_checkpoint(path, map_location)
    use_ema = resolve_weights(state, weights) == "ema"
    # the dynamic layers' defaults when the checkpoint was written, where they differ from now
    saved = state.get("layer_defaults")
    now = layer_defaults()
    changed = {k: v for k, v in (saved or {}).items() if k in now and now[k] != v}
    candidates = [_with_layer_keywords(state["model_args"], changed)]
    if saved is None:  # older checkpoints: the earlier defaults, if the current ones do not fit
        for earlier in EARLIER_LAYER_DEFAULTS:
            args = _with_layer_keywords(candidates[0], earlier)
            if args not in candidates:
                candidates.append(args)
    candidates = [_with_layer_options(c, layer_options or {}, path) for c in candidates]
    weights_ = state["ema"] if use_ema else state["model"]
    loaded, first_error = None, None
    for args in candidates:
        model = create_model(**args)
        try:
            model.load_state_dict(weights_)
        except RuntimeError as e:
            first_error = first_error or e
            if "size mismatch" in str(e):  # shapes: the next defaults may fit
                continue
            break
        loaded = args
        break
    if loaded is None:
        raise first_error  # the error with the defaults of the checkpoint (or of now)
    if loaded is not candidates[0]:
        earlier = {k: v for k, v in loaded.items() if candidates[0].get(k) != v}
        warnings.warn(
            f"checkpoint {path} was written before the dynamic layers' defaults were saved with "
            f"it and does not fit the current ones; it loads with the earlier defaults "
            f"{earlier} (EARLIER_LAYER_DEFAULTS)",
            stacklevel=2,
        )
    if loaded != state["model_args"]:
        state = {**state, "model_args": loaded}
    if state.get("tau") is not None:
        set_tau(model, state["tau"])
    return model.eval(), state


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or lacks what a command needs; the message names it
    (what the deploy commands, ``torch.hub`` and ``--init-checkpoint`` report)."""


def load_model(
    path: str | Path, weights: str = "auto", layer_options: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a training checkpoint, in ``eval()`` mode.

    Args:
        path: a checkpoint written by :func:`save_checkpoint`, or a
            run folder (its ``last.pt``).
        weights: ``"auto"`` (the weights the run evaluated), ``"model"`` or ``"ema"``.
        layer_options: dynamic-layer keywords that replace the trained ones
            (:func:`model_from_checkpoint`).

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
    try:
        model, state = model_from_checkpoint(
            file, map_location="cpu", weights=weights, layer_options=layer_options
        )
    except CheckpointError:  # loadable, but not with what was asked of it (layer_options)
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{str(path)!r} is not a loadable dyshuffle checkpoint: {e}") from e
    return model.eval(), state
