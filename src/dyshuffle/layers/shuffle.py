"""The fixed ShuffleNet channel shuffle (Zhang et al. 2018; Ma et al. 2018).

Used by Dynamic Shuffle (Gong et al., arXiv 2310.02776) as its cross-group shuffle and as the
baseline mixer it replaces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .permutation import _divisors, _exporting, _is_channels_last

__all__ = ["ChannelShuffle", "IdentityMixer", "channel_shuffle"]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Fixed channel shuffle: view channels as ``(groups, C // groups)``, transpose, flatten.

    Output channel ``m * groups + g`` is input channel ``g * (C // groups) + m``.

    Args:
        x: ``(N, C, H, W)`` tensor.
        groups: number of groups; must divide ``C``.
    """
    if x.dim() != 4:
        raise ValueError(f"channel_shuffle expects (N, C, H, W), got shape {tuple(x.shape)}")
    c = x.shape[1]
    if not isinstance(groups, int) or groups < 1 or c % groups:
        raise ValueError(
            f"groups={groups!r} does not divide the {c} input channels; valid groups: "
            f"{_divisors(c)}"
        )
    # PyTorch's kernel for (N, G, C/G, H, W) -> (N, C/G, G, H, W) -> (N, C, H, W): it keeps the
    # memory layout (a view-transpose-reshape would turn channels_last into NCHW) and is faster
    if torch.compiler.is_compiling() and _is_channels_last(x):
        if _exporting():  # a graph for other runtimes holds operators (see permute_channels)
            return _ChannelShuffleCompiled.forward(x, groups)
        return _ChannelShuffleCompiled.apply(x, groups)
    return F.channel_shuffle(x, groups)


class _ChannelShuffleCompiled(torch.autograd.Function):
    """PyTorch's kernel for a channels_last input under ``torch.compile``, whose graph is told
    the layout of its output and of its gradient (the inverse shuffle, the kernel again).

    Its fake kernel (torch 2.14) gives NCHW strides where the real one keeps channels_last, so a
    compiled graph read the real tensors with the wrong strides (aot_eager: a view of them
    failed, in training through the gradient). The views and the copy of a plain reshape state
    the strides too, but inductor's code for that copy was several times slower than the kernel
    on this project's CPU.
    """

    @staticmethod
    def forward(x: Tensor, groups: int) -> Tensor:  # type: ignore[override]
        return F.channel_shuffle(x, groups).contiguous(memory_format=torch.channels_last)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.groups = inputs[1]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        inverse = F.channel_shuffle(grad, grad.shape[1] // ctx.groups)
        return inverse.contiguous(memory_format=torch.channels_last), None


class ChannelShuffle(nn.Module):
    """Module form of :func:`channel_shuffle`.

    Args:
        groups: number of groups the channels are split into.
        channels: optional channel count, checked against ``groups`` when given.
    """

    def __init__(self, groups: int, channels: int | None = None) -> None:
        super().__init__()
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive integer, got {groups!r}")
        if channels is not None and channels % groups:
            raise ValueError(
                f"groups={groups} does not divide channels={channels}; valid groups: "
                f"{_divisors(channels)}"
            )
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(x, self.groups)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class IdentityMixer(nn.Identity):
    """No channel mixing (the ``"none"`` mixer); accepts and ignores the mixer arguments."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
