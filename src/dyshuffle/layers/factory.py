"""Resolve a channel mixer from a name, a class or a callable (like timm's ``get_attn``).

A mixer builder is called as ``builder(channels, shuffle_groups=g, **kwargs)`` and returns an
``nn.Module`` mapping ``(N, C, H, W)`` to ``(N, C, H, W)``. ``shuffle_groups`` is the group count of
the network's fixed shuffle (2 in ShuffleNetV2, ``g`` in ShuffleNetV1); only ``"shuffle"`` uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .dynamic import DynamicShuffle, LearnedShuffle
from .permutation import choose_groups
from .sds import StaticDynamicShuffle
from .shuffle import ChannelShuffle, IdentityMixer

__all__ = [
    "MixerBuilder",
    "create_mixer",
    "get_mixer",
    "list_mixers",
    "mix_concat",
    "register_mixer",
]

MixerBuilder = Callable[..., nn.Module]

_MIXERS: dict[str, MixerBuilder] = {}


def register_mixer(name: str, builder: MixerBuilder) -> MixerBuilder:
    """Register ``builder`` under ``name``; a name can be registered once."""
    if name in _MIXERS:
        raise ValueError(f"mixer {name!r} is already registered")
    _MIXERS[name] = builder
    return builder


def list_mixers() -> list[str]:
    """Names of the registered mixers."""
    return sorted(_MIXERS)


def get_mixer(mixer: str | MixerBuilder) -> MixerBuilder:
    """A mixer builder from a registered name, or ``mixer`` itself when it is callable."""
    if callable(mixer):
        return mixer
    if mixer not in _MIXERS:
        raise ValueError(f"unknown mixer {mixer!r}; valid: {', '.join(list_mixers())}")
    return _MIXERS[mixer]


def create_mixer(
    mixer: str | MixerBuilder, channels: int, shuffle_groups: int = 2, **kwargs
) -> nn.Module:
    """Build a mixer for ``channels`` channels; ``kwargs`` reach the mixer."""
    builder = get_mixer(mixer)
    if isinstance(mixer, str):
        return builder(channels, shuffle_groups=shuffle_groups, **kwargs)
    return builder(channels, **kwargs)


def mix_concat(mixer: nn.Module, parts: Sequence[Tensor], context: Tensor | None = None) -> Tensor:
    """``mixer(torch.cat(parts, 1))``, the parts passed as they are to a mixer that takes them.

    A mixer with ``accepts_parts = True`` (:class:`~dyshuffle.layers.DynamicShuffle`) is called
    as ``mixer(*parts)`` and may skip the concatenation's copy; any other gets the
    concatenation. Either way the module is called, so its hooks run. ``context`` (say the
    input of the unit the mixer ends) reaches a mixer built to read one (``context_channels``
    set) as ``mixer(..., context=context)``; the others never see it.
    """
    if not getattr(mixer, "accepts_parts", False):
        parts = (parts[0] if len(parts) == 1 else torch.cat(tuple(parts), dim=1),)
    if getattr(mixer, "context_channels", None) is not None:
        return mixer(*parts, context=context)
    return mixer(*parts)


def _fixed(
    channels: int,
    shuffle_groups: int = 2,
    groups: int | str | None = None,
    max_group_size: int = 16,
    **kwargs,
) -> nn.Module:
    """The fixed shuffle with the network's ``shuffle_groups``, or ``groups`` when given:
    ``"auto"`` is the cross-group shuffle of a :class:`DynamicShuffle` of the same width and
    ``max_group_size`` (the layer's shuffle when its factors are identities)."""
    if kwargs:
        raise ValueError(
            f"the 'shuffle' mixer takes only the options groups and max_group_size, got "
            f"{sorted(kwargs)}"
        )
    if groups == "auto":
        groups = choose_groups(channels, None, None, max_group_size)[0]
    elif isinstance(groups, str):
        raise ValueError(f"groups must be a positive integer or 'auto', got {groups!r}")
    return ChannelShuffle(shuffle_groups if groups is None else groups, channels)


def _drop_groups(cls: type[nn.Module]) -> MixerBuilder:
    def build(channels: int, shuffle_groups: int = 2, **kwargs) -> nn.Module:
        return cls(channels, **kwargs)

    build.__name__ = build.__qualname__ = f"build_{cls.__name__}"
    return build


register_mixer("shuffle", _fixed)
register_mixer("none", _drop_groups(IdentityMixer))
register_mixer("learned", _drop_groups(LearnedShuffle))
register_mixer("dynamic", _drop_groups(DynamicShuffle))
register_mixer("static_dynamic", _drop_groups(StaticDynamicShuffle))
