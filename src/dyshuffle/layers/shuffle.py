"""The fixed ShuffleNet channel shuffle (Zhang et al. 2018; Ma et al. 2018).

Used by Dynamic Shuffle (Gong et al., arXiv 2310.02776) as its cross-group shuffle and as the
baseline mixer it replaces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .permutation import _divisors, _is_channels_last

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
    if torch.compiler.is_compiling():
        # not PyTorch's kernel: its fake kernel (torch 2.14) gives NCHW strides where the real one
        # keeps channels_last, so a compiled graph read the real output, and in training the
        # gradient (the kernel again), with the wrong strides (aot_eager: a view of it failed).
        # Views and one copy in the input's layout, which the compiler fuses
        n, _, h, w = x.shape
        if _is_channels_last(x):  # (N, H, W, G, C/G) -> (N, H, W, C/G, G), channels innermost
            y = x.permute(0, 2, 3, 1).reshape(n, h, w, groups, c // groups).transpose(3, 4)
            return y.reshape(n, h, w, c).permute(0, 3, 1, 2)
        return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)
    # PyTorch's kernel for (N, G, C/G, H, W) -> (N, C/G, G, H, W) -> (N, C, H, W): it keeps the
    # memory layout (a view-transpose-reshape would turn channels_last into NCHW) and is faster
    return F.channel_shuffle(x, groups)


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
