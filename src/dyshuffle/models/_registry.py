"""Model registry: one-line builders registered by name, created through :func:`create_model`."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from ..layers import get_mixer, list_mixers
from ..layers._checks import check_choice
from ._features import FeatureListNet, Indices

__all__ = [
    "MIXER_DESCRIPTORS",
    "STAGES",
    "stage_mixers",
    "POINTWISE",
    "STEMS",
    "create_model",
    "is_model",
    "list_models",
    "model_entrypoint",
    "register_model",
]

#: input stems: ``"imagenet"`` (the original stride-2 stem, and max-pool where the paper has one)
#: and ``"cifar"`` (a stride-1 3x3 stem conv and no max-pool, for 32x32 and 64x64 inputs)
STEMS = ("imagenet", "cifar")
#: pointwise convolutions: ``"conv"`` (1x1 convolution) or ``"sds"`` (static-dynamic shuffle)
POINTWISE = ("conv", "sds")

_MODELS: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(fn: F) -> F:
    """Register a model builder under its function name; a name can be registered once.

    Raises:
        ValueError: when the name is already registered.
    """
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered (by {_MODELS[name].__module__})")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by an ``fnmatch`` pattern.

    Args:
        pattern: e.g. ``"shufflenet_v2_*"`` or ``"*_g3_*"``; ``None`` lists every model.
    """
    names = sorted(_MODELS)
    return names if pattern is None else fnmatch.filter(names, pattern)


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    return name in _MODELS


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The registered builder of ``name``.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(list_models())}")
    return _MODELS[name]


#: the stages of the ShuffleNets (``stage2`` to ``stage4``), as ``mixer_stages`` names them
STAGES = (2, 3, 4)


def stage_mixers(
    mixer: Any, mixer_kwargs: dict[str, Any], mixer_stages: Any
) -> dict[int, tuple[Any, dict[str, Any]]]:
    """The mixer and its keywords for each stage: ``mixer`` in ``mixer_stages``, else the fixed
    shuffle (``None``: every stage).

    Raises:
        ValueError: for stages outside :data:`STAGES`, naming them.
    """
    if mixer_stages is None:
        chosen = set(STAGES)
    else:
        try:
            chosen = set(mixer_stages)
        except TypeError:
            chosen = {mixer_stages}
        if not chosen or not chosen <= set(STAGES):
            raise ValueError(
                f"mixer_stages must be a non-empty list of stages among {list(STAGES)}, got "
                f"{mixer_stages!r}"
            )
    return {s: (mixer, mixer_kwargs) if s in chosen else ("shuffle", {}) for s in STAGES}


#: what a dynamic mixer's generator reads (``mixer_descriptor`` of the ShuffleNets): the mixer's
#: own input (the default) or the input of the unit the mixer belongs to
MIXER_DESCRIPTORS = ("mixer_input", "unit_input")


def reads_unit_input(mixer: Any, mixer_descriptor: str) -> bool:
    """Whether the mixers of a ShuffleNet read their unit's input (``mixer_descriptor``).

    Raises:
        ValueError: an unknown ``mixer_descriptor``, or ``"unit_input"`` with a registered mixer
            that has no generator, naming it.
    """
    check_choice(mixer_descriptor, MIXER_DESCRIPTORS, "mixer_descriptor")
    unit_input = mixer_descriptor == "unit_input"
    if unit_input and isinstance(mixer, str) and mixer != "dynamic":
        raise ValueError(
            f"mixer_descriptor='unit_input' gives the unit's input to the generator of a "
            f"dynamic mixer; mixer={mixer!r} has none (use mixer='dynamic')"
        )
    return unit_input


def unit_mixer_kwargs(
    stage: tuple[Any, dict[str, Any]], mixer: Any, unit_input: bool, in_channels: int
) -> dict[str, Any]:
    """The keywords of one unit's mixer: the stage's (:func:`stage_mixers`), with
    ``context_channels`` the unit's input width when the mixers read it (:func:`reads_unit_input`)
    and the stage got ``mixer`` (not the fixed shuffle of the other stages)."""
    stage_mixer, kwargs = stage
    if unit_input and stage_mixer is mixer:
        return dict(kwargs, context_channels=in_channels)
    return kwargs


def check_model_args(
    stem: str, mixer: Any, pointwise: str, num_classes: int, in_chans: int
) -> None:
    """Validate the arguments every builder shares, with messages naming the valid choices."""
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; valid: {', '.join(map(repr, STEMS))}")
    if pointwise not in POINTWISE:
        raise ValueError(
            f"unknown pointwise {pointwise!r}; valid: {', '.join(map(repr, POINTWISE))}"
        )
    if isinstance(mixer, str):
        get_mixer(mixer)  # raises ValueError listing the valid mixers
    elif not callable(mixer):
        raise ValueError(
            f"mixer must be a registered name or a callable, got {mixer!r}; "
            f"valid names: {', '.join(list_mixers())}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive integer, got {in_chans!r}")


def create_model(
    name: str,
    num_classes: int = 1000,
    stem: str = "imagenet",
    mixer: str | Callable[..., nn.Module] = "shuffle",
    pointwise: str = "conv",
    in_chans: int = 3,
    features_only: bool = False,
    out_indices: Indices = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model, or a feature extractor of one (``features_only=True``).

    The model keeps its arguments as ``model.model_args`` (``name`` included), so
    ``create_model(**model.model_args)`` rebuilds the same architecture.

    Args:
        name: a registered name, see :func:`list_models` (``"shufflenet_v2_x1_0"``,
            ``"shufflenet_v1_g3_x1_0"``, ``"mobilenet_v2"``, ...).
        num_classes: classifier outputs; 0 leaves no classifier (the head returns pooled features).
        stem: ``"imagenet"`` or ``"cifar"``.
        mixer: the channel mixer of each unit, a name of
            :func:`~dyshuffle.layers.list_mixers` (``"shuffle"``, ``"none"``, ``"learned"``,
            ``"dynamic"``, ``"static_dynamic"``) or a callable
            ``(channels, **kwargs) -> nn.Module``.
        pointwise: ``"conv"`` or ``"sds"`` (static-dynamic shuffle in place of the 1x1
            convolutions, where the model supports it).
        in_chans: input channels.
        features_only: return a :class:`~dyshuffle.models.FeatureListNet`: the model cut after
            its deepest chosen feature, whose forward returns the list of the chosen feature
            maps (``num_classes`` then does not matter).
        out_indices: with ``features_only``, the features to return, as indices into
            ``model.feature_info`` (negative ones count from the end), or an int ``n`` for the
            last ``n``; ``None``: all.
        **kwargs: ``pointwise_kwargs`` (a dict for the static-dynamic shuffle layers of
            ``pointwise="sds"``); every other keyword reaches the mixer.

    Raises:
        ValueError: unknown model, stem, mixer or pointwise, naming the valid choices; bad
            ``out_indices``, naming the value.
    """
    if out_indices is not None and not features_only:
        raise ValueError(f"out_indices={out_indices!r} needs features_only=True")
    builder = model_entrypoint(name)
    model = builder(
        num_classes=num_classes,
        stem=stem,
        mixer=mixer,
        pointwise=pointwise,
        in_chans=in_chans,
        **kwargs,
    )
    return FeatureListNet(model, out_indices) if features_only else model


def finalize(model: nn.Module, name: str, args: dict[str, Any]) -> nn.Module:
    """Attach ``model_args`` (the :func:`create_model` keywords, ``name`` first) to ``model``."""
    model_args = {"name": name}
    model_args.update(args)
    if not model_args.get("pointwise_kwargs"):
        model_args.pop("pointwise_kwargs", None)
    model.model_args = model_args
    return model
