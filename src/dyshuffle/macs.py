"""Parameter and multiply-accumulate (MAC) counts, in the convention of the ShuffleNet papers.

The ShuffleNet papers' "FLOPs" are multiply-accumulates of the convolutions and fully connected
layers; BatchNorm, activations, pooling, additions and channel permutations count zero. This
counter follows that convention with forward hooks on ``nn.Conv2d`` and ``nn.Linear`` (which
includes the generators of the dynamic layers), and adds ``module.extra_macs(input_shape)`` for
every module that defines it (the channel mixers: the static-dynamic shuffle's functional
grouped convolution, the soft Kronecker products of a dynamic shuffle in ``"soft"`` mode).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["count_macs", "count_params", "mac_breakdown", "replaced_params"]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (shared parameters once).

    Args:
        model: the module.
        trainable_only: count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def replaced_params(
    original: nn.Module, variant: nn.Module, kind: type[nn.Module]
) -> tuple[int, int]:
    """Parameters of the modules that ``variant`` replaces by ``kind`` modules, before and after.

    Every ``kind`` module of ``variant`` (outermost ones) is looked up by its qualified name in
    ``original``; e.g. ``(1x1 convolutions, static-dynamic shuffles)`` for a model built with
    ``pointwise="conv"`` and the same model with ``pointwise="sds"``.
    """
    modules = dict(original.named_modules())
    before = after = 0
    inside: list[str] = []
    for name, module in variant.named_modules():
        if not isinstance(module, kind) or any(name.startswith(p + ".") for p in inside):
            continue
        if name not in modules:
            raise ValueError(f"{kind.__name__} module {name!r} has no counterpart in the original")
        inside.append(name)
        before += count_params(modules[name])
        after += count_params(module)
    return before, after


def _conv_macs(module: nn.Conv2d, out: Tensor) -> int:
    kernel = 1
    for k in module.kernel_size:
        kernel *= k
    # every output element: (in_channels / groups) * kh * kw multiply-accumulates
    return out.numel() * (module.in_channels // module.groups) * kernel


def _linear_macs(module: nn.Linear, out: Tensor) -> int:
    return out.numel() * module.in_features


def mac_breakdown(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> dict[str, int]:
    """MACs of one forward pass per module name (only modules that contribute).

    Runs ``model`` once on zeros of ``input_size`` under ``torch.no_grad()`` in its current
    train/eval state, on the device and dtype of its first parameter. BatchNorm running
    statistics (and any other buffer) are restored afterwards, so the count has no side effects.

    Args:
        model: the model.
        input_size: ``(N, C, H, W)``; the MACs are for the whole batch of ``N``.

    Raises:
        ValueError: when ``input_size`` is not four positive integers.
    """
    size = tuple(input_size)
    if len(size) != 4 or any(not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"input_size must be (N, C, H, W) positive integers, got {input_size!r}")
    ref = next(model.parameters(), None)
    if ref is None:
        ref = next(model.buffers(), torch.zeros(()))
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    x = torch.zeros(size, device=ref.device, dtype=dtype)

    counts: dict[str, int] = {}
    handles = []

    def add(name: str, value: int) -> None:
        if value:
            counts[name] = counts.get(name, 0) + int(value)

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(
                module.register_forward_hook(lambda m, i, o, name=name: add(name, _conv_macs(m, o)))
            )
        elif isinstance(module, nn.Linear):
            handles.append(
                module.register_forward_hook(
                    lambda m, i, o, name=name: add(name, _linear_macs(m, o))
                )
            )
        if callable(getattr(module, "extra_macs", None)):
            handles.append(
                module.register_forward_hook(
                    lambda m, i, o, name=name: add(name, m.extra_macs(tuple(i[0].shape)))
                )
            )
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in saved:
                    b.copy_(saved[name])
    return counts


def count_macs(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on a batch of ``input_size``.

    Convolutions and linear layers (the dynamic generators included) plus every module's
    ``extra_macs``; counted in the model's current train/eval state (a dynamic shuffle applies a
    hard permutation, 0 MACs, in ``eval()``). See :func:`mac_breakdown`.

    Args:
        model: the model.
        input_size: ``(N, C, H, W)``; the count is for the whole batch.
    """
    return sum(mac_breakdown(model, input_size).values())
