"""Dynamic shuffle: a data-dependent channel permutation per input.

Gong, Yin, Li, Guo, Xu, "Dynamic Shuffle: An Efficient Channel Mixture Method",
arXiv 2310.02776. The channels are split into ``G`` groups of ``n = a * b``; a small generator
maps the pooled input to two small matrices ``A`` (a x a) and ``B`` (b x b) (shared by all groups,
or one pair per group); softmax, an orthogonal regularizer and binarization make them
permutations; ``A kron B`` permutes each group and a fixed cross-group shuffle moves channels
between groups. Both are composed into one index and applied as one gather.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused as _fused
from . import fused_training as _fused_training
from ._checks import (
    FACTOR_GRADS,
    INITS,
    MODES,
    check_choice,
    check_flag,
    check_input,
    check_positive,
    check_positive_int,
)
from .permutation import (
    ASSIGNMENT_METHODS,
    EXACT_ASSIGNMENT_MAX,
    _apply,
    _as_dtype,
    _exporting,
    _functorch_function,
    _gather_channels,
    _is_channels_last,
    _scatter_channels,
    _traced,
    _transformed,
    assignment_gap,
    choose_groups,
    closest_permutation,
    compose_index,
    factor_index_tables,
    invert_permutation,
    permutation_table,
    permute_channels,
)
from .shuffle import channel_shuffle

__all__ = [
    "DynamicShuffle",
    "LearnedShuffle",
    "balance_term",
    "compact_index",
    "kronecker_apply",
    "orthogonal_loss",
    "orthogonality",
    "permutation_mode",
]

#: largest joint index table (entries) a layer with shared factors keeps (8 MiB of int64; the
#: table of its rows' inverses, for the STE backward, is as large again)
JOINT_TABLE_MAX = 2**20
#: most factor pairs ``Na * Nb`` a layer with shared factors scores jointly (one product); above
#: it scoring each factor on its own is cheaper (on the development CPU, 2 x 4 factors with 48
#: pairs were faster jointly, 4 x 4 with 576 pairs separately)
JOINT_CHOICES_MAX = 256
#: devices on which a layer given the parts of a channel concatenation keeps them apart in eager
#: inference (pools them one by one and writes each to its permuted channels): on the CPU the
#: concatenation's copy costs more than the few small operations this adds; an accelerator pays a
#: launch for every operation, so there (and in training, and in traced or exported graphs) the
#: layer concatenates first. ``dyshuffle.tools.op_count`` empties it to count what a GPU runs.
PARTS_DEVICES = {"cpu"}


def orthogonality(m: Tensor) -> Tensor:
    """``||M M^T - I||_F^2`` for each matrix of a ``(..., a, a)`` batch, shape ``(...)``."""
    eye = torch.eye(m.shape[-1], device=m.device, dtype=m.dtype)
    return (m @ m.transpose(-1, -2) - eye).pow(2).sum(dim=(-2, -1))


@_functorch_function
class _OrthogonalLoss(torch.autograd.Function):
    """``scale * sum ||M M^T - I||_F^2`` over a batch of square matrices ``M``.

    The gradient ``4 * scale * (M M^T - I) M`` is computed directly (``M M^T - I`` is symmetric):
    a handful of operations instead of autograd's chain through the product, power and means.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(m, eye, scale):  # type: ignore[override]
        flat = (m @ m.transpose(-1, -2) - _as_dtype(eye, m.dtype)).reshape(-1)
        return torch.dot(flat, flat) * scale

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.save_for_backward(inputs[0], inputs[1])  # (M M^T - I is made again: M is tiny)
        ctx.scale = inputs[2]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        m, eye = ctx.saved_tensors
        g = m @ m.transpose(-1, -2) - _as_dtype(eye, m.dtype)
        gm = _as_dtype(g, m.dtype) @ m
        return gm * _as_dtype(grad * (4.0 * ctx.scale), gm.dtype), None, None


def _usage(m: Tensor) -> Tensor:
    """How often each entry is its row's largest over the batch: ``(..., a, a)``, no gradient.

    For the near-binary soft factors that the regularizer keeps, the row-wise largest entry is
    the hard permutation's; ``mean_n`` of the one-hot rows is the usage of each column per row.
    """
    hard = F.one_hot(m.detach().argmax(-1), m.shape[-1]).to(m.dtype)
    return hard.mean(0)


@_functorch_function
class _BalanceGradient(torch.autograd.Function):
    """Identity on a batch of soft factors ``M`` ``(N, ...)``; its backward adds the gradient of
    ``weight * balance_term(M)`` (see :func:`balance_term`).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(m, weight):  # type: ignore[override]
        return m.view_as(m)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.save_for_backward(inputs[0])
        ctx.weight = inputs[1]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (m,) = ctx.saved_tensors
        n, a = m.shape[0], m.shape[-1]
        count = m[0].numel() // (a * a)  # matrices per sample
        return grad + _usage(m).unsqueeze(0) * (ctx.weight / (n * a * count)), None


def balance_term(m: Tensor) -> Tensor:
    """The load-balancing term of soft factors ``M`` ``(N, ..., a, a)``, as for mixtures of
    experts (Fedus et al., Switch Transformers): ``mean_k sum_ij f[k, i, j] * P[k, i, j] / a``
    with ``P = mean_n M`` the mean soft matrix and ``f`` the (gradient-free) usage of each entry
    as its row's largest. 1 when every sample makes the same confident choice, ``1 / a`` when the
    choices are spread evenly; its gradient lowers the entries the batch uses most, and vanishes
    through the softmax once the usage is even. See ``balance`` of :class:`DynamicShuffle`.
    """
    a = m.shape[-1]
    return (_usage(m) * m.mean(0)).sum(dim=(-2, -1)).mean() / a


def kronecker_apply(x: Tensor, a_mat: Tensor, b_mat: Tensor, groups: int) -> Tensor:
    """Apply ``blockdiag_g(A_g kron B_g)`` to the channels of ``x`` without building it.

    Each group of ``n = a * b`` channels is viewed as an ``(a, b)`` grid ``X`` and mapped to
    ``A X B^T`` (row-major ``vec``), which equals ``(A kron B) vec(X)``. Cost ``C * (a + b)`` MACs
    per pixel instead of ``C * n``.

    Args:
        x: ``(N, C, H, W)``.
        a_mat: ``(N or 1, G or 1, a_out, a)``.
        b_mat: ``(N or 1, G or 1, b_out, b)``.
        groups: ``G``.

    Returns:
        ``(N, G * a_out * b_out, H, W)``, in the memory format of ``x`` (channels_last or not).
    """
    n, c, h, w = x.shape
    a, b = a_mat.shape[-1], b_mat.shape[-1]
    channels_last = _is_channels_last(x)
    grid = x.reshape(n, groups, a, b, h * w)  # (N, G, a, b, P)
    a_mat = _as_dtype(a_mat, x.dtype).expand(n, groups, -1, -1)
    b_mat = _as_dtype(b_mat, x.dtype).expand(n, groups, -1, -1)
    y = torch.einsum("ngik,ngkjp->ngijp", a_mat, grid)  # rows:    A X
    y = torch.einsum("ngjl,ngilp->ngijp", b_mat, y)  # columns: (A X) B^T
    y = y.reshape(n, groups * a_mat.shape[-2] * b_mat.shape[-2], h, w)
    # the input's layout, as the gather keeps it (the same products on channels_last views of
    # the pixels took 3x as long on the CPU as this copy back)
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y


@_functorch_function
class _SpatialMean(torch.autograd.Function):
    """``x.mean((2, 3))`` whose backward is a broadcast view, not a materialized feature map.

    Autograd's own backward divides the expanded gradient, writing a full ``(N, C, H, W)``
    tensor; here the small ``(N, C)`` gradient is divided first and then expanded (stride 0), so
    adding it to the gather's input gradient is the only full-size pass.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x):  # type: ignore[override]
        return x.mean(dim=(2, 3))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.shape = inputs[0].shape

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        n, c, h, w = ctx.shape
        return (g / (h * w))[:, :, None, None].expand(n, c, h, w)


#: on the CPU, the channels_last contraction of :func:`_factor_gram` forms one ``m x m`` product
#: per pixel only while they hold at most this many entries (``N * H * W * m * m``); above, the
#: products outgrow the caches and one copied product per sample is faster (docs/BENCHMARKS.md,
#: session 28)
PIXEL_GRAM_MAX = 2**22


def _factor_gram(gy: Tensor, y: Tensor, groups: int, m: int, cross: bool, shared: bool) -> Tensor:
    """``H[n, g, u, v] = sum_{pixels} gy[n, slot u of group g] * y[n, slot v of group g]``.

    Slot ``u`` of group ``g`` is channel ``u * G + g`` with the cross-group shuffle and
    ``g * m + u`` without. With shared factors the groups are summed too (``g`` has size 1).
    The contraction is arranged so that both operands are views of the feature maps (no copies)
    in the common cases: NCHW, and channels_last with shared factors (on the CPU, above
    ``PIXEL_GRAM_MAX`` per-pixel products, each sample's slots are copied into one product).

    Returns:
        ``(N, G or 1, m, m)``.
    """
    n, c, h, w = gy.shape
    p = h * w
    channels_last = _is_channels_last(gy)
    same = gy.stride() == y.stride()
    if same and channels_last and shared:
        gr = gy.permute(0, 2, 3, 1).reshape(n * p, c)  # views: (N*P, C) rows of pixels
        yr = y.permute(0, 2, 3, 1).reshape(n * p, c)
        if cross and gy.device.type == "cpu" and n * p * m * m > PIXEL_GRAM_MAX:
            # one (m, P * G) matrix per sample, copied: no (N*P, m, m) products to sum
            gs = gr.view(n, p, m, groups).transpose(1, 2).reshape(n, m, p * groups)
            ys = yr.view(n, p, m, groups).transpose(1, 2).reshape(n, m, p * groups)
            return torch.bmm(gs, ys.transpose(1, 2)).unsqueeze(1)
        if cross:  # channel u * G + g: per pixel an (m, G) matrix
            gram = torch.bmm(gr.view(n * p, m, groups), yr.view(n * p, m, groups).transpose(1, 2))
            return gram.view(n, p, m, m).sum(1).unsqueeze(1)
        # channel g * m + u: (P * G, m) rows per sample
        gram = torch.bmm(gr.view(n, p * groups, m).transpose(1, 2), yr.view(n, p * groups, m))
        return gram.unsqueeze(1)
    if same and gy.is_contiguous():
        if cross:  # (N, m, G * P)
            if shared:
                k = groups * p
                gram = torch.bmm(gy.view(n, m, k), y.view(n, m, k).transpose(1, 2))
                return gram.unsqueeze(1)
        else:  # (N * G, m, P)
            gram = torch.bmm(gy.view(n * groups, m, p), y.view(n * groups, m, p).transpose(1, 2))
            gram = gram.view(n, groups, m, m)
            return gram.sum(1, keepdim=True) if shared else gram

    # any other layout: one einsum on (N, m, G, P) views
    def grid(t: Tensor) -> Tensor:
        if cross:
            return t.unflatten(1, (m, groups)).flatten(3)
        return t.unflatten(1, (groups, m)).flatten(3).transpose(1, 2)

    if shared:
        return torch.einsum("nugp,nvgp->nuv", grid(gy), grid(y)).unsqueeze(1)
    return torch.einsum("nugp,nvgp->nguv", grid(gy), grid(y))


def _factor_gram_channels(
    gy: Tensor, y: Tensor, groups: int, m: int, cross: bool, shared: bool
) -> Tensor:
    """:func:`_factor_gram` from the full ``(N, C, C)`` channel Gram matrix of each sample.

    One batched matrix product over the pixels, ``sum_p gy[n, c, p] * y[n, c', p]``, on views of
    both layouts (no copies), then the ``G`` diagonal ``m x m`` blocks. It does ``G`` times the
    multiplications of the slot-wise contraction, but as one large product (matrix units) instead
    of ``N * H * W`` tiny ones; which is faster depends on the device (``factor_grad`` option).
    """
    n, c, h, w = gy.shape
    if y.dtype != gy.dtype:
        y = y.to(gy.dtype)
    if _is_channels_last(gy):
        gr = gy.permute(0, 2, 3, 1).reshape(n, h * w, c)  # (N, P, C) views
        yr = y.permute(0, 2, 3, 1).reshape(n, h * w, c)
        full = torch.bmm(gr.transpose(1, 2), yr)  # (N, C, C)
    else:
        full = torch.bmm(gy.reshape(n, c, h * w), y.reshape(n, c, h * w).transpose(1, 2))
    if cross:  # channel u * G + g
        blocks = full.view(n, m, groups, m, groups).diagonal(dim1=2, dim2=4)  # (N, m, m, G)
    else:  # channel g * m + u
        blocks = full.view(n, groups, m, groups, m).diagonal(dim1=1, dim2=3)  # (N, m, m, G)
    if shared:
        return blocks.sum(-1).unsqueeze(1)
    return blocks.permute(0, 3, 1, 2)


@_functorch_function
class _KroneckerSTE(torch.autograd.Function):
    """Forward with the hard permutation (one gather), backward through the soft factors.

    With ``Y = A X B^T`` per group and pixel and ``A``, ``B`` at their hard values,
    ``dL/dA[i, k] = sum gY[i, j] Y[alpha^-1[k], j]`` and
    ``dL/dB[j, l] = sum gY[i, j] Y[i, beta^-1[l]]``: the factor gradients need only the output and
    its gradient (both contracted in one small Gram matrix per sample, see :func:`_factor_gram`),
    and the input gradient is the inverse gather.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, a_soft, b_soft, idx, idx_inv, ainv, binv, groups, cross, gram):  # type: ignore[override]
        # b_soft None: a_soft holds both factors (N, Gf, 2, a, a), ainv both inverses (N, Gf, 2, a)
        # idx_inv: the inverse of idx when a table gave it, else None (inverted in the backward)
        return _gather_channels(x, idx, own=True)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        _, a_soft, b_soft, idx, idx_inv, ainv, binv, groups, cross, gram = inputs
        ctx.save_for_backward(output, idx if idx_inv is None else idx_inv, ainv, binv)
        ctx.inverted = idx_inv is not None
        ctx.groups, ctx.cross, ctx.gram = groups, cross, gram
        ctx.shapes = (a_soft.shape, None if b_soft is None else b_soft.shape)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        y, idx, ainv, binv = ctx.saved_tensors
        groups, (a_shape, b_shape) = ctx.groups, ctx.shapes
        gx = ga = gb = None
        if ctx.needs_input_grad[0]:
            gx = _gather_channels(gy, idx if ctx.inverted else invert_permutation(idx))
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            a = a_shape[-1]
            b = a if b_shape is None else b_shape[-1]
            shared = a_shape[1] == 1
            gram = ctx.gram(gy, y, groups, a * b, ctx.cross, shared)  # (N, Gf, ab, ab)
            gram = gram.unflatten(-1, (a, b)).unflatten(-3, (a, b))  # (N, Gf, a, b, a, b)
            s = gram.diagonal(dim1=-3, dim2=-1).sum(-1)  # sum_j H[i, j, k, j]: (N, Gf, a, a)
            t = gram.diagonal(dim1=-4, dim2=-2).sum(-1)  # sum_i H[i, j, i, l]: (N, Gf, b, b)
            if a_shape[0] == 1 and s.shape[0] != 1:  # one permutation for the batch
                s, t = s.sum(0, keepdim=True), t.sum(0, keepdim=True)
            if b_shape is None:  # both factors in one tensor: one gather
                st = torch.stack([s, t], dim=2)  # (N, Gf, 2, a, a)
                ga = st.gather(-1, ainv.unsqueeze(-2).expand_as(st)).reshape(a_shape)
            else:
                ga = s.gather(-1, ainv.unsqueeze(-2).expand_as(s)).reshape(a_shape)
                gb = t.gather(-1, binv.unsqueeze(-2).expand_as(t)).reshape(b_shape)
        return gx, ga, gb, None, None, None, None, None, None, None


def _channels_last(parts: tuple[Tensor, ...]) -> bool:
    """Channels the innermost dimension of every part."""
    return all(p.stride(1) == 1 for p in parts)


def _pooled(x: Tensor, training: bool) -> Tensor:
    """The descriptor ``mean_{H,W}(x)``, ``(N, C)`` (with the light backward in training)."""
    if training and x.requires_grad and torch.is_grad_enabled():
        return _apply(_SpatialMean, x)
    return x.mean(dim=(2, 3))


#: dtypes whose CPU ``mean`` is ``sum`` then a division by the count (bf16 and fp16 are summed in
#: fp32 and rounded once, so their means are left to ``mean``)
_SUM_THEN_DIVIDE = (torch.float32, torch.float64)


def _pooled_parts(parts: tuple[Tensor, ...], training: bool) -> Tensor:
    """The descriptor of the channel concatenation of ``parts``: ``(N, C)`` means over H and W.

    On the CPU, ``mean`` is ``sum`` followed by a division by ``H * W`` (float32 and float64),
    so outside training the parts are summed and their concatenation divided once: the same
    numbers, bit for bit, with one division instead of one per part.
    """
    if len(parts) == 1:
        return _pooled(parts[0], training)
    p0 = parts[0]
    if training or p0.device.type != "cpu" or any(p.dtype not in _SUM_THEN_DIVIDE for p in parts):
        return torch.cat([_pooled(p, training) for p in parts], dim=1)
    sums = torch.cat([p.sum(dim=(2, 3)) for p in parts], dim=1)
    return sums.div_(p0.shape[2] * p0.shape[3])


def _table_argmax(m: Tensor, onehot_t: Tensor) -> Tensor:
    """Row of the table nearest to each matrix: ``argmax_k <m, P_k>`` (the first on ties).

    Args:
        m: ``(..., a, a)`` matrices.
        onehot_t: ``(a * a, K)`` flattened permutation matrices of the ``K`` candidates, as
            columns.

    Returns:
        ``(...)`` LongTensor of candidate rows.
    """
    return (m.detach().flatten(-2) @ _as_dtype(onehot_t, m.dtype)).argmax(dim=-1)  # (..., K)


class Decision(NamedTuple):
    """What a dynamic layer decides for a batch, from one evaluation of its generator (see
    :meth:`DynamicShuffle.decide`)."""

    #: ``(N, C)`` hard permutation of each sample, ``y[n, c] = x[n, permutation[n, c]]``
    permutation: Tensor
    #: ``(N or 1, Gf, a, a)`` softmax factor matrices ``A``
    a: Tensor
    #: ``(N or 1, Gf, b, b)`` softmax factor matrices ``B``
    b: Tensor
    #: ``(N,)`` decision margin of each sample (:meth:`DynamicShuffle.decision_margin`)
    margin: Tensor
    #: ``(N or 1, Gf, a * a + b * b)`` logits of the softmax factors (capped, over ``tau``): row
    #: ``i`` of ``A`` is ``softmax(logits[..., i * a : (i + 1) * a])``, ``B`` follows ``A``
    logits: Tensor


class DynamicShuffle(nn.Module):
    """Dynamic shuffle (Gong et al., arXiv 2310.02776): a per-input channel permutation.

    ``y = cross_shuffle(blockdiag_g(A(x) kron B(x)) x)`` with ``A(x)``, ``B(x)`` permutation
    matrices generated from the pooled input. In ``eval()`` (and in ``"ste"`` training) the
    permutation is exact and applied as a single gather; in ``"soft"`` training the softmax
    matrices are applied as Kronecker products.

    Args:
        channels: number of channels ``C``.
        groups: number of groups ``G`` (chosen from ``max_group_size`` when omitted).
        factors: ``(a, b)`` with ``a * b = C / G`` (the most balanced split when omitted).
        shared: one pair of factors for all groups (``True``) or one pair per group.
        mode: ``"ste"`` (forward with the hard permutation, gradient through the softmax) or
            ``"soft"`` (forward with the softmax matrices) in training. ``"ste"`` keeps the
            output for the factors' gradient, as ``torch.sigmoid`` does: an in-place operation
            on it (``nn.ReLU(inplace=True)`` right after the layer) makes the backward pass
            raise autograd's in-place error. In ``eval()`` nothing keeps it.
        tau: softmax temperature; may be changed during training (annealing).
        reduction: generator hidden width is ``max(C // reduction, min_hidden)``. The default
            32 keeps ShuffleNetV2 1.0x within +4% parameters (CIFAR stem; +2% ImageNet stem),
            against +29% / +16% with the squeeze-excitation-like 4 (docs/ACCURACY.md: trained
            alike, neither width made the permutations input-dependent).
        min_hidden: smallest generator hidden width.
        init: ``"identity"`` (factors start near identity, so the layer starts as the fixed
            cross-group shuffle) or ``"random"`` (default PyTorch initialization).
        assignment: binarization, ``"auto"``, ``"exact"``, ``"greedy"`` or ``"optimal"``
            (see :func:`~dyshuffle.layers.permutation.closest_permutation`). ``"auto"`` and
            ``"optimal"`` score factors of up to 6 x 6 against a table of their permutations;
            a wider factor gets the greedy assignment (``"auto"``: fixed steps, exportable; it
            can miss the nearest permutation of factors far from permutations) or the nearest
            permutation (``"optimal"``: eager only).
        cross_shuffle: compose the fixed cross-group shuffle after the group permutations.
        max_group_size: largest group size when ``groups`` and ``factors`` are omitted.
        factor_grad: how ``"ste"`` training contracts the output and its gradient into the
            factor gradients: ``"pixels"`` (the slot-wise contraction, fewest multiplications:
            one tiny ``m x m`` product per pixel, or one per sample when those would be many on
            the CPU), ``"channels"`` (one ``C x C`` Gram matrix per sample, ``G`` times the
            multiplications as one large product) or ``"auto"`` (``"pixels"`` everywhere until a
            device is measured to prefer the other). The result is the same.
        noise: scale of the Gumbel noise added to the logits in training (straight-through
            Gumbel-softmax: the forward explores permutations other than the most likely one,
            the generator learns which to choose); 0 (the default) adds none. ``eval()`` never
            adds noise, so the deployed permutation is the deterministic one.
        balance: in training, weight of a load-balancing term that asks the generator to spread
            its choices over the permutations (:func:`balance_term` of each factor, averaged over
            the two; added to the gradient of the soft factors, not to the trainer's loss). 0 (the
            default): none. Needs an input-dependent layer (not :class:`LearnedShuffle`).
        descriptor_grad: let the generator's gradient reach the input through the pooled
            descriptor (``True``, the default). ``False`` detaches the descriptor: the input's
            gradient is then the inverse permutation of the output's alone, as for a fixed
            shuffle, while the generator still learns from the factors' gradients (an ablation:
            does a gain come from the permutations or from that extra path into the network?).
        hard_identity: apply the identity factors to every input (the layer is then the fixed
            cross-group shuffle in the forward pass and in ``eval()``), while ``"ste"`` training
            passes the gradient to the softmax factors as if they had been chosen: the generator
            learns, and its gradient reaches the input through the descriptor, but no input is
            ever permuted by its own factors. ``False`` (the default): the nearest permutations.
            An ablation, the converse of ``descriptor_grad=False``: that extra gradient path
            without data-dependent permutations.
        logit_cap: soft cap ``c`` on the generator's logits, ``c * tanh(logits / c)`` before the
            noise and the temperature, so that a softmax row can never put more than
            ``1 / (1 + (n - 1) exp(-2 c / tau))`` on one of its ``n`` entries: the softmax
            cannot saturate on a permutation (or on a degenerate matrix). The ``tanh`` can: on
            the CIFAR proxy the capped logits ended at the bound (docs/ACCURACY.md, session 9).
            ``None`` (the default): no cap.
        descriptor_norm: standardize the pooled descriptor over the batch before the generator
            (a :class:`~torch.nn.BatchNorm1d` without affine parameters: batch statistics in
            training, running ones in ``eval()``, so a sample's permutation does not depend on the
            rest of its batch). The channel means have a large part common to all images,
            which says nothing about the image; standardizing removes it and gives each
            channel's variation across images unit scale. ``False`` (the default): the raw
            means.
        fused: in ``eval()``, apply the hard permutation in one kernel: a Triton kernel on
            CUDA (:mod:`~dyshuffle.layers.fused`: descriptor, generator, softmax, choice and
            gather of each sample in one program, the parts of a concatenation read where they
            are), the same algorithm in C on the CPU (:mod:`~dyshuffle.layers.fused_cpu`, where
            a C compiler is at hand), eagerly or under ``torch.compile`` (not in exported
            graphs), when the layer allows it: shared factors with their joint table,
            channels_last inputs, no autograd, no ``logit_cap``, ``descriptor_norm`` or
            ``hard_identity``. ``False``, or the environment variable ``DYSHUFFLE_FUSED=0``:
            always the PyTorch operators. The
            permutation is the same but for samples whose two best candidates score within
            rounding of each other (the kernel computes the generator in float32).
        fused_training: in ``"ste"`` training, run the step in two Triton kernels
            (:mod:`~dyshuffle.layers.fused_training`: the forward above, which also writes
            what the backward needs, and one backward kernel; the generator's weight
            gradients in four PyTorch operators) instead of about 46 operators, on CUDA
            (and on the CPU under Triton's interpreter), eagerly or under ``torch.compile``
            (two custom operators with their autograd formula; not in exported graphs), when
            the layer allows it: the cases of ``fused`` above, and no
            ``noise``, ``balance`` or ``descriptor_grad=False``. Same forward, and the same
            gradients within float32 rounding. ``False`` (the default) until a GPU benchmark
            shows that it pays; ``DYSHUFFLE_FUSED=0`` switches it off as well.

        context_channels: the generator reads the pooled ``context`` that every call passes
            (``layer(x, context=t)``, ``t`` of shape ``(N, context_channels, H', W')``) instead
            of the layer's input: a descriptor from elsewhere in the network, such as the input
            of the unit whose output the layer permutes (METHOD.md's open choice "the pooled
            input of the unit or its output"; ``ShuffleNetV2(mixer_descriptor="unit_input")``).
            The permutation still applies to ``x``. ``None`` (the default): the layer pools its
            own input. Such a layer takes the PyTorch path (not the fused kernels).

    An input of another floating dtype than the layer's (say bfloat16 features in a float32
    layer, without autocast) is taken on every path: the generator runs in the layer's dtype and
    the output, a permutation of the input's values, keeps the input's dtype and memory format.
    An input whose descriptor holds a NaN gets NaN scores, and every path then chooses the first
    candidates, the identity factors (``torch.argmax`` takes the first NaN).
    """

    def __init__(
        self,
        channels: int,
        groups: int | None = None,
        factors: tuple[int, int] | None = None,
        *,
        shared: bool = True,
        mode: str = "ste",
        tau: float = 1.0,
        reduction: int = 32,
        min_hidden: int = 8,
        init: str = "identity",
        assignment: str = "auto",
        cross_shuffle: bool = True,
        max_group_size: int = 16,
        factor_grad: str = "auto",
        noise: float = 0.0,
        balance: float = 0.0,
        descriptor_grad: bool = True,
        hard_identity: bool = False,
        logit_cap: float | None = None,
        descriptor_norm: bool = False,
        fused: bool = True,
        fused_training: bool = False,
        context_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.groups, self.a, self.b = choose_groups(channels, groups, factors, max_group_size)
        self.shared = check_flag(shared, "shared")
        self.mode = check_choice(mode, MODES, "mode")
        self.tau = float(check_positive(tau, "tau"))
        self.init = check_choice(init, INITS, "init")
        self.assignment = check_choice(assignment, ASSIGNMENT_METHODS, "assignment")
        self.cross_shuffle = check_flag(cross_shuffle, "cross_shuffle")
        self.factor_grad = check_choice(factor_grad, FACTOR_GRADS, "factor_grad")
        if not noise >= 0:
            raise ValueError(f"noise must be a non-negative scale, got {noise!r}")
        self.noise = float(noise)
        if not balance >= 0:
            raise ValueError(f"balance must be a non-negative weight, got {balance!r}")
        self.balance = float(balance)
        self.descriptor_grad = check_flag(descriptor_grad, "descriptor_grad")
        self.hard_identity = check_flag(hard_identity, "hard_identity")
        if logit_cap is not None and not (logit_cap > 0 and math.isfinite(logit_cap)):
            raise ValueError(
                f"logit_cap must be a positive finite number or None, got {logit_cap!r}"
            )
        self.logit_cap = None if logit_cap is None else float(logit_cap)
        self.descriptor_norm = check_flag(descriptor_norm, "descriptor_norm")
        self.fused = check_flag(fused, "fused")
        self.fused_training = check_flag(fused_training, "fused_training")
        self.reduction = check_positive_int(reduction, "reduction")
        if context_channels is not None:
            context_channels = check_positive_int(context_channels, "context_channels")
        self.context_channels = context_channels
        self.hidden = max(channels // self.reduction, check_positive_int(min_hidden, "min_hidden"))
        self.factor_groups = 1 if self.shared else self.groups
        self.num_logits = self.factor_groups * (self.a**2 + self.b**2)
        #: orthogonal regularizer of the last training forward (see :func:`orthogonal_loss`)
        self.last_orthogonal_loss: Tensor | None = None
        #: which matrices ``eval()`` applies: ``"hard"`` (the deployed layer) or ``"soft"``
        self.eval_permutation = "hard"
        # exact binarization: every candidate permutation of each factor, scored in one lookup
        for name, size in (("a", self.a), ("b", self.b)):
            use_table = assignment == "exact" or (
                assignment in ("auto", "optimal") and size <= EXACT_ASSIGNMENT_MAX
            )
            perms, onehot = permutation_table(size) if use_table else (None, None)
            self._keep(f"_perms_{name}", perms)
            self._keep(f"_onehot_{name}", onehot)
            onehot_t = None if onehot is None else onehot.T.contiguous()
            self._keep(f"_onehot_t_{name}", onehot_t)
            inv = None if perms is None else invert_permutation(perms)
            self._keep(f"_inv_{name}", inv)
        self.register_buffer("_eye_a", torch.eye(self.a), persistent=False)
        self.register_buffer("_eye_b", torch.eye(self.b), persistent=False)
        # shared factors: the composed (N, C) index is TA[choice_a] + TB[choice_b]
        tables = None
        if self.shared and self._perms_a is not None and self._perms_b is not None:
            tables = factor_index_tables(
                self._perms_a, self._perms_b, self.groups, self.cross_shuffle
            )
        self._keep("_index_a", None if tables is None else tables[0])
        self._keep("_index_b", None if tables is None else tables[1])
        # ... scored jointly: row k = choice_a * Nb + choice_b of every (A, B) pair, so that one
        # product and one argmax give the row (the pair that maximizes <A, PA> + <B, PB>)
        joint_rows = 0 if tables is None else tables[0].shape[0] * tables[1].shape[0]
        self._nb = 0 if tables is None else tables[1].shape[0]
        score = inv_rows = inv_rows_b = None
        if 0 < joint_rows <= JOINT_CHOICES_MAX:
            ka = torch.arange(joint_rows).div(self._nb, rounding_mode="floor")
            kb = torch.arange(joint_rows) - ka * self._nb
            score = torch.cat([self._onehot_a[ka], self._onehot_b[kb]], dim=1).T.contiguous()
            if self.a == self.b:  # both inverses in one lookup: (rows, 2, a)
                inv_rows = torch.stack([self._inv_a[ka], self._inv_a[kb]], dim=1)
            else:
                inv_rows, inv_rows_b = self._inv_a[ka], self._inv_b[kb]
        #: ``(a*a + b*b, Na * Nb)``: the flattened pair ``(PA, PB)`` of each joint row, as columns
        self._keep("_score_t", score)
        self._keep("_inv_rows", inv_rows)
        self._keep("_inv_rows_b", inv_rows_b)
        # ... and the index of each joint row TA[i] + TB[j] (row i * Nb + j), when it is small
        joint = None
        if tables is not None and joint_rows * tables[0].shape[1] <= JOINT_TABLE_MAX:
            joint = (tables[0][:, None, :] + tables[1][None, :, :]).flatten(0, 1)
        self._keep("_index_ab", joint)
        # ... and the inverse of each row, for the STE backward (one lookup instead of inverting)
        joint_inv = None if joint is None else invert_permutation(joint)
        self._keep("_index_ab_inv", joint_inv)
        #: row of the joint table from separate choices: choice_a * Nb + choice_b
        self.register_buffer("_row_weights", torch.tensor([self._nb, 1]), persistent=False)
        # ... and the fused kernel's scoring tables (shared factors with tables)
        fused_tables = (None, None)
        if tables is not None:
            fused_tables = _fused.score_table(self._onehot_a, self._onehot_b)
        self._keep("_fused_score", fused_tables[0])
        self._keep("_fused_segment", fused_tables[1])
        # ... and those of the fused training step: the column of each logit (numbered apart for
        # A and B), the inverse columns ainv, a + binv of every pair, where each channel sits
        train_tables = (None,) * 4
        if joint is not None:
            a, b = self.a, self.b
            column = torch.cat([torch.arange(a * a) % a, a + torch.arange(b * b) % b])
            rows_ab = torch.arange(joint.shape[0])
            inv_cols = torch.cat(
                [self._inv_a[rows_ab // self._nb], a + self._inv_b[rows_ab % self._nb]], dim=1
            )
            train_tables = (
                column.to(torch.int32),
                inv_cols.to(torch.int32).contiguous(),
                *_fused_training.channel_tables(self.groups, a, b, self.cross_shuffle),
            )
        for name, tensor in zip(("column", "inv_cols", "rows", "moved"), train_tables):
            self._keep(f"_fused_{name}", tensor)
        self._build_logits()
        self.reset_logits()

    def _keep(self, name: str, tensor: Tensor | None) -> None:
        """``tensor`` as a non-persistent buffer, ``None`` as a plain attribute: a root module
        with ``None`` buffers fails ``torch.export`` (torch 2.14's ``_trace`` counts them among
        the graph's inputs), so a layer keeps none."""
        if tensor is None:
            setattr(self, name, None)
        else:
            self.register_buffer(name, tensor, persistent=False)

    def __getstate__(self) -> dict:
        # the regularizer of the last training forward holds its autograd graph: a copy
        # (``copy.deepcopy``, ``AveragedModel``, pickling) starts without it, as a new layer does
        state = super().__getstate__()
        state["last_orthogonal_loss"] = None
        return state

    @property
    def _gram(self):
        """The contraction of the STE backward (``factor_grad``)."""
        return _factor_gram_channels if self.factor_grad == "channels" else _factor_gram

    # -- the generator ---------------------------------------------------------------------
    def _build_logits(self) -> None:
        #: standardizes the descriptor over the batch (``descriptor_norm``), or ``None``
        width = self.descriptor_channels
        self.descriptor_bn = nn.BatchNorm1d(width, affine=False) if self.descriptor_norm else None
        self.generator = nn.Sequential(
            nn.Linear(width, self.hidden),
            nn.ReLU(inplace=True),
            nn.Linear(self.hidden, self.num_logits),
        )

    @property
    def descriptor_channels(self) -> int:
        """Width of the descriptor the generator reads: ``context_channels`` when the layer
        reads a context, else its own channels."""
        return self.channels if self.context_channels is None else self.context_channels

    def _identity_bias(self) -> Tensor:
        eye = [torch.eye(self.a).flatten(), torch.eye(self.b).flatten()]
        return (2.0 * torch.cat(eye)).repeat(self.factor_groups)

    def reset_logits(self) -> None:
        """(Re)initialize the generator's last layer according to ``init``."""
        last = self.generator[-1]
        last.reset_parameters()
        if self.init == "identity":
            with torch.no_grad():
                last.weight.mul_(0.1)
                last.bias.copy_(self._identity_bias())

    def logits(self, x: Tensor, *parts: Tensor, context: Tensor | None = None) -> Tensor:
        """``(N, num_logits)`` logits from the pooled descriptor ``mean_{H,W}(x)``.

        With ``parts``, the input is the channel concatenation of ``x`` and ``parts``, and its
        descriptor the concatenation of theirs (the same means; the additions in another order).
        A layer built with ``context_channels`` pools ``context`` instead (:meth:`forward`).
        """
        if context is not None or self.context_channels is not None:  # (no call otherwise)
            self._check_context(x, context)
        if context is not None:
            x, parts = context, ()
        inputs = (x, *parts) if self.descriptor_grad else tuple(p.detach() for p in (x, *parts))
        pooled = _pooled_parts(inputs, self.training)
        if not torch.is_autocast_enabled(pooled.device.type):
            # an input of another dtype: the generator runs in its own, as in the fused kernels
            pooled = _as_dtype(pooled, self.generator[0].weight.dtype)
        if self.descriptor_bn is not None:
            pooled = self.descriptor_bn(pooled)
        return self.generator(pooled)

    def _logits_of(self, inputs: tuple[Tensor, ...], context: Tensor | None) -> Tensor:
        """:meth:`logits` of the checked inputs (a subclass's :meth:`logits` without a ``context``
        keyword is called as before when there is none)."""
        if context is None:
            return self.logits(*inputs)
        return self.logits(*inputs, context=context)

    def _check_context(self, x: Tensor, context: Tensor | None) -> None:
        """``context`` is what the layer reads: none without ``context_channels``, else a 4-D
        ``(N, context_channels, H', W')`` tensor with the input's ``N``."""
        name = type(self).__name__
        if self.context_channels is None:
            if context is not None:
                raise ValueError(
                    f"{name} was built without context_channels (its generator reads its own "
                    f"input), got a context of shape {tuple(context.shape)}"
                )
            return
        if context is None:
            raise ValueError(
                f"{name} was built with context_channels={self.context_channels}: its generator "
                f"reads the pooled context=..., got none"
            )
        if torch.jit.is_tracing():  # shapes are traced values here; eager calls check them
            return
        if (
            context.dim() != 4
            or context.shape[1] != self.context_channels
            or context.shape[0] != x.shape[0]
        ):
            raise ValueError(
                f"{name} expects a context (N, {self.context_channels}, H, W) with the input's "
                f"N = {x.shape[0]}, got shape {tuple(context.shape)}"
            )

    def _inspected_logits(
        self, x: Tensor, parts: tuple[Tensor, ...], context: Tensor | None = None
    ) -> Tensor:
        """:meth:`logits` of the checked inputs for the inspection methods (:meth:`permutation`,
        :meth:`factor_matrices`, :meth:`decision_margin`, :meth:`decide`), which leave the layer
        as they found it: in training the descriptor normalization (``descriptor_norm``) uses the
        batch's statistics, as :meth:`forward` does, without updating its running statistics."""
        inputs = self._inputs(x, parts)
        bn = getattr(self, "descriptor_bn", None)  # (a subclass's generator may have none)
        if bn is None or not (bn.training and bn.track_running_stats):
            return self._logits_of(inputs, context)
        bn.track_running_stats = False  # BatchNorm: batch statistics, no running update
        try:
            return self._logits_of(inputs, context)
        finally:
            bn.track_running_stats = True

    def factor_matrices(
        self, x: Tensor, *parts: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Softmax factor matrices ``A`` ``(N, Gf, a, a)`` and ``B`` ``(N, Gf, b, b)``.

        ``Gf`` is 1 for shared factors and ``G`` otherwise; the batch dimension is 1 for layers
        whose permutation does not depend on the input. ``parts`` and ``context``: as in
        :meth:`forward`.
        """
        a_mat, b_mat, _ = self._softmax_factors(self._inspected_logits(x, parts, context))
        return a_mat, b_mat

    def _softmax_factors(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``A``, ``B`` and, when ``a == b``, the ``(N, Gf, 2, a, a)`` tensor they are views of."""
        return self._softmax_of(self._softmax_logits(logits))

    def _softmax_of(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """:meth:`_softmax_factors` of logits that :meth:`_softmax_logits` prepared."""
        a, b = self.a, self.b
        if a == b:  # one softmax for both factors
            both = F.softmax(logits.unflatten(-1, (2, a, a)), dim=-1)
            return both[:, :, 0], both[:, :, 1], both
        # split, not two slices: its backward is one concatenation instead of two zero-filled
        # slice gradients and their sum
        la, lb = logits.split([a * a, b * b], dim=-1)
        la, lb = la.unflatten(-1, (a, a)), lb.unflatten(-1, (b, b))
        return F.softmax(la, dim=-1), F.softmax(lb, dim=-1), None

    def _softmax_logits(self, logits: Tensor) -> Tensor:
        """The generator's ``(N, num_logits)`` output as the softmax takes it: ``(N, Gf, a*a +
        b*b)``, capped (``logit_cap``), with noise in training (``noise``), over ``tau``."""
        logits = logits.reshape(logits.shape[0], self.factor_groups, self.a**2 + self.b**2)
        if self.logit_cap is not None:
            logits = self.logit_cap * torch.tanh(logits / self.logit_cap)
        if self.noise and self.training:  # Gumbel(0, 1) samples, scaled
            u = torch.rand_like(logits, dtype=torch.float32).clamp_(min=1e-20)
            logits = logits + self.noise * -torch.log(-torch.log(u)).to(logits.dtype)
        if self.tau != 1.0:
            logits = logits / self.tau
        return logits

    def _choices(self, a_mat: Tensor, b_mat: Tensor, both: Tensor | None = None) -> Tensor | None:
        """Rows of the permutation tables nearest to ``A`` and ``B``: ``(N, Gf, 2)``.

        ``both`` is the ``(N, Gf, 2, a, a)`` tensor of the two factors when ``a == b`` (one
        product scores both). ``None`` when a factor has no table (greedy binarization).
        """
        if self._onehot_t_a is None or self._onehot_t_b is None:
            return None
        if self.a == self.b:
            if both is None:
                both = torch.stack([a_mat, b_mat], dim=2)
            return _table_argmax(both, self._onehot_t_a)
        ia = _table_argmax(a_mat, self._onehot_t_a)
        return torch.stack([ia, _table_argmax(b_mat, self._onehot_t_b)], dim=-1)

    def _hard_factors(self, a_mat: Tensor, b_mat: Tensor) -> tuple[Tensor, Tensor]:
        """Index vectors ``alpha`` ``(N, Gf, a)`` and ``beta`` ``(N, Gf, b)`` of hard factors."""
        choice = self._choices(a_mat, b_mat)
        if choice is not None:
            return self._perms_a[choice[..., 0]], self._perms_b[choice[..., 1]]
        alpha = closest_permutation(a_mat.detach(), self.assignment, self._table("a"))
        beta = closest_permutation(b_mat.detach(), self.assignment, self._table("b"))
        return alpha, beta

    def _row_choice(
        self, a_mat: Tensor, b_mat: Tensor, both: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """The joint table row ``(N,)`` of the hard factors when they have one, and the rows
        ``(N, Gf, 2)`` of each factor's table when they were scored apart (else ``None``)."""
        if self._score_t is not None:  # shared factors, few pairs: scored jointly
            return self._joint_row(a_mat, b_mat, both), None
        choice = self._choices(a_mat, b_mat, both)  # (N, Gf, 2)
        if choice is not None and self._index_ab is not None:
            return (choice.flatten(1) * self._row_weights).sum(-1), choice  # ca * Nb + cb
        return None, choice

    def _inverse_index(self, a_mat: Tensor, b_mat: Tensor, both: Tensor | None) -> Tensor:
        """The inverse of the composed index, ``(N, C)``: one lookup in the joint inverse table
        when there is one (the forward index itself is not needed), else inverted."""
        if self._index_ab_inv is not None:  # (without it, _hard_index makes the choice once)
            row, _ = self._row_choice(a_mat, b_mat, both)
            if row is not None:
                return self._index_ab_inv.index_select(0, row)
        return invert_permutation(self._hard_index(a_mat, b_mat, both)[0])

    def _hard_index(
        self,
        a_mat: Tensor,
        b_mat: Tensor,
        both: Tensor | None = None,
        inverses: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """The composed ``(N, C)`` index, and the inverses of the factors when asked for.

        With ``a == b`` and tables the inverses come as one ``(N, Gf, 2, a)`` tensor (and
        ``None``), matching the ``both`` tensor of :meth:`_softmax_factors`. The last item is the
        inverse of the index when ``inverses`` are asked for and a joint table row gives it,
        else ``None``.
        """
        row, choice = self._row_choice(a_mat, b_mat, both)
        idx_inv = None
        if row is not None and self._index_ab is not None:  # shared factors: one table row
            idx = self._index_ab.index_select(0, row)
            if inverses and self._index_ab_inv is not None:
                idx_inv = self._index_ab_inv.index_select(0, row)
        elif row is not None or (choice is not None and self._index_a is not None):
            # shared factors without the joint table (compact_index): TA[i] + TB[j]
            if choice is None:
                i = row.div(self._nb, rounding_mode="floor")
                j = row - i * self._nb
            else:
                i, j = choice[:, 0, 0], choice[:, 0, 1]
            idx = self._index_a.index_select(0, i) + self._index_b.index_select(0, j)
        else:
            if choice is not None:
                alpha, beta = self._perms_a[choice[..., 0]], self._perms_b[choice[..., 1]]
            else:
                alpha, beta = self._hard_factors(a_mat, b_mat)
            idx = compose_index(alpha, beta, self.groups, self.cross_shuffle)
        if not inverses:
            return idx, None, None, idx_inv
        if choice is None and row is not None:  # from the joint row: (N, 1, ...)
            ainv = self._inv_rows.index_select(0, row).unsqueeze(1)
            if self._inv_rows_b is None:  # (N, 1, 2, a)
                return idx, ainv, None, idx_inv
            return idx, ainv, self._inv_rows_b.index_select(0, row).unsqueeze(1), idx_inv
        if choice is not None and self.a == self.b:  # both inverses at once: (N, Gf, 2, a)
            return idx, self._inv_a[choice], None, idx_inv
        if choice is not None:  # (N, Gf, a) and (N, Gf, b)
            return idx, self._inv_a[choice[..., 0]], self._inv_b[choice[..., 1]], idx_inv
        return idx, invert_permutation(alpha), invert_permutation(beta), None

    def _joint_row(self, a_mat: Tensor, b_mat: Tensor, both: Tensor | None) -> Tensor:
        """Row ``choice_a * Nb + choice_b`` of the pair of permutations nearest to ``(A, B)``.

        ``argmax_k <(A, B), (PA_k, PB_k)>`` over the ``Na * Nb`` pairs is the pair of the
        factors' own nearest permutations (the score is a sum of the two): one product and one
        argmax, ``(N,)``.
        """
        if both is not None:  # (N, 1, 2, a, a) -> (N, 2 a a)
            flat = both.detach().flatten(1)
        else:
            flat = torch.cat([a_mat.detach().flatten(1), b_mat.detach().flatten(1)], dim=1)
        return (flat @ _as_dtype(self._score_t, flat.dtype)).argmax(dim=-1)

    def _table(self, name: str) -> tuple[Tensor, Tensor] | None:
        perms = getattr(self, f"_perms_{name}")
        return None if perms is None else (perms, getattr(self, f"_onehot_{name}"))

    @torch.no_grad()
    def permutation(self, x: Tensor, *parts: Tensor, context: Tensor | None = None) -> Tensor:
        """The hard permutation of each sample: ``(N, C)``, ``y[n, c] = x[n, idx[n, c]]``.

        This is the permutation that ``eval()`` applies (and ``"ste"`` training's forward).
        ``parts`` and ``context``: as in :meth:`forward`.
        """
        a_mat, b_mat, both = self._softmax_factors(self._inspected_logits(x, parts, context))
        return self._hard_index(*self._chosen(a_mat, b_mat, both))[0].expand(x.shape[0], -1)

    @torch.no_grad()
    def decision_margin(self, x: Tensor, *parts: Tensor, context: Tensor | None = None) -> Tensor:
        """How firmly the hard permutation of each sample is chosen: ``(N,)``, at most 2.

        For each factor matrix ``M`` of a sample (``A`` and ``B`` of every factor group), the gap
        ``<M, P_1> - <M, P_2>`` between the scores of its nearest permutation ``P_1`` (the one the
        hard forward applies) and of the next nearest ``P_2``; the margin is the smallest gap
        over the sample's factors, i.e. how much the soft factors must change before the hard
        permutation does. For row-stochastic (softmax) factors it lies in ``[0, 2]``: 2 when
        every factor is a permutation matrix, 0 on a tie. Factors of size 1 have one permutation
        and no gap (``inf`` when all factors are of size 1). A factor binarized greedily (larger
        than ``EXACT_ASSIGNMENT_MAX`` with ``assignment="auto"``, or ``"greedy"``) has the gap of
        the permutation the greedy choice applies (:func:`assignment_gap`), negative when that
        is not the nearest permutation (never with ``assignment="optimal"``, which applies the
        nearest one). With ``hard_identity`` the margin is that of the softmax factors, not of
        the identities the layer applies.
        ``parts`` and ``context``: as in :meth:`forward`.
        """
        a_mat, b_mat, _ = self._softmax_factors(self._inspected_logits(x, parts, context))
        return self._margin(a_mat, b_mat, x.shape[0])

    @torch.no_grad()
    def decide(self, x: Tensor, *parts: Tensor, context: Tensor | None = None) -> Decision:
        """The hard permutation, the softmax factors, the decision margin and the logits of each
        sample, from one evaluation of the generator: what :meth:`permutation`,
        :meth:`factor_matrices` and :meth:`decision_margin` give one by one (for an inspection
        of what the layer chooses).
        ``parts`` and ``context``: as in :meth:`forward`."""
        logits = self._softmax_logits(self._inspected_logits(x, parts, context))
        a_mat, b_mat, both = self._softmax_of(logits)
        hard = None
        tableless = self._onehot_t_a is None or self._onehot_t_b is None
        if tableless and not self.hard_identity:
            # a factor without a table: binarized once, for the index and the margin
            hard = self._hard_factors(a_mat, b_mat)
            idx = compose_index(*hard, self.groups, self.cross_shuffle)
        else:
            idx = self._hard_index(*self._chosen(a_mat, b_mat, both))[0]
        margin = self._margin(a_mat, b_mat, x.shape[0], hard)
        return Decision(idx.expand(x.shape[0], -1), a_mat, b_mat, margin, logits)

    def _margin(
        self, a_mat: Tensor, b_mat: Tensor, n: int, hard: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """:meth:`decision_margin` of ``n`` samples from their softmax factors; ``hard``: the
        index vectors of their hard factors when already known (:meth:`_hard_factors`)."""
        gaps = []
        pairs = ((a_mat, self._onehot_t_a), (b_mat, self._onehot_t_b))
        for k, (m, table) in enumerate(pairs):
            if m.shape[-1] == 1:
                continue
            if table is None:  # greedy or optimal: the gap of the permutation applied, exactly
                alpha = closest_permutation(m, self.assignment) if hard is None else hard[k]
                gaps.append(assignment_gap(m.float(), alpha).float().amin(dim=-1))
                continue
            top = (m.float().flatten(-2) @ table.float()).topk(2, dim=-1).values  # (N, Gf, 2)
            gaps.append((top[..., 0] - top[..., 1]).amin(dim=-1))
        if not gaps:
            return torch.full((n,), float("inf"), device=a_mat.device)
        return torch.stack(gaps).amin(dim=0).expand(n)

    def _chosen(
        self, a_mat: Tensor, b_mat: Tensor, both: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The matrices the hard permutation is chosen from: the factors, or identity matrices
        of their shapes with ``hard_identity``."""
        if not self.hard_identity:
            return a_mat, b_mat, both
        a_eye = self._eye_a.to(a_mat.dtype).expand(a_mat.shape)
        b_eye = self._eye_b.to(b_mat.dtype).expand(b_mat.shape)
        return a_eye, b_eye, None if both is None else torch.stack([a_eye, b_eye], dim=2)

    #: :func:`mix_concat` may pass the parts of a channel concatenation as separate inputs
    accepts_parts = True

    def _inputs(self, x: Tensor, parts: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The checked inputs: the parts kept apart (``PARTS_DEVICES``), or their concatenation."""
        inputs = (x, *parts)
        self._check_parts(inputs)
        if not parts:
            return inputs
        keep = x.device.type in PARTS_DEVICES and not self.training and not _traced()
        return inputs if keep else (torch.cat(inputs, dim=1),)

    def _check_parts(self, parts: tuple[Tensor, ...]) -> None:
        name = type(self).__name__
        if len(parts) == 1:
            check_input(parts[0], self.channels, name)
            return
        if torch.jit.is_tracing():  # shapes are traced values here; eager calls check them
            return
        for p in parts:
            if p.dim() != 4 or p.shape[0] != parts[0].shape[0] or p.shape[2:] != parts[0].shape[2:]:
                raise ValueError(
                    f"{name} expects parts (N, C_i, H, W) with the same N, H and W, got shapes "
                    f"{[tuple(q.shape) for q in parts]}"
                )
        total = sum(p.shape[1] for p in parts)
        if total != self.channels:
            raise ValueError(
                f"{name} was built for {self.channels} channels, got parts with {total} "
                f"(shapes {[tuple(q.shape) for q in parts]})"
            )

    def forward(self, x: Tensor, *parts: Tensor, context: Tensor | None = None) -> Tensor:
        """Permute the channels of ``x``, or of the channel concatenation of ``x`` and ``parts``.

        ``layer(x1, x2)`` is ``layer(torch.cat((x1, x2), 1))``. In eager inference on the CPU
        (``PARTS_DEVICES``) the parts stay apart: the descriptor is pooled part by part (the same
        means, added in another order) and, for hard permutations of channels_last parts, each
        part is written once to its permuted channels, without the concatenation's copy
        (:func:`mix_concat`). Elsewhere the layer concatenates first. Where the fused kernel
        applies (``fused``, :meth:`_fusable`), it does all of that in one call.

        A layer built with ``context_channels`` takes the tensor its generator reads as
        ``context`` (``(N, context_channels, H', W')``, e.g. the input of the network unit the layer
        ends) and pools it instead of its input, on the PyTorch path.
        """
        if context is not None and self.context_channels is None:
            self._check_context(x, context)  # raises (the fused paths would not read it)
        if self._fusable(x, parts):
            return self._fused_forward((x, *parts))
        if self._fusable_training(x, parts):
            return self._fused_training_forward((x, *parts))
        inputs = self._inputs(x, parts)
        grad = torch.is_grad_enabled()
        a_mat, b_mat, both = self._softmax_factors(self._logits_of(inputs, context))
        if len(inputs) > 1 and self._scatters(inputs, grad):
            # parts kept apart (eager CPU inference) go straight to their permuted channels
            return _scatter_channels(inputs, self._inverse_index(*self._chosen(a_mat, b_mat, both)))
        if self.balance and self.training and grad and a_mat.requires_grad:
            if both is not None:  # one tensor for both factors: the mean over the two is half
                both = _apply(_BalanceGradient, both, self.balance)
                a_mat, b_mat = both[:, :, 0], both[:, :, 1]
            else:
                a_mat = _apply(_BalanceGradient, a_mat, 0.5 * self.balance)
                b_mat = _apply(_BalanceGradient, b_mat, 0.5 * self.balance)
        if self.training and grad:
            # mean over samples and groups, summed over the two factors
            scale = 1.0 / max(a_mat.shape[0] * a_mat.shape[1], 1)  # (an empty batch: 0)
            if both is not None:
                self.last_orthogonal_loss = _apply(_OrthogonalLoss, both, self._eye_a, scale)
            else:
                self.last_orthogonal_loss = _apply(
                    _OrthogonalLoss, a_mat, self._eye_a, scale
                ) + _apply(_OrthogonalLoss, b_mat, self._eye_b, scale)
        soft = self.mode == "soft" if self.training else self.eval_permutation == "soft"
        ste = self.training and grad and a_mat.requires_grad  # (training concatenates first)
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)
        if soft:
            y = kronecker_apply(x, a_mat, b_mat, self.groups)
            return channel_shuffle(y, self.groups) if self.cross_shuffle else y
        idx, ainv, binv, idx_inv = self._hard_index(*self._chosen(a_mat, b_mat, both), inverses=ste)
        if ste:
            fa, fb = (both, None) if binv is None else (a_mat, b_mat)
            return _apply(
                _KroneckerSTE,
                x,
                fa,
                fb,
                idx,
                idx_inv,
                ainv,
                binv,
                self.groups,
                self.cross_shuffle,
                self._gram,
            )
        if grad and x.requires_grad:
            return permute_channels(x, idx)
        return _gather_channels(x, idx)

    #: :meth:`logits` is the generator of the pooled input that the fused kernel computes (a
    #: class flag: on torch 2.11, ``torch.compile`` took the PyTorch path with the previous
    #: ``type(self).logits is DynamicShuffle.logits`` test, which its Dynamo may not resolve).
    #: A subclass that defines its own :meth:`logits` or :meth:`_build_logits` gets ``False``
    #: (:meth:`__init_subclass__`) unless it sets the flag itself.
    _fused_generator = True

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "_fused_generator" not in own and ("logits" in own or "_build_logits" in own):
            cls._fused_generator = False

    def _fusable(self, x: Tensor, parts: tuple[Tensor, ...]) -> bool:
        """The hard permutation of this call can be the fused kernel's (``fused``).

        (Checked on every eager call, so cheap checks first: on a GPU the host time of a layer
        is what the CIFAR models pay, see ``dyshuffle.tools.host_time``.)"""
        if not self.fused or self.training or self._index_ab is None:  # (then _fused_score too)
            return False
        if self.eval_permutation != "hard" or not self._fused_variant():
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in parts)):
            return False
        return _fused.available(x.device) and self._fused_inputs(x, parts)

    def _fused_variant(self) -> bool:
        """The layer's options are those the fused kernels compute: the generator of the pooled
        input, the nearest permutations, no cap or standardization of the logits."""
        return (
            self._fused_generator
            and self.context_channels is None
            and not self.hard_identity
            and self.descriptor_bn is None
            and self.logit_cap is None
        )

    def _fused_inputs(self, x: Tensor, parts: tuple[Tensor, ...]) -> bool:
        """``x`` and ``parts`` are what the fused kernels take: one or two channels_last 4-D
        parts of one dtype of theirs that concatenate to the layer's channels, outside exported
        graphs and ``torch.func`` transforms. Anything else takes the PyTorch path, whose checks
        name what is wrong."""
        if len(parts) > 1 or x.dim() != 4 or x.stride(1) != 1:
            return False
        if x.dtype not in _fused.FUSED_DTYPES or self.channels > _fused.FUSED_MAX_CHANNELS:
            return False
        channels = x.shape[1]
        if parts:
            p = parts[0]
            if p.dim() != 4 or p.stride(1) != 1 or p.dtype != x.dtype:
                return False
            if p.shape[0] != x.shape[0] or p.shape[2:] != x.shape[2:]:
                return False
            channels += p.shape[1]
        return channels == self.channels and not (_exporting() or _transformed())

    def _generator_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The weights and biases of the generator's two linear layers (without the indexing of
        ``nn.Sequential``, which costs more host time than the rest of a fused call's setup)."""
        layers = self.generator._modules
        first, last = layers["0"], layers["2"]
        return first.weight, first.bias, last.weight, last.bias

    def _fusable_training(self, x: Tensor, parts: tuple[Tensor, ...]) -> bool:
        """This training call can be the fused training step's (``fused_training``)."""
        if not (self.fused_training and self.training and self.mode == "ste"):
            return False
        if not torch.is_grad_enabled() or self._index_ab_inv is None or self._fused_moved is None:
            return False
        if self.noise or self.balance or not self.descriptor_grad or not self._fused_variant():
            return False
        if not _fused_training.available(x.device):
            return False
        # (maps without pixels take the PyTorch path: their descriptor is not a number)
        return self._fused_inputs(x, parts) and x.shape[2] * x.shape[3] > 0

    def _fused_training_tables(self) -> tuple:
        """The layer's constants of the fused training step (``tables`` of
        :func:`~dyshuffle.layers.fused_training.ste_shuffle`)."""
        return (
            _fused.float32(self._fused_score),
            self._fused_segment,
            self._fused_column,
            self._index_ab,
            self._index_ab_inv,
            self._fused_inv_cols,
            self._fused_rows,
            self._fused_moved,
            self._perms_a.shape[0],
        )

    def _fused_training_forward(self, inputs: tuple[Tensor, ...]) -> Tensor:
        """:meth:`forward` of :meth:`_fusable_training` inputs: two kernels."""
        # the regularizer's mean over the samples (one factor group), as in forward()
        scale = 1.0 / max(inputs[0].shape[0], 1)
        y, self.last_orthogonal_loss = _fused_training.ste_shuffle(
            inputs, *self._generator_weights(), self._fused_training_tables(), self.tau, scale
        )
        return y

    def _fused_forward(self, inputs: tuple[Tensor, ...]) -> Tensor:
        """:meth:`forward` of :meth:`_fusable` inputs, in one kernel."""
        w1, b1, w2, b2 = self._generator_weights()
        return _fused.launch(
            inputs[0],
            inputs[1] if len(inputs) == 2 else None,
            _fused.float32(w1),
            _fused.float32(b1),
            _fused.float32(w2),
            _fused.float32(b2),
            _fused.float32(self._fused_score),  # (a float buffer: ``.half()`` converts it)
            self._fused_segment,
            self._index_ab,
            self._perms_a.shape[0],
            self.tau,
        )

    def _scatters(self, inputs: tuple[Tensor, ...], grad: bool) -> bool:
        """Parts kept apart (:meth:`_inputs`) are written to their permuted channels one by one:
        hard permutations, no autograd, channels_last parts."""
        if self.eval_permutation == "soft" or (grad and any(p.requires_grad for p in inputs)):
            return False
        return _channels_last(inputs)

    def extra_macs(self, input_shape: tuple[int, ...]) -> int:
        """MACs of this layer's work outside ``nn.Linear``/``nn.Conv2d`` modules, per batch.

        The hard gather is a copy (0 MACs); soft application costs ``C * (a + b)`` per pixel.
        """
        n, _, h, w = input_shape
        soft = self.mode == "soft" if self.training else self.eval_permutation == "soft"
        return n * self.channels * (self.a + self.b) * h * w if soft else 0

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, groups={self.groups}, factors=({self.a}, {self.b}), "
            f"shared={self.shared}, mode={self.mode!r}, tau={self.tau:g}, hidden={self.hidden}, "
            f"init={self.init!r}, cross_shuffle={self.cross_shuffle}"
            + (f", noise={self.noise:g}" if self.noise else "")
            + (f", balance={self.balance:g}" if self.balance else "")
            + ("" if self.descriptor_grad else ", descriptor_grad=False")
            + (", hard_identity=True" if self.hard_identity else "")
            + (f", logit_cap={self.logit_cap:g}" if self.logit_cap is not None else "")
            + (", descriptor_norm=True" if self.descriptor_norm else "")
            + (
                f", context_channels={self.context_channels}"
                if self.context_channels is not None
                else ""
            )
        )


class LearnedShuffle(DynamicShuffle):
    """A learned static permutation: a :class:`DynamicShuffle` whose logits ignore the input.

    The control that isolates data dependence: the same relaxation, regularizer and
    binarization, one permutation for every input. Takes the arguments of
    :class:`DynamicShuffle` (``reduction`` and ``min_hidden`` are unused).
    """

    _fused_generator = False  # one learned logit vector, no generator of the input

    def _build_logits(self) -> None:
        if self.descriptor_norm:
            raise ValueError(
                f"descriptor_norm={self.descriptor_norm!r} normalizes a descriptor that "
                f"{type(self).__name__} does not use; use DynamicShuffle or descriptor_norm=False"
            )
        if self.balance:
            raise ValueError(
                f"balance={self.balance!r} asks for input-dependent choices, which "
                f"{type(self).__name__} cannot make; use DynamicShuffle or balance=0"
            )
        if self.context_channels is not None:
            raise ValueError(
                f"context_channels={self.context_channels!r} names a descriptor that "
                f"{type(self).__name__} does not read; use DynamicShuffle or context_channels=None"
            )
        self.logit_param = nn.Parameter(torch.zeros(1, self.num_logits))

    def reset_logits(self) -> None:
        with torch.no_grad():
            if self.init == "identity":
                self.logit_param.copy_(self._identity_bias().unsqueeze(0))
            else:
                self.logit_param.normal_(0.0, 1.0)

    def logits(self, x: Tensor, *parts: Tensor, context: Tensor | None = None) -> Tensor:
        return _as_dtype(self.logit_param, x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, groups={self.groups}, factors=({self.a}, {self.b}), "
            f"shared={self.shared}, mode={self.mode!r}, tau={self.tau:g}, init={self.init!r}"
            + (f", noise={self.noise:g}" if self.noise else "")
            + (f", balance={self.balance:g}" if self.balance else "")
            + (f", logit_cap={self.logit_cap:g}" if self.logit_cap is not None else "")
        )


def orthogonal_loss(model: nn.Module) -> Tensor:
    """Mean orthogonal regularizer of every dynamic layer of ``model`` at its last training forward.

    ``R = ||A A^T - I||^2 + ||B B^T - I||^2`` averaged over the batch, the groups and the layers;
    add ``lambda * orthogonal_loss(model)`` to the task loss. Zero when the model has none.
    """
    losses = [
        m.last_orthogonal_loss
        for m in model.modules()
        if isinstance(m, DynamicShuffle) and m.last_orthogonal_loss is not None
    ]
    if losses:
        return torch.stack(losses).mean()
    param = next(model.parameters(), None)
    return torch.zeros((), device=None if param is None else param.device)


@contextlib.contextmanager
def _set_on_layers(model: nn.Module, name: str, value: object) -> Iterator[nn.Module]:
    """Temporarily set attribute ``name`` of every dynamic layer of ``model`` to ``value``."""
    layers = [m for m in model.modules() if isinstance(m, DynamicShuffle)]
    before = [getattr(m, name) for m in layers]
    for m in layers:
        setattr(m, name, value)
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            setattr(m, name, b)


#: what :func:`permutation_mode` can make the dynamic layers apply in evaluation
PERMUTATION_MODES = ("hard", "soft", "identity")


@contextlib.contextmanager
def permutation_mode(model: nn.Module, which: str) -> Iterator[nn.Module]:
    """Temporarily make every dynamic layer of ``model`` apply ``which`` in eval.

    ``"hard"``: the chosen permutations (the deployed layer); ``"soft"``: the softmax factor
    matrices (the binarization gap); ``"identity"``: the identity factors for every input, as
    ``hard_identity`` does, i.e. each layer's fixed cross-group shuffle whatever its generator
    gives. A trained model evaluated so shows what its choices are worth: the same accuracy as
    ``"hard"`` when every layer chose the identity factors for every input, another when the network
    relies on the permutations it chose.

    >>> with permutation_mode(model, "soft"):
    ...     soft_logits = model.eval()(x)
    """
    check_choice(which, PERMUTATION_MODES, "permutation")
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            _set_on_layers(model, "eval_permutation", "soft" if which == "soft" else "hard")
        )
        if which == "identity":
            stack.enter_context(_set_on_layers(model, "hard_identity", True))
        yield model


@contextlib.contextmanager
def compact_index(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily drop the joint index tables of every dynamic layer of ``model``.

    With shared factors a layer keeps a joint table ``TA[i] + TB[j]`` (one lookup per call; up to
    ``Na * Nb`` rows of ``C`` indices, 2 MiB for 464 channels of 4 x 4 factors). Without it the
    layer looks up ``TA`` and ``TB`` and adds them: the same index, one operation more, tables
    ``Na + Nb`` rows long (in STE training the backward inverts the index instead of looking up
    the joint inverse table). Exporting inside this context keeps files near the size of the
    weights.
    """
    layers = [m for m in model.modules() if isinstance(m, DynamicShuffle)]
    saved = [dict(m._buffers) for m in layers]
    names = ("_index_ab", "_index_ab_inv")
    try:
        for m in layers:  # out of the buffers, plain None attributes (see DynamicShuffle._keep)
            for name in names:
                m._buffers.pop(name, None)
                m.__dict__[name] = None
        yield model
    finally:
        for m, buffers in zip(layers, saved):
            for name in names:
                if name in buffers:
                    del m.__dict__[name]
            m._buffers.clear()
            m._buffers.update(buffers)
