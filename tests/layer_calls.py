"""Test helper: what each dynamic layer of a model is called with on one forward."""

from __future__ import annotations

from typing import Any

import torch

from dyshuffle.layers import DynamicShuffle


def dynamic_layer_calls(
    model: torch.nn.Module, x: torch.Tensor
) -> dict[str, tuple[DynamicShuffle, tuple[Any, ...], dict[str, Any]]]:
    """``{name: (layer, args, kwargs)}`` of every :class:`DynamicShuffle` of ``model`` called in
    ``model(x)`` (no gradients), to ask the layer about the same inputs afterwards."""
    calls: dict[str, tuple[DynamicShuffle, tuple[Any, ...], dict[str, Any]]] = {}

    def record(name: str):
        def hook(layer: DynamicShuffle, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls[name] = (layer, args, kwargs)

        return hook

    hooks = [
        m.register_forward_pre_hook(record(n), with_kwargs=True)
        for n, m in model.named_modules()
        if isinstance(m, DynamicShuffle)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls
