"""Permutation helpers shared by the channel mixers.

A permutation of ``C`` channels is stored as an index vector ``idx`` with
``y[:, c] = x[:, idx[c]]`` (the convention of ``torch.gather``). Batched permutations are
``(N, C)`` LongTensors, one row per sample.

Reference: Gong et al., "Dynamic Shuffle: An Efficient Channel Mixture Method",
arXiv 2310.02776.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import cache

import torch
from torch import Tensor

from ._checks import check_positive_int, integer

__all__ = [
    "ASSIGNMENT_METHODS",
    "EXACT_ASSIGNMENT_MAX",
    "all_permutations",
    "assignment_gap",
    "choose_groups",
    "closest_permutation",
    "compose_index",
    "factor_index_tables",
    "factor_pair",
    "invert_permutation",
    "optimal_assignment",
    "permutation_matrix",
    "permutation_table",
    "permute_channels",
    "searches",
]

#: Largest factor size for which binarization enumerates every permutation (6! = 720).
EXACT_ASSIGNMENT_MAX = 6

#: The binarizations of :func:`closest_permutation`.
ASSIGNMENT_METHODS = ("auto", "exact", "greedy", "optimal")


def searches(method: str, a: int) -> bool:
    """Whether binarizing ``a x a`` factors with ``method`` takes a number of steps that depends
    on the data (``"optimal"`` above ``EXACT_ASSIGNMENT_MAX``: cycle cancelling), which no
    traced, exported or vmapped graph can hold."""
    return method == "optimal" and a > EXACT_ASSIGNMENT_MAX


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def factor_pair(n: int) -> tuple[int, int]:
    """Split ``n`` into ``(a, b)``, ``a * b == n``, ``a <= b`` with ``a`` as large as possible."""
    if n < 1:
        raise ValueError(f"group size must be a positive integer, got {n}")
    a = max(d for d in _divisors(n) if d * d <= n)
    return a, n // a


def choose_groups(
    channels: int,
    groups: int | None = None,
    factors: tuple[int, int] | None = None,
    max_group_size: int = 16,
) -> tuple[int, int, int]:
    """Choose ``(G, a, b)`` for ``channels`` channels: ``G`` groups of ``n = a * b`` channels.

    With nothing given, ``n`` is the largest divisor of ``channels`` not above ``max_group_size``
    and ``(a, b)`` its most balanced factorization (116 -> 29 groups of 2 x 2, 464 -> 29 of 4 x 4).

    Args:
        channels: number of channels ``C``.
        groups: number of groups ``G``; must divide ``channels``.
        factors: ``(a, b)`` with ``a * b == channels // groups``.
        max_group_size: largest group size considered when ``groups`` and ``factors`` are not given.

    Returns:
        ``(G, a, b)``.

    Raises:
        ValueError: naming the bad value and the valid choices.
    """
    channels = check_positive_int(channels, "channels")
    if groups is not None:
        if integer(groups) is None or groups < 1 or channels % groups:
            raise ValueError(
                f"groups={groups!r} does not divide channels={channels}; "
                f"valid groups: {_divisors(channels)}"
            )
        groups = integer(groups)
    if factors is not None:
        if len(factors) != 2 or any(integer(f) is None or f < 1 for f in factors):
            raise ValueError(f"factors must be two positive integers (a, b), got {factors!r}")
        factors = (integer(factors[0]), integer(factors[1]))
        n = factors[0] * factors[1]
        if channels % n:
            raise ValueError(
                f"factors={tuple(factors)} give a group size of {n}, which does not divide "
                f"channels={channels}; valid group sizes: {_divisors(channels)}"
            )
        if groups is not None and groups * n != channels:
            n_valid = channels // groups
            pairs = [(d, n_valid // d) for d in _divisors(n_valid)]
            raise ValueError(
                f"factors={tuple(factors)} multiply to {n}, but channels={channels} with "
                f"groups={groups} need a group size of {n_valid}; valid factors: {pairs}"
            )
        return channels // n, factors[0], factors[1]
    if groups is not None:
        a, b = factor_pair(channels // groups)
        return groups, a, b
    if max_group_size < 1:
        raise ValueError(f"max_group_size must be a positive integer, got {max_group_size}")
    n = max(d for d in _divisors(channels) if d <= max_group_size)
    a, b = factor_pair(n)
    return channels // n, a, b


@cache
def _permutation_table(n: int) -> tuple[Tensor, Tensor]:
    perms = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long).reshape(-1, n)
    onehot = torch.zeros(perms.shape[0], n, n)
    onehot.scatter_(2, perms.unsqueeze(-1), 1.0)
    return perms, onehot.reshape(perms.shape[0], n * n)


def permutation_table(n: int) -> tuple[Tensor, Tensor]:
    """``(perms, onehot)``: the ``(n!, n)`` permutations and their ``(n!, n * n)`` flat matrices."""
    perms, onehot = _permutation_table(n)
    return perms.clone(), onehot.clone()


def all_permutations(n: int) -> Tensor:
    """All ``n!`` permutations of ``range(n)`` as a ``(n!, n)`` LongTensor, lexicographic order."""
    return _permutation_table(n)[0].clone()


def closest_permutation(
    m: Tensor, method: str = "auto", table: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """Binarize square matrices to the nearest permutation (a valid assignment).

    Returns ``alpha`` of shape ``m.shape[:-1]`` such that the permutation matrix ``P`` with
    ``P[i, alpha[i]] = 1`` maximizes ``<m, P>`` (equivalently minimizes ``||m - P||_F``).
    Every column is used exactly once, also when two rows peak at the same column.

    Args:
        m: ``(..., a, a)`` real matrices.
        method: ``"exact"`` scores all ``a!`` permutations with one matrix product (optimal);
            ``"greedy"`` takes the largest remaining entry ``a`` times (vectorized over the batch);
            ``"auto"`` is exact up to ``a = 6`` and greedy above; ``"optimal"`` is exact up to
            ``a = 6`` and above it improves the greedy choice along exchange cycles until none
            gains (:func:`optimal_assignment`: optimal at any size, a number of steps that
            depends on the data, so eager only).
        table: optional ``(perms, onehot)`` from :func:`permutation_table` already on the device
            of ``m`` (layers keep it as a buffer so no copy happens per call).
    """
    if m.dim() < 2 or m.shape[-1] != m.shape[-2]:
        raise ValueError(
            f"closest_permutation needs square matrices (..., a, a), got {tuple(m.shape)}"
        )
    if method not in ASSIGNMENT_METHODS:
        raise ValueError(
            f"unknown assignment method {method!r}; valid: "
            + ", ".join(repr(v) for v in ASSIGNMENT_METHODS)
        )
    a = m.shape[-1]
    optimal = searches(method, a)
    if optimal and (_exporting() or torch._C._functorch.is_batchedtensor(m)):
        raise ValueError(
            f"assignment 'optimal' of {a} x {a} factors takes a number of steps that depends on "
            "the data and cannot be traced, exported or vmapped; set the layer's assignment to "
            "'greedy' (or 'auto') there"
        )
    if method in ("auto", "optimal"):
        method = "exact" if a <= EXACT_ASSIGNMENT_MAX else "greedy"
    if a == 1:
        return torch.zeros(m.shape[:-1], dtype=torch.long, device=m.device)
    if method == "exact":
        perms, onehot = table if table is not None else _permutation_table(a)
        perms = perms.to(m.device)
        onehot = onehot.to(device=m.device, dtype=m.dtype)
        scores = m.reshape(*m.shape[:-2], a * a) @ onehot.T  # (..., a!)
        return perms[scores.argmax(dim=-1)]  # (..., a)
    # greedy: a steps, each picks the largest entry among unused rows and columns
    work = m.detach().reshape(-1, a, a).clone().float()
    alpha = torch.empty_like(work[:, 0], dtype=torch.long)  # (vmap: batched like ``m``)
    rows = torch.arange(work.shape[0], device=m.device)
    for _ in range(a):
        flat = work.reshape(-1, a * a).argmax(dim=-1)
        r, c = flat // a, flat % a
        alpha[rows, r] = c
        work[rows, r, :] = -math.inf
        work[rows, :, c] = -math.inf
    alpha = alpha.reshape(m.shape[:-1])
    return optimal_assignment(m, alpha) if optimal else alpha


def _check_matrices_and_choice(name: str, m: Tensor, alpha: Tensor) -> None:
    """``m`` holds square ``(..., a, a)`` matrices, ``alpha`` one ``(..., a)`` permutation each."""
    if m.dim() < 2 or m.shape[-1] != m.shape[-2] or alpha.shape != m.shape[:-1]:
        raise ValueError(
            f"{name} needs square matrices (..., a, a) and one permutation (..., a) each: "
            f"matrices {tuple(m.shape)}, alpha {tuple(alpha.shape)}"
        )


def _exchange_weights(w: Tensor, idx: Tensor) -> Tensor:
    """``W[k, i, j] = w[k, i, idx[k, j]] - w[k, i, idx[k, i]]``: the score change when row ``i``
    takes the column of row ``j`` (``-inf`` on the diagonal: a cycle has two rows at least)."""
    a = w.shape[-1]
    taken = w.gather(2, idx.unsqueeze(1).expand(-1, a, a))  # [k, i, j] = w[k, i, idx[k, j]]
    d = taken - taken.diagonal(dim1=1, dim2=2).unsqueeze(-1)
    d.diagonal(dim1=1, dim2=2).fill_(-math.inf)
    return d


def _score_tolerance(m: Tensor, w: Tensor) -> float:
    """Score changes this small are ties: the rounding of a sum of ``a`` entries of ``m``'s dtype
    (a float32 choice and its float64 rescoring may disagree by that much)."""
    eps = torch.finfo(m.dtype).eps if m.is_floating_point() else 0.0
    return max(eps, 1e-12) * w.shape[-1] * max(1.0, float(w.abs().amax()))


def _gaining_cycles(d: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """One cycle of positive total weight in each ``(a, a)`` weight matrix of ``d`` that has one.

    Bellman-Ford for the longest paths from a source joined to every row at weight 0, one row
    at a time (each step a relaxation with the current distances, so that every cycle of the
    predecessor graph gains): when a row still grows after ``a`` rounds, a cycle that gains
    lies behind it, and ``a + 1`` steps back along the predecessors land on that cycle.

    Returns:
        ``found`` ``(B,)`` bool and ``pred`` ``(B, a)``: row ``pred[k, v]`` precedes ``v`` on
        the found cycle of matrix ``k`` (``-1`` elsewhere).
    """
    bsz, a, _ = d.shape
    dist = d.new_zeros(bsz, a)
    pred = torch.full((bsz, a), -1, dtype=torch.long, device=d.device)
    last = torch.full((bsz,), -1, dtype=torch.long, device=d.device)  # a row of the last growth
    for _ in range(a + 1):  # a rounds settle every simple path; a later growth is a cycle's
        last.fill_(-1)
        for j in range(a):
            best, arg = (dist + d[:, :, j]).max(dim=-1)  # (B,): the best row i before row j
            grew = best > dist[:, j] + tol
            dist[:, j] = torch.where(grew, best, dist[:, j])
            pred[:, j] = torch.where(grew, arg, pred[:, j])
            last = torch.where(grew, j, last)
        if not bool((last >= 0).any()):  # settled everywhere: no cycle gains
            break
    found = last >= 0
    rows = torch.arange(bsz, device=d.device)
    v = last.clamp(min=0)
    for _ in range(a + 1):  # back along the predecessors: on the cycle
        v = pred[rows, v].clamp(min=0)
    on_cycle = torch.zeros(bsz, a, dtype=torch.bool, device=d.device)
    u = v
    for _ in range(a):  # around the cycle once
        on_cycle[rows, u] = True
        u = pred[rows, u].clamp(min=0)
    return found, torch.where(on_cycle & found.unsqueeze(-1), pred, -1)


def optimal_assignment(m: Tensor, alpha: Tensor) -> Tensor:
    """The permutation that maximizes ``<m, P>``, from a start ``alpha`` (e.g. the greedy one).

    Cycle cancelling: a permutation is optimal exactly when no cycle of column exchanges (row
    ``i`` takes the column of the next row of the cycle) raises its score; while one does, it is
    applied. Every step raises the score, so the loop ends at the optimum, for every size and
    the whole batch at once; the number of steps depends on the data (none when the start is
    optimal already, the common case for factors near permutations). Ties keep the start.

    Args:
        m: ``(..., a, a)`` real matrices.
        alpha: ``(..., a)`` start permutations.

    Returns:
        ``(..., a)`` optimal permutations.
    """
    _check_matrices_and_choice("optimal_assignment", m, alpha)
    a = m.shape[-1]
    w = m.detach().reshape(-1, a, a).double()
    out = alpha.reshape(-1, a).clone()
    if a < 2:
        return out.reshape(alpha.shape)
    tol = _score_tolerance(m, w)
    todo = torch.arange(w.shape[0], device=m.device)
    while todo.numel():
        idx = out[todo]
        d = _exchange_weights(w[todo], idx)
        found, pred = _gaining_cycles(d, tol)
        on = pred >= 0  # (B, a): row pred[v] takes the column of row v
        gain = torch.where(on, d.gather(1, pred.clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
        # ^ [k, v] = d[k, pred[k, v], v]
        apply = found & (gain.sum(-1) > tol)
        if bool((found & ~apply).any()):  # the predecessor graph's cycles gain: not reached
            raise RuntimeError("optimal_assignment: a cycle found does not gain")
        if not bool(apply.any()):
            break
        new = idx.clone()
        k, v = (on & apply.unsqueeze(-1)).nonzero(as_tuple=True)
        new[k, pred[k, v]] = idx[k, v]
        out[todo] = new
        todo = todo[apply]
    return out.reshape(alpha.shape)


def assignment_gap(m: Tensor, alpha: Tensor) -> Tensor:
    """How far the permutation ``alpha`` is ahead of every other: ``<m, P> - max_{Q != P} <m, Q>``.

    ``P`` is the permutation matrix with ``P[i, alpha[i]] = 1``. When ``P`` maximizes ``<m, P>``
    (what :func:`closest_permutation` returns with ``method="exact"``) the gap is the score
    difference to the second best permutation, ``>= 0`` (0 on a tie); when it does not (a greedy
    choice that missed the optimum) the gap is ``<m, P> - <m, P*>`` with ``P*`` the optimum,
    ``< 0``. Exact at every size, without enumerating the ``a!`` permutations.

    Every other permutation is ``P`` with its columns exchanged along cycles: row ``i`` takes
    the column of row ``j`` at the score change ``W[i, j] = m[i, alpha[j]] - m[i, alpha[i]]``,
    and a cycle's change is the sum over its edges. When no cycle gains, the best other
    permutation is the best single cycle (more cycles add changes ``<= 0``), found for the whole
    batch at once by a max-plus Floyd-Warshall (``a`` steps of ``O(a^2)``, float64). A cycle
    that gains means ``P`` is not the optimum; for those matrices (rare: the greedy choice of
    factors far from permutations) :func:`optimal_assignment` finds it.

    Args:
        m: ``(..., a, a)`` real matrices.
        alpha: ``(..., a)`` permutations, one per matrix.

    Returns:
        ``(...)`` float64 gaps (``inf`` for ``a = 1``: one permutation, nothing to choose).
    """
    _check_matrices_and_choice("assignment_gap", m, alpha)
    a = m.shape[-1]
    batch = m.shape[:-2]
    if a == 1:
        return torch.full(batch, math.inf, dtype=torch.float64, device=m.device)
    w = m.detach().reshape(-1, a, a).double()
    idx = alpha.reshape(-1, a)
    d = _exchange_weights(w, idx)  # W: the change when row i takes row j's column
    for k in range(a):  # best path i -> j through rows 0..k (max-plus Floyd-Warshall)
        d = torch.maximum(d, d[:, :, k : k + 1] + d[:, k : k + 1, :])
    best = d.diagonal(dim1=1, dim2=2).amax(-1)  # (B,) the best cycle's change
    gap = (-best).clamp(min=0.0)
    gains = best > _score_tolerance(m, w)
    if bool(gains.any()):  # P is not the optimum: the gap to the optimum, exactly
        sub = w[gains]
        optimum = optimal_assignment(sub, idx[gains])

        def score(perm: Tensor) -> Tensor:
            return sub.gather(2, perm.unsqueeze(-1)).sum((-2, -1))

        gap[gains] = score(idx[gains]) - score(optimum)
    return gap.reshape(batch)


def invert_permutation(idx: Tensor) -> Tensor:
    """Inverse of batched permutations ``(..., n)``: ``inv[..., idx[..., c]] = c``."""
    ar = torch.arange(idx.shape[-1], device=idx.device).expand_as(idx)
    return torch.empty_like(idx).scatter(-1, idx, ar)  # (out of place: vmap has its rule)


def compose_index(alpha: Tensor, beta: Tensor, groups: int, cross_shuffle: bool = True) -> Tensor:
    """One channel index for the Kronecker permutations of every group and the cross-group shuffle.

    Within a group of ``n = a * b`` channels, viewed as an ``(a, b)`` grid, ``A kron B`` sends
    ``pi[i * b + j] = alpha[i] * b + beta[j]``. The cross-group shuffle then moves channel ``m`` of
    group ``g`` to ``m * G + g`` (the ShuffleNet transpose ``(G, n) -> (n, G)``).

    Args:
        alpha: ``(N, Gf, a)`` index vectors of the first factor; ``Gf`` is 1 (shared) or ``G``.
        beta: ``(N, Gf, b)`` index vectors of the second factor.
        groups: ``G``.
        cross_shuffle: compose the cross-group shuffle (``False`` keeps channels in their group).

    Returns:
        ``(N, G * a * b)`` LongTensor ``idx`` with ``y[:, c] = x[:, idx[:, c]]``.
    """
    a, b = alpha.shape[-1], beta.shape[-1]
    n = a * b
    within = (alpha.unsqueeze(-1) * b + beta.unsqueeze(-2)).flatten(-2)  # (N, Gf, n)
    offsets = torch.arange(groups, device=alpha.device).unsqueeze(-1) * n  # (G, 1)
    idx = within + offsets  # (N, G, n); a shared factor pair broadcasts over the groups
    if cross_shuffle:
        idx = idx.transpose(1, 2)  # (N, n, G): output channel m * G + g reads group g, slot m
    return idx.reshape(idx.shape[0], groups * n)


def factor_index_tables(
    perms_a: Tensor, perms_b: Tensor, groups: int, cross_shuffle: bool = True
) -> tuple[Tensor, Tensor]:
    """Per-choice parts of :func:`compose_index` for shared factors: ``idx = TA[i] + TB[j]``.

    With shared factors, the composed channel index of the ``i``-th permutation of ``perms_a`` and
    the ``j``-th of ``perms_b`` is ``TA[i] + TB[j]`` (``TA`` holds the group offsets and
    ``alpha * b``, ``TB`` holds ``beta``), so a layer turns its two factor choices into the
    ``(N, C)`` index with two lookups and one addition.

    Args:
        perms_a: ``(Na, a)`` candidate index vectors of the first factor.
        perms_b: ``(Nb, b)`` candidate index vectors of the second factor.
        groups: ``G``.
        cross_shuffle: compose the cross-group shuffle.

    Returns:
        ``TA`` ``(Na, C)`` and ``TB`` ``(Nb, C)`` LongTensors, ``C = G * a * b``.
    """
    na, a = perms_a.shape
    nb, b = perms_b.shape
    zero_a = torch.zeros(nb, 1, a, dtype=torch.long, device=perms_a.device)
    zero_b = torch.zeros(na, 1, b, dtype=torch.long, device=perms_a.device)
    ta = compose_index(perms_a.unsqueeze(1), zero_b, groups, cross_shuffle)
    tb = compose_index(zero_a, perms_b.unsqueeze(1), groups, cross_shuffle)
    return ta, tb - compose_index(zero_a[:1], zero_b[:1], groups, cross_shuffle)


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``; no operator at all when it already is (``.to`` would dispatch one)."""
    return t if t.dtype == dtype else t.to(dtype)


def permutation_matrix(idx: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Dense ``(..., C, C)`` matrices ``P`` with ``P @ x == x[idx]`` (for tests and pictures)."""
    c = idx.shape[-1]
    out = torch.zeros(*idx.shape, c, dtype=dtype, device=idx.device)
    return out.scatter_(-1, idx.unsqueeze(-1), 1.0)


def _exporting() -> bool:
    """Inside ``torch.jit`` tracing or scripting, ``torch.export`` or ONNX (a graph that other
    runtimes run: PyTorch operators only)."""
    return (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or getattr(torch.compiler, "is_exporting", bool)()
        or torch.onnx.is_in_onnx_export()
    )


def _transformed() -> bool:
    """Inside a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ...), eagerly: the
    autograd Functions run through functorch, and ``vmap`` takes no ``out=`` operators, custom
    kernels or memory-format queries."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def _traced() -> bool:
    """Inside ``torch.jit`` tracing or scripting, ``torch.compile``, ``torch.export``, ONNX or a
    ``torch.func`` transform (no ``out=`` operators, the eager-only paths are left)."""
    return torch.compiler.is_compiling() or _exporting() or _transformed()


def _functorch_function(cls: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Class decorator of an autograd Function written in the ``setup_context`` form (what
    ``torch.func`` transforms need): adds ``cls.eager``, the same Function in the ctx-first form.

    ``Function.apply`` of a ``setup_context`` Function binds its arguments with
    ``inspect.signature`` on every call, in Python (a cost the CPU training step of
    ``dyshuffle bench --ref`` showed); :func:`_apply` calls the twin outside transforms.
    """

    def forward(ctx, *args):
        output = cls.forward(*args)
        cls.setup_context(ctx, args, output)
        return output

    body = {"forward": staticmethod(forward), "backward": staticmethod(cls.backward)}
    cls.eager = type(f"{cls.__name__}Eager", (torch.autograd.Function,), body)
    return cls


def _apply(function: type[torch.autograd.Function], *args):
    """``function.apply(*args)`` of a :func:`_functorch_function`, through its ctx-first twin
    in eager mode outside ``torch.func`` transforms (``torch.compile`` traces the Function)."""
    if torch.compiler.is_compiling() or _transformed():
        return function.apply(*args)
    return function.eager.apply(*args)


def _is_channels_last(x: Tensor) -> bool:
    """``x`` is laid out channels_last (and not also plain contiguous, as 1x1 maps are).

    Inside a ``torch.func`` transform every tensor is taken as NCHW (``vmap`` cannot answer
    the query; the NCHW paths are right for any layout).
    """
    if _transformed():
        return False
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _gather_channels(x: Tensor, idx: Tensor, own: bool = False) -> Tensor:
    """``y[n, c] = x[n, idx[n or 0, c]]`` in one gather, keeping the layout of ``x``.

    ``own``: return a tensor that is not a view (the gather writes into the storage of the
    returned tensor itself). An autograd Function's output that is a view of a tensor made in
    its forward cannot be modified in place (``nn.ReLU(inplace=True)`` after the layer); the
    Functions ask for this, the graph-free paths (and traced graphs) take the plain view.
    """
    n, c, h, w = x.shape
    # a traced graph (torch.export, torch.compile) has no such views, but its out= op would
    # refuse to run where autograd records (an exported model called without no_grad)
    own = own and not _traced()
    if _is_channels_last(x):
        # channels_last: channels are the contiguous dimension, gather along it; the (N, C)
        # index is broadcast over the pixels (stride 0), the output keeps the layout
        where = idx[:, None, None, :].expand(n, h, w, c)
        if own:
            y = torch.empty_like(x, memory_format=torch.channels_last)
            torch.gather(x.permute(0, 2, 3, 1), 3, where, out=y.permute(0, 2, 3, 1))
            return y
        return torch.gather(x.permute(0, 2, 3, 1), 3, where).permute(0, 3, 1, 2)
    if idx.shape[0] == 1 and n != 1:  # one permutation for the whole batch
        return x.index_select(1, idx[0])
    # NCHW: copy whole (H, W) planes, one row per (sample, channel)
    flat = (idx + torch.arange(n, device=idx.device).unsqueeze(1) * c).reshape(-1)
    planes = x.contiguous().reshape(n * c, h, w)
    if own:
        y = x.new_empty((n, c, h, w))
        torch.index_select(planes, 0, flat, out=y.view(n * c, h, w))
        return y
    return planes.index_select(0, flat).reshape(n, c, h, w)


def _scatter_channels(parts: Sequence[Tensor], inv: Tensor) -> Tensor:
    """``_gather_channels(torch.cat(parts, 1), idx)`` for channels_last parts, without the
    concatenation: channel ``c`` of the concatenation is written to ``inv[:, c]``.

    Args:
        parts: ``(N, C_i, H, W)`` tensors whose channels are the innermost dimension.
        inv: ``(N or 1, C)`` inverse of ``idx`` (``inv[:, idx[:, c]] = c``).

    Returns:
        ``(N, C, H, W)`` channels_last: each part is read once and written once, where the
        concatenation and the gather read and write every element twice.
    """
    n, _, h, w = parts[0].shape
    c = inv.shape[-1]
    inv = inv.expand(n, c)
    y = parts[0].new_empty((n, h, w, c))
    start = 0
    for p in parts:
        k = p.shape[1]
        where = inv[:, None, None, start : start + k].expand(n, h, w, k)
        y.scatter_(3, where, p.permute(0, 2, 3, 1))
        start += k
    return y.permute(0, 3, 1, 2)


@_functorch_function
class _PermuteChannels(torch.autograd.Function):
    """``y[n, c] = x[n, idx[n, c]]``; the backward pass is the inverse gather."""

    generate_vmap_rule = True  # (torch.func.vmap: forward and backward are PyTorch operators)

    @staticmethod
    def forward(x: Tensor, idx: Tensor) -> Tensor:  # type: ignore[override]
        return _gather_channels(x, idx, own=True)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        (idx,) = ctx.saved_tensors
        return _gather_channels(gy, invert_permutation(idx)), None


def permute_channels(x: Tensor, idx: Tensor) -> Tensor:
    """Apply per-sample channel permutations with one gather.

    Args:
        x: ``(N, C, H, W)``, contiguous or channels_last (the layout is kept).
        idx: ``(N, C)`` or ``(1, C)`` LongTensor, ``y[n, c] = x[n, idx[n, c]]``.
    """
    if x.dim() != 4:
        raise ValueError(f"permute_channels expects (N, C, H, W), got shape {tuple(x.shape)}")
    if idx.dim() != 2 or idx.shape[1] != x.shape[1] or idx.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"index of shape {tuple(idx.shape)} does not fit input {tuple(x.shape)}; "
            f"expected ({x.shape[0]}, {x.shape[1]}) or (1, {x.shape[1]})"
        )
    # a graph traced to run elsewhere (torch.export, jit.trace) holds the plain gather, whose
    # derivative autograd records when the graph runs (strict export traced the Function's
    # forward with autograd off: no input gradient; jit.save refuses a Python Function)
    if torch.is_grad_enabled() and x.requires_grad and not _exporting():
        return _apply(_PermuteChannels, x, idx)
    return _gather_channels(x, idx)
