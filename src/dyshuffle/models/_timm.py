"""Make the zoo's models creatable through ``timm.create_model`` when timm is installed.

Importing :mod:`dyshuffle.models` registers every name with timm's registry if timm is already
imported, and otherwise as soon as timm is imported (a one-shot import hook), so importing the
zoo never pays for importing timm. Names timm already has are left alone; nothing here raises
when timm is absent.

``timm.create_model(name, features_only=True, out_indices=..., feature_cls=...)`` wraps the model
in timm's own feature extractors (``feature_cls``: ``"getter"``, the default, which uses the
model's ``forward_intermediates``; ``"list"``, ``"dict"`` or ``"hook"``); ``out_indices``
defaults to every feature of ``model.feature_info``. The model's ``pretrained_cfg`` (updated by
``pretrained_cfg_overlay``) comes along, on an extractor without its classifier keys, as timm's
own builder leaves it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from ._registry import create_model, list_models

__all__ = ["install_timm_hook", "register_timm_models"]

#: ``feature_cls`` names of ``timm.create_model(..., features_only=True)`` that our models take
FEATURE_CLASSES = ("getter", "list", "dict", "hook")


def _timm_features(model: nn.Module, out_indices: Any = None, feature_cls: Any = None) -> nn.Module:
    """``model`` in the timm feature extractor ``feature_cls`` (timm is imported: timm called us).

    Raises:
        ValueError: for an unknown ``feature_cls`` or bad ``out_indices``, naming the value.
    """
    from timm.models._features import (
        FeatureDictNet,
        FeatureGetterNet,
        FeatureHookNet,
        FeatureListNet,
    )

    from ._features import feature_take_indices, features_cfg

    kind = "getter" if feature_cls is None else feature_cls
    if kind not in FEATURE_CLASSES:
        raise ValueError(
            f"unknown feature_cls {feature_cls!r}; valid: {', '.join(map(repr, FEATURE_CLASSES))}"
        )
    take, _ = feature_take_indices(len(model.feature_info), out_indices)  # ValueError, not assert
    cfg = features_cfg(model.pretrained_cfg)
    if kind == "getter":
        net = FeatureGetterNet(model, out_indices=take)
    elif kind == "hook":
        net = FeatureHookNet(model, out_indices=take)
    else:
        # timm's list and dict extractors rebuild the body from the model's children: a feature
        # inside a Sequential child (MobileNetV2's ``features.3``) needs that child flattened
        flatten = any("." in f["module"] for f in model.feature_info)
        cls = FeatureListNet if kind == "list" else FeatureDictNet
        net = cls(model, out_indices=take, flatten_sequential=flatten)
    net.pretrained_cfg = net.default_cfg = cfg  # (timm's builder sets both names)
    return net


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    def entrypoint(
        pretrained: bool = False,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: Any = None,
        cache_dir: Any = None,
        device: Any = None,
        dtype: Any = None,
        features_only: bool = False,
        out_indices: Any = None,
        feature_cls: Any = None,
        **kwargs: Any,
    ) -> nn.Module:
        if pretrained:
            raise ValueError(
                f"dyshuffle model {name!r} has no pretrained weights; pass pretrained=False"
            )
        if not features_only and (out_indices is not None or feature_cls is not None):
            raise ValueError(
                f"out_indices={out_indices!r} and feature_cls={feature_cls!r} need "
                f"features_only=True"
            )
        model = create_model(name, **kwargs)
        if pretrained_cfg_overlay:
            model.pretrained_cfg = {**model.pretrained_cfg, **pretrained_cfg_overlay}
        if features_only:
            model = _timm_features(model, out_indices, feature_cls)
        if device is not None or dtype is not None:  # asked for by the caller, not decided here
            model = model.to(device=device, dtype=dtype)
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"``dyshuffle.models.create_model({name!r}, **kwargs)`` for timm."
    return entrypoint


def register_timm_models() -> list[str]:
    """Register every model of the zoo with timm; returns the names registered by this call.

    Names timm already knows (its own, or ours from an earlier call) are skipped, so the call is
    idempotent and never overrides a timm model. Returns ``[]`` when timm is not installed.
    """
    try:
        from timm.models import is_model as timm_is_model
        from timm.models import register_model as timm_register_model
    except ImportError:
        return []
    done = []
    module = sys.modules[__name__]
    for name in list_models():
        if timm_is_model(name):
            continue
        fn = _entrypoint(name)
        setattr(module, name, fn)  # timm adds the name to this module's __all__
        timm_register_model(fn)
        done.append(name)
    return done


def _register_quietly() -> None:
    try:
        register_timm_models()
    except Exception as err:  # a timm API change must not break importing timm
        warnings.warn(f"dyshuffle: registering models with timm failed: {err!r}", stacklevel=2)


class _TimmImportHook(importlib.abc.MetaPathFinder):
    """One-shot finder: lets the other finders locate timm, registers once it has executed."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "timm":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module: Any) -> None:
            try:
                exec_module(module)
            finally:
                try:
                    del loader.exec_module  # back to the class's method
                except AttributeError:
                    pass
            _register_quietly()

        loader.exec_module = exec_then_register
        return spec


def install_timm_hook() -> None:
    """Register with timm now if it is imported, else when it gets imported (if installed)."""
    if "timm" in sys.modules:
        _register_quietly()
    elif importlib.util.find_spec("timm") is not None and not any(
        isinstance(f, _TimmImportHook) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _TimmImportHook())
