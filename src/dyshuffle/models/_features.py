"""Multi-scale feature maps for detection and segmentation necks, in timm's conventions.

Every model of the zoo has ``feature_info`` (a list of ``dict(num_chs, reduction, module)``:
channels, input size / feature size, and the name of the module whose output the feature is),
``forward_intermediates`` and ``prune_intermediate_layers`` (see
:class:`~dyshuffle.models.ClassifierModel`). ``create_model(name, features_only=True,
out_indices=...)`` wraps a model in :class:`FeatureListNet`, which returns the list of the chosen
feature maps, as timm's ``FeatureListNet`` does; none of this needs timm.
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy
from typing import Any

from torch import Tensor, nn

__all__ = ["FeatureInfo", "FeatureListNet", "feature_take_indices"]

#: feature indices: ``None`` (all), an int ``n`` (the last ``n``) or a sequence of indices
Indices = int | Sequence[int] | None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def feature_take_indices(num_features: int, indices: Indices = None) -> tuple[list[int], int]:
    """The absolute feature indices that ``indices`` selects, and the largest of them.

    Follows ``timm.models.feature_take_indices``, except that the indices come back sorted (the
    order the network produces the features in) and bad ones raise ``ValueError``.

    Args:
        num_features: how many features the model has (``len(model.feature_info)``).
        indices: ``None``: all; an int ``n``: the last ``n``; a sequence: those indices
            (negative ones count from the end; no repeats).

    Raises:
        ValueError: for an index out of range, a repeated index, an empty sequence or a
            non-integer, naming the value.
    """
    if indices is None:
        indices = num_features
    if _is_int(indices):
        if not 0 < indices <= num_features:
            raise ValueError(
                f"out_indices {indices!r} (the last n features) must be 1 to {num_features}"
            )
        take = list(range(num_features - indices, num_features))
        return take, take[-1]
    if isinstance(indices, str) or not isinstance(indices, Sequence) or not indices:
        raise ValueError(
            f"out_indices must be None, an int or a non-empty sequence of ints, got {indices!r}"
        )
    take = []
    for i in indices:
        if not _is_int(i) or not -num_features <= i < num_features:
            raise ValueError(
                f"feature index {i!r} in out_indices {indices!r} is out of range for "
                f"{num_features} features (0 to {num_features - 1}, or -{num_features} to -1)"
            )
        take.append(i % num_features)
    if len(set(take)) != len(take):
        raise ValueError(f"out_indices {indices!r} name a feature more than once")
    take.sort()
    return take, take[-1]


class FeatureInfo:
    """The ``feature_info`` of a feature extractor: a model's feature list and the chosen indices.

    The accessors are timm's (``timm.models.FeatureInfo``): without ``idx`` they answer for the
    chosen features, in order; with an int or a list they answer for those model features.

    Args:
        info: the model's ``feature_info`` (copied).
        out_indices: the chosen features (absolute indices).
    """

    def __init__(self, info: Sequence[dict[str, Any]], out_indices: Sequence[int]) -> None:
        self.info = [dict(f, index=i) for i, f in enumerate(deepcopy(list(info)))]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        """``key`` of each chosen feature (``idx=None``), of feature ``idx``, or of a list."""
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, Sequence):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(
        self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None
    ) -> Any:
        """The dicts (restricted to ``keys``) of the chosen features, of ``idx`` or of a list."""

        def pick(i: int) -> dict[str, Any]:
            return self.info[i] if keys is None else {k: self.info[i][k] for k in keys}

        if idx is None:
            return [pick(i) for i in self.out_indices]
        if isinstance(idx, Sequence):
            return [pick(i) for i in idx]
        return pick(idx)

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        """Channels (``num_chs``)."""
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        """Reduction (input size / feature size)."""
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        """Name of the module whose output the feature is."""
        return self.get("module", idx)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo(out_indices={self.out_indices}, info={self.get_dicts()})"


def features_cfg(cfg: dict) -> dict:
    """A feature extractor's ``pretrained_cfg``: its model's without the classifier's keys (what
    timm's builder leaves on its extractors)."""
    return {k: v for k, v in cfg.items() if k not in ("num_classes", "classifier", "global_pool")}


class FeatureListNet(nn.Module):
    """A model cut after its deepest chosen feature, returning the chosen feature maps.

    The behaviour of timm's ``FeatureListNet``: ``forward(x)`` is a list of ``(N, C_i, H_i, W_i)``
    tensors with ``C_i = feature_info.channels()[i]`` and ``H / H_i =
    feature_info.reduction()[i]``, in network order. Built by
    ``create_model(name, features_only=True, out_indices=...)``.

    Args:
        model: a model of the zoo (it is pruned in place, see ``prune_intermediate_layers``).
        out_indices: the features to return, see :func:`feature_take_indices` (``None``: all).

    Raises:
        ValueError: for bad ``out_indices``, naming the value.
    """

    def __init__(self, model: nn.Module, out_indices: Indices = None) -> None:
        super().__init__()
        take = model.prune_intermediate_layers(out_indices, prune_head=True)
        self.model = model
        self.out_indices = tuple(take)
        self.feature_info = FeatureInfo(model.feature_info, take)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_intermediates(
            x, indices=list(self.out_indices), intermediates_only=True
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """The model's :meth:`~ClassifierModel.set_grad_checkpointing` (timm's extractors too)."""
        self.model.set_grad_checkpointing(enable)

    @property
    def pretrained_cfg(self) -> dict:
        """The model's ``pretrained_cfg`` without the classifier's keys (as timm's extractors)."""
        return features_cfg(self.model.pretrained_cfg)

    default_cfg = pretrained_cfg

    def extra_repr(self) -> str:
        return f"out_indices={self.out_indices}"
