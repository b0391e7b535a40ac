"""Static-dynamic shuffle (SDS): a lightweight replacement of a pointwise (1x1) convolution.

Gong et al., "Dynamic Shuffle: An Efficient Channel Mixture Method", arXiv 2310.02776.
Square form (C -> C): ``y = cross_shuffle(blockdiag_g(P_g(x) + S_g) x)`` with ``P_g(x)`` the dynamic
Kronecker permutation of group ``g`` and ``S_g = As_g kron Bs_g`` a learnable static matrix.
Rectangular form (C_in -> C_out): ``y = cross_shuffle(blockdiag_g(S_g) P(x) x)`` with rectangular
static factors ``As_g`` (a_out x a_in) and ``Bs_g`` (b_out x b_in).

``static="dense"`` leaves ``S_g`` unstructured (any ``n_out x n_in`` matrix, ``C_out * n_in``
parameters, a grouped 1x1 convolution): more parameters than the Kronecker factors and still a
fraction ``1 / G`` of the dense 1x1 convolution's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_choice, check_flag, check_input, integer
from .dynamic import DynamicShuffle
from .permutation import _divisors, choose_groups, factor_pair
from .shuffle import channel_shuffle

__all__ = ["STATIC_FORMS", "STATIC_INITS", "StaticDynamicShuffle", "sds_groups"]

#: forms of the static matrix ``S_g``: Kronecker factors ``As_g kron Bs_g`` or any matrix
STATIC_FORMS = ("kron", "dense")
#: initializations of ``S_g``: fan-in normal, or that plus the identity (square dense form)
STATIC_INITS = ("normal", "identity")


def sds_groups(in_channels: int, out_channels: int, max_group_size: int = 16) -> int:
    """Smallest ``G`` dividing both channel counts with groups of at most ``max_group_size``.

    Falls back to ``gcd(in_channels, out_channels)`` groups when no ``G`` satisfies the bound.
    """
    g = math.gcd(in_channels, out_channels)
    for d in _divisors(g):
        if max(in_channels, out_channels) // d <= max_group_size:
            return d
    return g


class StaticDynamicShuffle(nn.Module):
    """Static-dynamic shuffle: dynamic permutation plus a learnable static Kronecker matrix.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels (``None``: the square form, ``C_in -> C_in``).
        groups: number of groups ``G``; must divide both channel counts.
        factors: ``(a_in, b_in)`` of the input group size.
        out_factors: ``(a_out, b_out)`` of the output group size (rectangular form).
        dynamic: include the data-dependent permutation (``False`` leaves the static part, a
            grouped 1x1 convolution, followed by the cross-group shuffle).
        max_group_size: bound on the group size when ``groups`` and ``factors`` are omitted.
        static: ``"kron"`` (``S_g = As_g kron Bs_g``, ``G * (a_out a_in + b_out b_in)``
            parameters) or ``"dense"`` (``S_g`` any ``n_out x n_in`` matrix, ``C_out * n_in``
            parameters).
        static_init: ``"normal"`` (the default: ``Var(S) = 1 / n_in``) or ``"identity"`` (that
            plus the identity matrix; the square ``"dense"`` form only). A layer without its
            permutation (``dynamic=False``) so initialized starts where the square SDS starts
            when its permutations are the identity factors, ``(S + I) x``, but its weight decay
            pulls the whole block towards zero rather than towards ``I``: a control that
            separates the SDS's starting point from its reparameterization.
        **dynamic_kwargs: passed to :class:`DynamicShuffle` (``shared``, ``mode``, ``tau``,
            ``reduction``, ``init``, ...).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        groups: int | None = None,
        factors: tuple[int, int] | None = None,
        out_factors: tuple[int, int] | None = None,
        *,
        dynamic: bool = True,
        max_group_size: int = 16,
        static: str = "kron",
        static_init: str = "normal",
        **dynamic_kwargs,
    ) -> None:
        super().__init__()
        if "cross_shuffle" in dynamic_kwargs:
            raise ValueError(
                "StaticDynamicShuffle sets cross_shuffle itself (its permutation is applied "
                f"within the groups of its static part); got cross_shuffle="
                f"{dynamic_kwargs['cross_shuffle']!r}"
            )
        if dynamic_kwargs.get("context_channels") is not None:
            raise ValueError(
                "StaticDynamicShuffle's permutation reads its own input; got context_channels="
                f"{dynamic_kwargs['context_channels']!r}"
            )
        self.static = check_choice(static, STATIC_FORMS, "static form")
        self.static_init = check_choice(static_init, STATIC_INITS, "static initialization")
        out_channels = in_channels if out_channels is None else out_channels
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be a positive integer, got {out_channels!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.square = in_channels == out_channels and out_factors is None
        if self.static_init == "identity" and not (self.square and self.static == "dense"):
            raise ValueError(
                f"static_init='identity' needs the square dense form (out_channels equal to "
                f"in_channels, no out_factors, static='dense'); got in_channels={in_channels}, "
                f"out_channels={out_channels}, out_factors={out_factors!r}, static={static!r}"
            )
        if groups is None and factors is None and not self.square:
            groups = sds_groups(in_channels, out_channels, max_group_size)
        if (
            isinstance(groups, int)
            and groups > 0
            and not self.square
            and (in_channels % groups or out_channels % groups)
        ):
            valid = _divisors(math.gcd(in_channels, out_channels))
            raise ValueError(
                f"groups={groups} does not divide both in_channels={in_channels} and "
                f"out_channels={out_channels}; valid groups: {valid}"
            )
        g, a_in, b_in = choose_groups(in_channels, groups, factors, max_group_size)
        if out_channels % g:
            valid = _divisors(math.gcd(in_channels, out_channels))
            raise ValueError(
                f"groups={g} (from in_channels={in_channels}) does not divide "
                f"out_channels={out_channels}; valid groups: {valid}"
            )
        n_out = out_channels // g
        if out_factors is None:
            out_factors = (a_in, b_in) if n_out == a_in * b_in else factor_pair(n_out)
        if len(out_factors) != 2 or any(integer(f) is None or f < 1 for f in out_factors):
            raise ValueError(f"out_factors must be two positive integers, got {out_factors!r}")
        a_out, b_out = map(integer, out_factors)
        if a_out * b_out != n_out:
            raise ValueError(
                f"out_factors={tuple(out_factors)} multiply to {a_out * b_out}, but "
                f"out_channels={out_channels} with groups={g} need {n_out}"
            )
        self.groups, self.factors, self.out_factors = g, (a_in, b_in), (a_out, b_out)
        self.dynamic = check_flag(dynamic, "dynamic")
        self.permute = (
            DynamicShuffle(in_channels, g, (a_in, b_in), cross_shuffle=False, **dynamic_kwargs)
            if self.dynamic
            else None
        )
        if static == "kron":  # one pair of factors per group: S_g = As_g kron Bs_g
            self.static_a = nn.Parameter(torch.empty(g, a_out, a_in))
            self.static_b = nn.Parameter(torch.empty(g, b_out, b_in))
        else:  # the grouped 1x1 convolution's own weight
            self.static_w = nn.Parameter(torch.empty(out_channels, a_in * b_in, 1, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``Var(S) = 1 / n_in``, the variance of a fan-in initialization (for Kronecker factors
        the product of theirs); ``static_init="identity"`` adds ``I`` to each block."""
        if self.static == "dense":
            nn.init.normal_(self.static_w, 0.0, 1.0 / math.sqrt(self.static_w.shape[1]))
            if self.static_init == "identity":
                n = self.static_w.shape[1]
                with torch.no_grad():  # row j of group g reads input j of that group
                    eye = torch.eye(n, dtype=self.static_w.dtype, device=self.static_w.device)
                    self.static_w.view(self.groups, n, n).add_(eye)
            return
        nn.init.normal_(self.static_a, 0.0, 1.0 / math.sqrt(self.factors[0]))
        nn.init.normal_(self.static_b, 0.0, 1.0 / math.sqrt(self.factors[1]))

    def static_weight(self) -> Tensor:
        """Grouped-convolution weight ``(C_out, n_in, 1, 1)`` holding ``S_g`` (``As_g kron Bs_g``
        for Kronecker factors)."""
        if self.static == "dense":
            return self.static_w
        g, (a_out, a_in), (b_out, b_in) = (
            self.groups,
            self.static_a.shape[1:],
            self.static_b.shape[1:],
        )
        # kron: W[g, i*b_out + j, k*b_in + l] = As[g, i, k] * Bs[g, j, l]
        w = torch.einsum("gik,gjl->gijkl", self.static_a, self.static_b)
        return w.reshape(g * a_out * b_out, a_in * b_in, 1, 1)

    def equivalent_weight(self) -> Tensor:
        """Dense ``(C_out, C_in)`` weight of the static part, cross-group shuffle included."""
        w = self.static_weight().flatten(1)  # (C_out, n_in)
        g, n_out, n_in = self.groups, self.out_channels // self.groups, w.shape[1]
        dense = torch.block_diag(*w.reshape(g, n_out, n_in).unbind(0))  # (C_out, C_in)
        # cross-group shuffle: output m * G + g comes from group g, row m
        return dense.reshape(g, n_out, -1).transpose(0, 1).reshape(self.out_channels, -1)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.in_channels, type(self).__name__)
        weight = self.static_weight().to(x.dtype)
        if self.square:
            y = F.conv2d(x, weight, groups=self.groups)
            if self.permute is not None:
                y = y + self.permute(x)
        else:
            y = F.conv2d(
                self.permute(x) if self.permute is not None else x, weight, groups=self.groups
            )
        return channel_shuffle(y, self.groups)

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """MACs of the static grouped 1x1 convolution (the generator is an ``nn.Linear``)."""
        n, _, h, w = input_shape
        return n * self.out_channels * (self.in_channels // self.groups) * h * w

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, groups={self.groups}, "
            f"factors={self.factors}, out_factors={self.out_factors}, dynamic={self.dynamic}, "
            f"static={self.static!r}"
            + ("" if self.static_init == "normal" else f", static_init={self.static_init!r}")
        )
