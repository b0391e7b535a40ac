"""The mathematics of the channel mixers (METHOD.md, issue 2)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dyshuffle import (
    ChannelShuffle,
    DynamicShuffle,
    LearnedShuffle,
    StaticDynamicShuffle,
    channel_shuffle,
    orthogonal_loss,
    permutation_mode,
)
from dyshuffle.layers import (
    assignment_gap,
    balance_term,
    choose_groups,
    closest_permutation,
    compact_index,
    compose_index,
    create_mixer,
    invert_permutation,
    kronecker_apply,
    list_mixers,
    optimal_assignment,
    orthogonality,
    permutation_matrix,
    permute_channels,
)
from dyshuffle.layers import dynamic as dynamic_module
from dyshuffle.layers.dynamic import _factor_gram, _factor_gram_channels
from dyshuffle.layers.permutation import permutation_table

V2_WIDTHS = [48, 96, 116, 176, 192, 232, 244, 464, 488, 976]


def randomize_generator(layer: DynamicShuffle, scale: float = 3.0) -> None:
    """Large random generator weights, so different inputs choose different permutations."""
    torch.manual_seed(0)
    for p in layer.generator.parameters():
        nn.init.normal_(p, 0.0, scale / p.shape[-1] ** 0.5)


def is_permutation(idx: torch.Tensor) -> bool:
    return bool((idx.sort(dim=-1).values == torch.arange(idx.shape[-1])).all())


def dense_reference(layer: DynamicShuffle, a_mat: torch.Tensor, b_mat: torch.Tensor, x):
    """``cross_shuffle @ blockdiag_g(A_g kron B_g)`` as explicit C x C matrices, applied densely."""
    n, c = x.shape[:2]
    g = layer.groups
    a_mat = a_mat.expand(n, g, -1, -1)
    b_mat = b_mat.expand(n, g, -1, -1)
    blocks = [
        torch.block_diag(*[torch.kron(a_mat[s, j], b_mat[s, j]) for j in range(g)])
        for s in range(n)
    ]
    mats = torch.stack(blocks)  # (N, C, C)
    if layer.cross_shuffle:
        cross = permutation_matrix(channel_shuffle(torch.arange(c).view(1, c, 1, 1), g).view(c))
        mats = cross @ mats
    return torch.einsum("nij,njhw->nihw", mats, x)


def check_ste_reference(layer: DynamicShuffle, x, y, a_hard, b_hard):
    """``y`` and its gradients (input and every parameter) equal those of the dense product with
    the straight-through factors ``hard + soft - soft.detach()``; returns the output gradient
    used and the gradients."""
    a_mat, b_mat = layer.factor_matrices(x)
    a_st = a_hard.to(a_mat) + a_mat - a_mat.detach()
    b_st = b_hard.to(b_mat) + b_mat - b_mat.detach()
    ref = dense_reference(layer, a_st, b_st, x)
    assert torch.allclose(y, ref, atol=1e-6)  # a + (1 - a) is 1 only up to rounding
    g = torch.randn_like(y)
    params = list(layer.parameters())
    grads = torch.autograd.grad(y, [x, *params], g)
    ref_grads = torch.autograd.grad(ref, [x, *params], g)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    return g, grads


# --- fixed shuffle ------------------------------------------------------------------------


def test_channel_shuffle_is_the_transpose():
    x = torch.arange(12.0).view(1, 12, 1, 1)
    y = channel_shuffle(x, 3).flatten()
    assert y.tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    assert torch.equal(ChannelShuffle(3)(x), channel_shuffle(x, 3))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_channel_shuffle_keeps_the_layout_and_equals_view_transpose(layout):
    x = torch.randn(2, 12, 3, 5).to(memory_format=layout).requires_grad_(True)
    y = channel_shuffle(x, 3)
    assert y.is_contiguous(memory_format=layout)
    ref = x.reshape(2, 3, 4, 3, 5).transpose(1, 2).reshape(2, 12, 3, 5)
    assert torch.equal(y, ref)
    g = torch.randn(2, 12, 3, 5)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_channel_shuffle_rejects_bad_groups():
    with pytest.raises(ValueError, match="groups=5"):
        channel_shuffle(torch.zeros(1, 12, 2, 2), 5)
    with pytest.raises(ValueError, match="groups=5"):
        ChannelShuffle(5, channels=12)


# --- group and factor choice ---------------------------------------------------------------


@pytest.mark.parametrize(
    "channels,expected",
    [(116, (29, 2, 2)), (232, (29, 2, 4)), (464, (29, 4, 4)), (244, (61, 2, 2)), (48, (3, 4, 4))],
)
def test_choose_groups_awkward_widths(channels, expected):
    assert choose_groups(channels) == expected


def test_choose_groups_errors_name_the_value():
    with pytest.raises(ValueError, match=r"groups=7 .*valid groups: \[1, 2, 4, 29, 58, 116\]"):
        choose_groups(116, groups=7)
    with pytest.raises(ValueError, match=r"factors=\(3, 3\)"):
        choose_groups(116, factors=(3, 3))
    with pytest.raises(ValueError, match=r"factors=\(2, 4\) multiply to 8.*group size of 16"):
        choose_groups(464, groups=29, factors=(2, 4))
    with pytest.raises(ValueError, match="mode 'hard'"):
        DynamicShuffle(116, mode="hard")
    with pytest.raises(ValueError, match="init 'zeros'"):
        DynamicShuffle(116, init="zeros")
    for tau in (0.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match=f"tau must be a positive finite number, got {tau}"):
            DynamicShuffle(116, tau=tau)
    for reduction in (0, 2.5, True):
        with pytest.raises(
            ValueError, match=f"reduction must be a positive integer, got {reduction}"
        ):
            DynamicShuffle(116, reduction=reduction)
    with pytest.raises(
        ValueError, match=r"groups=5 does not divide channels=48; valid groups: \[1, 2"
    ):
        ChannelShuffle(5, 48)
    with pytest.raises(
        ValueError,
        match=r"groups=4 does not divide the 6 input channels; valid groups: \[1, 2, 3, 6\]",
    ):
        channel_shuffle(torch.randn(1, 6, 2, 2), 4)
    with pytest.raises(
        ValueError, match=r"out_factors must be two positive integers, got \(-4, -4\)"
    ):
        StaticDynamicShuffle(48, 36, out_factors=(-4, -4))
    with pytest.raises(ValueError, match="sets cross_shuffle itself"):
        StaticDynamicShuffle(48, cross_shuffle=True)
    with pytest.raises(ValueError, match="factor_grad 'gram'.*'channels'"):
        DynamicShuffle(116, factor_grad="gram")
    # a flag given as text (a command line's "false") is refused, not taken as True
    for flag in ("shared", "cross_shuffle", "descriptor_grad", "hard_identity", "descriptor_norm"):
        with pytest.raises(ValueError, match=f"{flag} must be True or False, got 'false'"):
            DynamicShuffle(116, **{flag: "false"})
    with pytest.raises(ValueError, match="dynamic must be True or False, got 'false'"):
        StaticDynamicShuffle(116, dynamic="false")
    assert not DynamicShuffle(116, shared=0).shared  # 0 and 1 are flags


def test_wrong_input_rank_and_channels():
    layer = DynamicShuffle(16)
    with pytest.raises(ValueError, match=r"4-D input .* shape \(2, 16\)"):
        layer(torch.zeros(2, 16))
    with pytest.raises(ValueError, match="built for 16 channels, got input with 12"):
        layer(torch.zeros(2, 12, 3, 3))
    with pytest.raises(ValueError, match="built for 16 channels"):
        StaticDynamicShuffle(16)(torch.zeros(2, 8, 3, 3))


# --- binarization ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_binarization_is_valid_when_rows_collide(method):
    # both rows peak at column 0: a row-wise argmax would pick it twice
    m = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
    alpha = closest_permutation(m, method)
    assert sorted(alpha.tolist()) == [0, 1]
    assert alpha.tolist() == [0, 1]  # 0.9 + 0.2 > 0.1 + 0.8


@settings(max_examples=40, deadline=None)
@given(a=st.integers(1, 6), batch=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_exact_assignment_is_optimal(a, batch, seed):
    torch.manual_seed(seed)
    m = torch.rand(batch, a, a)
    alpha = closest_permutation(m, "exact")
    assert is_permutation(alpha)
    best = torch.stack(
        [
            torch.stack([m[:, i, p[i]] for i in range(a)]).sum(0)
            for p in itertools.permutations(range(a))
        ]
    ).amax(0)
    got = m.gather(-1, alpha.unsqueeze(-1)).sum((-2, -1))
    assert torch.allclose(got, best)


@settings(max_examples=30, deadline=None)
@given(a=st.integers(1, 9), batch=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_greedy_assignment_is_a_permutation(a, batch, seed):
    torch.manual_seed(seed)
    m = torch.softmax(torch.randn(batch, 3, a, a), -1)
    alpha = closest_permutation(m, "greedy")
    assert alpha.shape == (batch, 3, a)
    assert is_permutation(alpha)


def test_binarization_recovers_a_permutation_matrix():
    perm = torch.tensor([2, 0, 3, 1])
    m = permutation_matrix(perm)
    assert torch.equal(closest_permutation(m), perm)
    assert torch.equal(closest_permutation(m, "greedy"), perm)


def brute_force_gap(m: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``<m, P> - max_{Q != P} <m, Q>`` by scoring all ``a!`` permutations ``Q``."""
    perms, onehot = permutation_table(m.shape[-1])
    scores = m.double().flatten(-2) @ onehot.double().T  # (..., a!)
    own = m.double().gather(-1, alpha.unsqueeze(-1)).sum((-2, -1))
    other = (perms != alpha.unsqueeze(-2)).any(-1)  # (..., a!): Q != P
    return own - scores.masked_fill(~other, -math.inf).amax(-1)


@settings(max_examples=40, deadline=None)
@given(
    a=st.integers(2, 7),
    batch=st.integers(1, 6),
    sharp=st.sampled_from([0.5, 3.0, 30.0]),
    which=st.sampled_from(["exact", "greedy", "random"]),
    seed=st.integers(0, 2**16),
)
def test_assignment_gap_is_the_score_gap_to_the_best_other_permutation(
    a, batch, sharp, which, seed
):
    # the optimum (gap >= 0), the greedy choice and any permutation (the gap to the optimum < 0)
    torch.manual_seed(seed)
    m = torch.softmax(sharp * torch.randn(batch, 2, a, a), -1)
    if which == "random":
        alpha = torch.stack([torch.randperm(a) for _ in range(batch * 2)]).reshape(batch, 2, a)
    else:
        alpha = closest_permutation(m, which)
    gap = assignment_gap(m, alpha)
    assert gap.shape == (batch, 2) and gap.dtype == torch.float64
    # (float32 entries: score differences within their rounding count as ties, gap 0)
    assert torch.allclose(gap, brute_force_gap(m, alpha), atol=1e-6)
    if which == "exact":
        assert (gap >= 0).all() and (gap <= 2 + 1e-6).all()  # rows of float32 softmax sum to 1


def scipy_optimum(m: torch.Tensor) -> torch.Tensor:
    """The largest ``<m, P>`` of each ``(a, a)`` matrix, by scipy's assignment solver."""
    from scipy.optimize import linear_sum_assignment

    flat = m.detach().double().reshape(-1, m.shape[-1], m.shape[-1])
    best = [x[linear_sum_assignment(x.numpy(), maximize=True)].sum() for x in flat]
    return torch.stack(best).reshape(m.shape[:-2])


def score_of(m: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return m.double().gather(-1, alpha.unsqueeze(-1)).sum((-2, -1))


def test_assignment_gap_beyond_enumeration():
    torch.manual_seed(0)
    a = 16  # 16! permutations: no table, the cycle search and the assignment solver only
    perm = torch.randperm(a)
    exact = permutation_matrix(perm)
    assert torch.equal(assignment_gap(exact, perm), torch.tensor(2.0, dtype=torch.float64))
    # one exchange of two columns costs 2 of the score of a permutation matrix
    swapped = perm.clone()
    swapped[[3, 7]] = swapped[[7, 3]]
    assert assignment_gap(exact, swapped).item() == -2.0
    # a greedy choice on fuzzy factors: the gap to the optimum of scipy's solver when it missed
    m = torch.softmax(torch.randn(64, a, a), -1)
    alpha = closest_permutation(m, "greedy")
    gap = assignment_gap(m, alpha)
    optimum, score = scipy_optimum(m), score_of(m, alpha)
    missed = score < optimum - 1e-9
    assert torch.allclose(gap[missed], (score - optimum)[missed], rtol=0, atol=1e-9)
    assert ((gap[~missed] >= 0) & (gap[~missed] <= 2)).all()
    assert 0 < int(missed.sum()) < 64  # both cases were checked
    # one matrix without a gain in any cycle keeps its gap when another one needs the solver
    both = torch.stack([exact, exact])
    assert assignment_gap(both, torch.stack([perm, swapped])).tolist() == [2.0, -2.0]


@settings(max_examples=60, deadline=None)
@given(
    a=st.integers(2, 14),
    batch=st.integers(1, 8),
    kind=st.sampled_from(["soft", "sharp", "ties"]),
    start=st.sampled_from(["greedy", "random"]),
    seed=st.integers(0, 2**16),
)
def test_optimal_assignment_reaches_the_optimum(a, batch, kind, start, seed):
    torch.manual_seed(seed)
    if kind == "ties":  # few distinct values: many optimal permutations
        m = torch.randint(0, 3, (batch, 2, a, a)).float()
    else:
        m = torch.softmax((0.5 if kind == "soft" else 4.0) * torch.randn(batch, 2, a, a), -1)
    if start == "greedy":
        alpha = closest_permutation(m, "greedy")
    else:
        alpha = torch.stack([torch.randperm(a) for _ in range(batch * 2)]).reshape(batch, 2, a)
    best = optimal_assignment(m, alpha)
    assert best.shape == alpha.shape and is_permutation(best.reshape(-1, a))
    assert torch.allclose(score_of(m, best), scipy_optimum(m), atol=1e-9)
    assert (score_of(m, best) >= score_of(m, alpha) - 1e-9).all()  # never worse than the start
    if a <= 7:  # ... which is the maximum over every permutation
        _, onehot = permutation_table(a)
        every = (m.double().flatten(-2) @ onehot.double().T).amax(-1)
        assert torch.allclose(score_of(m, best), every, atol=1e-9)
    # closest_permutation's "optimal": the table's choice up to 6 x 6, the optimum above
    got = closest_permutation(m, "optimal")
    assert torch.allclose(score_of(m, got), scipy_optimum(m), atol=1e-9)
    if a <= 6:
        assert torch.equal(got, closest_permutation(m, "exact"))


def test_optimal_assignment_keeps_an_optimal_start_and_checks_shapes():
    torch.manual_seed(0)
    m = torch.softmax(3.0 * torch.randn(16, 9, 9), -1)
    best = optimal_assignment(m, closest_permutation(m, "greedy"))
    assert torch.equal(optimal_assignment(m, best), best)  # nothing to improve: unchanged
    uniform = torch.full((9, 9), 1.0 / 9)
    assert torch.equal(optimal_assignment(uniform, torch.arange(9)), torch.arange(9))  # ties
    with pytest.raises(ValueError, match=r"matrices \(2, 3, 3\), alpha \(2, 4\)"):
        optimal_assignment(torch.zeros(2, 3, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"unknown assignment method 'hungarian'.*'optimal'"):
        closest_permutation(m, "hungarian")


def test_optimal_assignment_is_eager_only():
    m = torch.softmax(torch.randn(3, 2, 8, 8), -1)
    with pytest.raises(ValueError, match="'optimal' of 8 x 8 factors .* vmapped"):
        torch.func.vmap(lambda t: closest_permutation(t, "optimal"))(m)
    small = torch.softmax(torch.randn(3, 2, 4, 4), -1)  # a table: exact, vmappable
    got = torch.func.vmap(lambda t: closest_permutation(t, "optimal"))(small)
    assert torch.equal(got, closest_permutation(small, "exact"))
    layer = DynamicShuffle(192, max_group_size=64, assignment="optimal").eval()
    x = torch.randn(2, 192, 3, 3)
    with pytest.raises(ValueError, match="cannot be traced, exported"):
        torch.export.export(layer, (x,))
    layer.assignment = "auto"  # what the message says: the greedy assignment exports
    assert torch.equal(torch.export.export(layer, (x,)).module()(x), layer(x))


def test_assignment_gap_edge_cases():
    one = torch.zeros(3, 1, dtype=torch.long)
    assert torch.isinf(assignment_gap(torch.ones(3, 1, 1), one)).all()  # nothing to choose
    assert torch.equal(  # uniform: every permutation ties
        assignment_gap(torch.full((4, 4), 0.25), torch.arange(4)), torch.tensor(0.0).double()
    )
    with pytest.raises(ValueError, match=r"square matrices .* \(2, 3\)"):
        assignment_gap(torch.zeros(2, 3), torch.arange(2))
    with pytest.raises(ValueError, match=r"matrices \(2, 3, 3\), alpha \(3,\)"):
        assignment_gap(torch.zeros(2, 3, 3), torch.arange(3))


# --- orthogonal regularizer -------------------------------------------------------------------


def test_regularizer_zero_exactly_on_permutations():
    for p in itertools.permutations(range(4)):
        assert orthogonality(permutation_matrix(torch.tensor(p))).item() == 0.0
    torch.manual_seed(0)
    soft = torch.softmax(torch.randn(100, 4, 4) * 3, -1)
    assert (orthogonality(soft) > 0).all()
    near = permutation_matrix(torch.tensor([1, 0, 2, 3])) * 0.99 + 0.0025
    assert orthogonality(near).item() > 0


def test_orthogonal_loss_collects_layers():
    model = nn.Sequential(DynamicShuffle(16), ChannelShuffle(2), DynamicShuffle(16, shared=False))
    assert orthogonal_loss(model).item() == 0.0  # no forward yet
    model.train()(torch.randn(4, 16, 3, 3))
    losses = [model[0].last_orthogonal_loss, model[2].last_orthogonal_loss]
    assert torch.allclose(orthogonal_loss(model), torch.stack(losses).mean())
    assert orthogonal_loss(model).requires_grad


# --- the composed index ---------------------------------------------------------------------


def test_compose_index_is_kron_then_cross_shuffle():
    alpha = torch.tensor([[[1, 0]]])  # shared, a = 2
    beta = torch.tensor([[[2, 0, 1]]])  # b = 3
    idx = compose_index(alpha, beta, groups=2, cross_shuffle=False)
    within = [alpha[0, 0, i].item() * 3 + beta[0, 0, j].item() for i in range(2) for j in range(3)]
    assert idx[0].tolist() == within + [6 + w for w in within]
    crossed = compose_index(alpha, beta, groups=2)
    x = torch.arange(12.0).view(1, 12, 1, 1)
    expected = channel_shuffle(x[:, idx[0]], 2)
    assert torch.equal(x[:, crossed[0]], expected)


def test_invert_permutation():
    torch.manual_seed(0)
    idx = torch.stack([torch.randperm(10) for _ in range(4)])
    inv = invert_permutation(idx)
    assert torch.equal(idx.gather(1, inv), torch.arange(10).expand(4, 10))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("batch_idx", [1, 3])
def test_permute_channels_fast_paths(layout, batch_idx):
    torch.manual_seed(0)
    x = torch.randn(3, 10, 4, 5)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    idx = torch.stack([torch.randperm(10) for _ in range(batch_idx)])
    x.requires_grad_(True)
    y = permute_channels(x, idx)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = ref_x.gather(1, idx.expand(3, 10)[:, :, None, None].expand(3, 10, 4, 5))
    assert torch.equal(y, ref)
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    assert torch.equal(x.grad, ref_x.grad)


# --- dynamic shuffle ---------------------------------------------------------------------------


@pytest.mark.parametrize("channels", V2_WIDTHS)
def test_eval_is_exact_per_sample_permutation(channels):
    torch.manual_seed(channels)
    layer = DynamicShuffle(channels)
    randomize_generator(layer)
    layer.eval()
    x = torch.randn(4, channels, 3, 3)
    y = layer(x)
    idx = layer.permutation(x)
    assert idx.shape == (4, channels) and is_permutation(idx)
    for n in range(4):
        assert torch.equal(y[n], x[n, idx[n]])


@pytest.mark.parametrize(
    "channels,groups,factors,shared",
    [(24, 2, (3, 4), True), (24, 6, (2, 2), False), (30, 1, (5, 6), True), (64, 4, (4, 4), False)],
)
def test_eval_exact_permutation_explicit_groups(channels, groups, factors, shared):
    layer = DynamicShuffle(channels, groups=groups, factors=factors, shared=shared)
    randomize_generator(layer)
    layer.eval()
    x = torch.randn(5, channels, 2, 3)
    idx = layer.permutation(x)
    assert is_permutation(idx)
    assert torch.equal(layer(x), x.gather(1, idx[:, :, None, None].expand_as(x)))


def test_permutations_depend_on_the_input():
    layer = DynamicShuffle(64, groups=4, factors=(4, 4))
    randomize_generator(layer, scale=10.0)
    layer.eval()
    torch.manual_seed(1)
    idx = layer.permutation(torch.randn(32, 64, 2, 2) * 3)
    assert len({tuple(r.tolist()) for r in idx}) > 1


def test_learned_shuffle_ignores_the_input():
    layer = LearnedShuffle(64, groups=4, factors=(4, 4), init="random").eval()
    idx = layer.permutation(torch.randn(16, 64, 2, 2))
    assert len({tuple(r.tolist()) for r in idx}) == 1 and is_permutation(idx)
    x = torch.randn(16, 64, 2, 2)
    assert torch.equal(layer(x), x.gather(1, idx[:, :, None, None].expand_as(x)))


@pytest.mark.parametrize("cls", [DynamicShuffle, LearnedShuffle])
def test_identity_logits_give_the_fixed_cross_group_shuffle(cls):
    layer = cls(116, init="identity").eval()
    if cls is DynamicShuffle:
        nn.init.zeros_(layer.generator[-1].weight)  # logits = the identity bias exactly
    x = torch.randn(3, 116, 4, 4)
    assert torch.equal(layer(x), channel_shuffle(x, 29))
    with permutation_mode(layer, "soft"):
        soft = layer(x)
    assert not torch.equal(soft, channel_shuffle(x, 29))  # softmax of finite logits is not binary
    layer.tau = 1e-3  # a cold softmax is binary to float precision
    with permutation_mode(layer, "soft"):
        assert torch.allclose(layer(x), channel_shuffle(x, 29), atol=1e-6)
    # the fixed mixer with groups="auto" is that shuffle, at every width
    assert torch.equal(create_mixer("shuffle", 116, groups="auto")(x), layer(x))
    for c in (48, 96, 192, 232, 464):
        ident = cls(c, init="identity", max_group_size=8).eval()
        if cls is DynamicShuffle:
            nn.init.zeros_(ident.generator[-1].weight)
        xc = torch.randn(2, c, 2, 2)
        fixed = create_mixer("shuffle", c, groups="auto", max_group_size=8)
        assert fixed.groups == ident.groups and torch.equal(fixed(xc), ident(xc))


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("channels,groups,factors", [(24, 2, (3, 4)), (116, 29, (2, 2))])
def test_soft_kronecker_equals_dense_matrix(shared, channels, groups, factors):
    torch.manual_seed(0)
    layer = DynamicShuffle(channels, groups, factors, shared=shared, mode="soft").train()
    randomize_generator(layer)
    x = torch.randn(2, channels, 3, 2, requires_grad=True)
    y = layer(x)
    a_mat, b_mat = layer.factor_matrices(x)
    ref = dense_reference(layer, a_mat, b_mat, x)
    assert torch.allclose(y, ref, atol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], g)
    ref_grads = torch.autograd.grad(ref, [x, *layer.parameters()], g)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("cls", [DynamicShuffle, LearnedShuffle])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("cross", [True, False])
@pytest.mark.parametrize("factor_grad", ["pixels", "channels"])
@pytest.mark.parametrize("groups,factors", [(2, (3, 4)), (6, (2, 2))])  # a != b, a == b
def test_ste_fast_path_equals_reference(cls, shared, layout, cross, factor_grad, groups, factors):
    """Hard gather + custom backward == straight-through product with dense C x C matrices."""
    torch.manual_seed(0)
    layer = cls(
        24,
        groups=groups,
        factors=factors,
        shared=shared,
        mode="ste",
        init="random",
        cross_shuffle=cross,
        factor_grad=factor_grad,
    ).train()
    if cls is DynamicShuffle:
        randomize_generator(layer, scale=1.0)
    x = torch.randn(3, 24, 3, 2)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = layer(x)
    alpha, beta = layer._hard_factors(*layer.factor_matrices(x))
    one_hot = torch.nn.functional.one_hot
    g, grads = check_ste_reference(
        layer, x, y, one_hot(alpha, factors[0]), one_hot(beta, factors[1])
    )
    params = list(layer.parameters())
    # without the joint tables (the backward inverts the index itself): the same values
    with compact_index(layer):
        y2 = layer(x)
        grads2 = torch.autograd.grad(y2, [x, *params], g)
    assert torch.equal(y2, y)
    assert all(torch.equal(a, b) for a, b in zip(grads2, grads))


@pytest.mark.parametrize("groups,m", [(3, 16), (1, 48), (2, 12)])
def test_factor_gram_one_product_per_sample_equals_one_per_pixel(monkeypatch, groups, m):
    """Above ``PIXEL_GRAM_MAX`` the CPU contraction copies each sample's ``(m, H*W*G)`` slots
    into one product instead of one product per pixel: the same Gram matrices."""
    torch.manual_seed(0)
    gy = torch.randn(4, groups * m, 5, 3).to(memory_format=torch.channels_last)
    y = torch.randn(4, groups * m, 5, 3).to(memory_format=torch.channels_last)
    want = _factor_gram_channels(gy, y, groups, m, True, True)  # the C x C reference
    got = {}
    for limit in (0, 2**62):
        monkeypatch.setattr(dynamic_module, "PIXEL_GRAM_MAX", limit)
        got[limit] = _factor_gram(gy, y, groups, m, True, True)
    assert torch.allclose(got[0], want, atol=1e-4) and torch.allclose(got[2**62], want, atol=1e-4)
    # ... and the STE backward through it equals the dense straight-through product
    monkeypatch.setattr(dynamic_module, "PIXEL_GRAM_MAX", 0)
    layer = DynamicShuffle(24, groups=2, factors=(3, 4), init="random").train()
    randomize_generator(layer, scale=1.0)
    x = torch.randn(3, 24, 3, 2).to(memory_format=torch.channels_last).requires_grad_(True)
    y_out = layer(x)
    alpha, beta = layer._hard_factors(*layer.factor_matrices(x))
    one_hot = torch.nn.functional.one_hot
    check_ste_reference(layer, x, y_out, one_hot(alpha, 3), one_hot(beta, 4))


@pytest.mark.parametrize("mode", ["soft", "ste"])
@pytest.mark.parametrize("shared", [True, False])
def test_gradients_reach_every_generator_parameter(mode, shared):
    layer = DynamicShuffle(48, mode=mode, shared=shared).train()
    x = torch.randn(4, 48, 3, 3)
    loss = (layer(x) * torch.randn(4, 48, 3, 3)).sum() + orthogonal_loss(layer)
    loss.backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_eval_uses_no_matrix_product_on_the_features():
    """In eval the feature map is only gathered: it equals a pure index copy, bit for bit."""
    layer = DynamicShuffle(116).double().eval()
    x = torch.randn(2, 116, 5, 5, dtype=torch.float64)
    y = layer(x)
    assert y.dtype == torch.float64
    assert set(y.flatten().tolist()) == set(x.flatten().tolist())


def test_bfloat16_input():
    layer = DynamicShuffle(48).eval()
    x = torch.randn(2, 48, 4, 4, dtype=torch.bfloat16)
    y = layer.to(torch.bfloat16)(x)
    idx = layer.permutation(x)
    assert torch.equal(y, x.gather(1, idx[:, :, None, None].expand_as(x)))


@settings(max_examples=25, deadline=None)
@given(
    groups=st.integers(1, 6),
    a=st.integers(1, 4),
    b=st.integers(1, 4),
    batch=st.integers(1, 4),
    shared=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_exact_permutation(groups, a, b, batch, shared, seed):
    torch.manual_seed(seed)
    channels = groups * a * b
    layer = DynamicShuffle(channels, groups=groups, factors=(a, b), shared=shared, init="random")
    layer.eval()
    x = torch.randn(batch, channels, 2, 2)
    idx = layer.permutation(x)
    assert idx.shape == (batch, channels) and is_permutation(idx)
    assert torch.equal(layer(x), x.gather(1, idx[:, :, None, None].expand_as(x)))


@settings(max_examples=15, deadline=None)
@given(
    groups=st.integers(1, 4),
    a=st.integers(1, 3),
    b=st.integers(1, 3),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_property_soft_equals_dense(groups, a, b, batch, seed):
    torch.manual_seed(seed)
    channels = groups * a * b
    layer = DynamicShuffle(channels, groups=groups, factors=(a, b), mode="soft", init="random")
    x = torch.randn(batch, channels, 2, 1)
    y = layer.train()(x)
    a_mat, b_mat = layer.factor_matrices(x)
    assert torch.allclose(y, dense_reference(layer, a_mat, b_mat, x), atol=1e-5)


def test_kronecker_apply_rectangular():
    torch.manual_seed(0)
    a_mat, b_mat = torch.randn(1, 2, 3, 2), torch.randn(1, 2, 5, 4)  # 2 groups, 8 -> 15 channels
    x = torch.randn(2, 16, 3, 3)
    y = kronecker_apply(x, a_mat, b_mat, groups=2)
    w = torch.block_diag(*[torch.kron(a_mat[0, g], b_mat[0, g]) for g in range(2)])
    assert torch.allclose(y, torch.einsum("oi,nihw->nohw", w, x), atol=1e-5)


# --- static-dynamic shuffle ----------------------------------------------------------------------


def sds_reference_weight(sds: StaticDynamicShuffle) -> torch.Tensor:
    """Block-diagonal weight (Kronecker products, or the dense blocks) with the cross-group
    shuffle on its rows."""
    g = sds.groups
    if sds.static == "dense":
        blocks = sds.static_w.reshape(g, sds.out_channels // g, -1).unbind(0)
    else:
        blocks = [torch.kron(sds.static_a[j], sds.static_b[j]) for j in range(g)]
    w = torch.block_diag(*blocks)
    order = channel_shuffle(torch.arange(sds.out_channels).view(1, -1, 1, 1), g).flatten()
    return w[order]


@pytest.mark.parametrize("static", ["kron", "dense"])
@pytest.mark.parametrize("cin,cout", [(116, None), (24, 48), (32, 16)])
def test_sds_without_dynamic_part_is_a_conv(cin, cout, static):
    torch.manual_seed(0)
    sds = StaticDynamicShuffle(cin, cout, dynamic=False, static=static)
    weight = sds_reference_weight(sds).detach()
    assert torch.allclose(sds.equivalent_weight(), weight)
    conv = nn.Conv2d(cin, sds.out_channels, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(weight[:, :, None, None])
    x = torch.randn(2, cin, 4, 3, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y_ref = sds(x), conv(x2)
    assert torch.allclose(y, y_ref, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


@pytest.mark.parametrize("static", ["kron", "dense"])
def test_sds_square_is_permutation_plus_static(static):
    torch.manual_seed(0)
    sds = StaticDynamicShuffle(48, static=static).eval()
    randomize_generator(sds.permute)
    x = torch.randn(3, 48, 2, 2)
    idx = sds.permute.permutation(x)  # within-group permutation, no cross shuffle
    perm = x.gather(1, idx[:, :, None, None].expand_as(x))
    static = torch.einsum("oi,nihw->nohw", sds_reference_weight(sds), x)
    expected = channel_shuffle(perm, sds.groups) + static
    assert torch.allclose(sds(x), expected, atol=1e-5)


@pytest.mark.parametrize("static", ["kron", "dense"])
def test_sds_rectangular_permutes_then_mixes(static):
    torch.manual_seed(0)
    sds = StaticDynamicShuffle(16, 96, static=static).eval()
    randomize_generator(sds.permute)
    x = torch.randn(2, 16, 3, 3)
    idx = sds.permute.permutation(x)
    perm = x.gather(1, idx[:, :, None, None].expand_as(x))
    expected = torch.einsum("oi,nihw->nohw", sds_reference_weight(sds), perm)
    assert torch.allclose(sds(x), expected, atol=1e-5)


@pytest.mark.parametrize("static", ["kron", "dense"])
def test_sds_gradients_reach_every_parameter(static):
    for cout in (None, 96):
        sds = StaticDynamicShuffle(48, cout, static=static).train()
        x = torch.randn(2, 48, 3, 3)
        (sds(x) * torch.randn_like(sds(x))).sum().add(orthogonal_loss(sds)).backward()
        for name, p in sds.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sds_identity_init_starts_where_the_identity_permutation_sds_starts():
    """``static_init="identity"`` without the permutation computes ``(S + I) x`` at the start:
    the square SDS whose factors are the identity, with the same ``S``."""
    torch.manual_seed(0)
    plain = StaticDynamicShuffle(96, dynamic=False, static="dense", max_group_size=32)
    torch.manual_seed(0)
    eye = StaticDynamicShuffle(
        96, dynamic=False, static="dense", max_group_size=32, static_init="identity"
    )
    sds = StaticDynamicShuffle(96, static="dense", max_group_size=32, hard_identity=True)
    with torch.no_grad():
        sds.static_w.copy_(plain.static_w)
    assert eye.groups == 3 and "static_init='identity'" in repr(eye)
    x = torch.randn(2, 96, 3, 3)
    assert torch.allclose(eye(x), plain(x) + channel_shuffle(x, 3), atol=1e-5)
    assert torch.allclose(eye(x), sds.train()(x), atol=1e-5)
    assert torch.allclose(eye(x), sds.eval()(x), atol=1e-5)
    w = eye.equivalent_weight() - plain.equivalent_weight()  # the cross-shuffled identity
    shuffled_eye = channel_shuffle(torch.eye(96)[None, :, :, None], 3)[0, :, :, 0]
    assert torch.allclose(w, shuffled_eye, atol=1e-6)


def test_sds_identity_init_needs_the_square_dense_form():
    for kwargs in (
        {"out_channels": 96},
        {"static": "kron"},
        {"out_channels": 48, "out_factors": (6, 8)},
    ):
        with pytest.raises(ValueError, match="static_init='identity' needs the square dense"):
            StaticDynamicShuffle(48, static_init="identity", **{"static": "dense", **kwargs})
    # out_channels equal to in_channels is the square form too
    assert StaticDynamicShuffle(48, 48, static="dense", static_init="identity").square
    with pytest.raises(ValueError, match="'eye'"):
        StaticDynamicShuffle(48, static="dense", static_init="eye")


def test_sds_parameters_are_a_fraction_of_the_conv():
    sds = StaticDynamicShuffle(464, dynamic=False)
    assert sum(p.numel() for p in sds.parameters()) == 29 * (16 + 16)
    assert 29 * 32 < 464 * 464 // 100
    # dense blocks: C_out * n_in, the 1x1 convolution's parameters over G
    dense = StaticDynamicShuffle(464, dynamic=False, static="dense")
    assert sum(p.numel() for p in dense.parameters()) == 464 * 464 // 29
    assert dense.static_weight().shape == (464, 16, 1, 1)


def test_sds_bad_arguments():
    with pytest.raises(ValueError, match="out_channels=50"):
        StaticDynamicShuffle(48, 50, groups=3)
    with pytest.raises(ValueError, match=r"out_factors=\(2, 2\)"):
        StaticDynamicShuffle(48, 96, groups=3, out_factors=(2, 2))
    with pytest.raises(ValueError, match="'full'"):
        StaticDynamicShuffle(48, static="full")


# --- factory -------------------------------------------------------------------------------------


def test_factory_names_and_errors():
    assert set(list_mixers()) >= {"shuffle", "none", "learned", "dynamic", "static_dynamic"}
    x = torch.randn(2, 48, 2, 2)
    assert torch.equal(create_mixer("shuffle", 48, shuffle_groups=3)(x), channel_shuffle(x, 3))
    assert create_mixer("shuffle", 48, shuffle_groups=3, groups=8).groups == 8
    with pytest.raises(ValueError, match="positive integer or 'auto', got 'dynamic'"):
        create_mixer("shuffle", 48, groups="dynamic")
    with pytest.raises(ValueError, match="groups=5 does not divide channels=48"):
        create_mixer("shuffle", 48, groups=5)
    assert torch.equal(create_mixer("none", 48)(x), x)
    assert isinstance(create_mixer("dynamic", 48, tau=0.5), DynamicShuffle)
    assert create_mixer(lambda c: ChannelShuffle(4, c), 48).groups == 4
    with pytest.raises(ValueError, match="unknown mixer 'dynamc'; valid: dynamic, learned"):
        create_mixer("dynamc", 48)


def test_extra_repr_mentions_configuration():
    text = repr(DynamicShuffle(116))
    assert "groups=29" in text and "factors=(2, 2)" in text and "mode='ste'" in text


@pytest.mark.parametrize("shared", [True, False])
def test_factor_gradient_contractions_agree_at_model_widths(shared):
    """The two STE backward contractions give the same gradients (116 = 29 groups of 2 x 2)."""
    torch.manual_seed(0)
    x = torch.randn(3, 116, 5, 4).to(memory_format=torch.channels_last)
    g = torch.randn(3, 116, 5, 4)
    grads = []
    for factor_grad in ("pixels", "channels"):
        torch.manual_seed(1)
        layer = DynamicShuffle(116, shared=shared, init="random", factor_grad=factor_grad).train()
        xi = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(layer(xi), [xi, *layer.parameters()], g))
    for got, want in zip(*grads):
        assert torch.allclose(got, want, atol=1e-5)
    assert grads[0][-1].abs().sum() > 0  # the factor gradients are not trivially zero


def _learn_routing(cls, mode: str, steps: int = 200) -> tuple[float, int]:
    """Train a 4-channel layer to swap the two channel pairs exactly when ``x[0] > 0``."""
    torch.manual_seed(0)
    layer = cls(4, groups=1, factors=(2, 2), cross_shuffle=False, mode=mode, min_hidden=16)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    swap = torch.tensor([2, 3, 0, 1])  # A = swap, B = identity

    def target(x):
        return torch.where(x[:, :1] > 0, x[:, swap], x)

    layer.train()
    for _ in range(steps):
        x = torch.randn(256, 4, 1, 1)
        loss = (layer(x) - target(x)).pow(2).mean() + 0.1 * orthogonal_loss(layer)
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    x = torch.randn(4000, 4, 1, 1)
    with torch.no_grad():
        exact = (layer(x) == target(x)).all(dim=(1, 2, 3)).float().mean().item()
        distinct = len(torch.unique(layer.permutation(x), dim=0))
    return exact, distinct


@pytest.mark.parametrize("mode", ["ste", "soft"])
def test_generator_learns_an_input_dependent_permutation(mode):
    """From the identity start, training finds a permutation that depends on the input when the
    loss asks for one (errors only near the decision boundary); an input-independent layer
    cannot, whatever it learns."""
    exact, distinct = _learn_routing(DynamicShuffle, mode)
    assert exact > 0.97 and distinct == 2
    exact, distinct = _learn_routing(LearnedShuffle, mode)
    assert exact < 0.6 and distinct == 1


@pytest.mark.parametrize("factors", [(2, 2), (2, 4), (3, 4), (4, 4), (1, 5)])
def test_shared_choice_is_the_pair_of_nearest_permutations(factors):
    # joint scoring of the factor pairs (few pairs) and separate scoring (4 x 4: 576 pairs), with
    # the joint index table and without it (compact_index), choose what closest_permutation does
    a, b = factors
    torch.manual_seed(a * 10 + b)
    layer = DynamicShuffle(3 * a * b, groups=3, factors=factors, init="random").eval()
    randomize_generator(layer, scale=3.0)
    x = torch.randn(64, 3 * a * b, 2, 2)
    a_mat, b_mat = layer.factor_matrices(x)
    alpha = closest_permutation(a_mat, "exact")
    beta = closest_permutation(b_mat, "exact")
    ref = compose_index(alpha, beta, 3)
    assert len(torch.unique(ref, dim=0)) > 1  # the test sees several choices
    assert torch.equal(layer.permutation(x), ref)
    with compact_index(layer):
        assert torch.equal(layer.permutation(x), ref)
    # the inverses the STE backward uses invert the same factors
    idx, ainv, binv, idx_inv = layer._hard_index(
        *layer._softmax_factors(layer.logits(x)), inverses=True
    )
    if binv is None:  # a == b: both factors in one tensor
        ainv, binv = ainv[:, :, 0], ainv[:, :, 1]
    assert torch.equal(ainv, invert_permutation(alpha))
    assert torch.equal(binv, invert_permutation(beta))
    # ... and the index's own inverse, when the joint table gives it
    assert torch.equal(idx, ref)
    assert (idx_inv is not None) == (layer._index_ab_inv is not None)
    if idx_inv is not None:
        assert torch.equal(idx_inv, invert_permutation(ref))


@pytest.mark.parametrize("mode", ["ste", "soft"])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("groups,factors", [(2, (3, 4)), (6, (2, 2))])  # a != b, a == b
def test_balance_adds_the_gradient_of_its_term(mode, shared, groups, factors):
    """The forward is unchanged; the gradients are those of the task loss plus
    ``balance * (balance_term(A) + balance_term(B)) / 2``."""
    torch.manual_seed(0)
    plain = DynamicShuffle(24, groups, factors, shared=shared, mode=mode, init="random")
    bal = DynamicShuffle(24, groups, factors, shared=shared, mode=mode, init="random", balance=0.7)
    bal.load_state_dict(plain.state_dict())
    assert "balance=0.7" in repr(bal) and "balance" not in repr(plain)
    randomize_generator(plain, scale=1.0)
    bal.load_state_dict(plain.state_dict())
    x = torch.randn(5, 24, 3, 2, requires_grad=True)
    g = torch.randn(5, 24, 3, 2)
    y_bal = bal.train()(x)
    y = plain.train()(x)
    assert torch.equal(y_bal, y)
    params = [x, *bal.parameters()]
    got = torch.autograd.grad((y_bal * g).sum() + bal.last_orthogonal_loss, params)
    a_mat, b_mat = plain.factor_matrices(x)
    extra = 0.7 * (balance_term(a_mat) + balance_term(b_mat)) / 2
    task = (y * g).sum() + plain.last_orthogonal_loss
    without = torch.autograd.grad(task, [x, *plain.parameters()], retain_graph=True)
    want = torch.autograd.grad(task + extra, [x, *plain.parameters()])
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert (got[-1] - without[-1]).abs().max() > 1e-4  # the term moves the generator
    # eval is untouched
    assert torch.equal(bal.eval()(x), plain.eval()(x))


def test_balance_term_spans_one_permutation_to_spread_choices():
    eye = torch.eye(3)
    perms = torch.stack([eye[list(p)] for p in itertools.permutations(range(3))])
    assert balance_term(eye.expand(4, 1, 3, 3)) == pytest.approx(1.0)
    assert balance_term(perms.unsqueeze(1)) == pytest.approx(1 / 3)
    # flat rows do not satisfy it while every sample still chooses the same entries
    flat = torch.full((4, 1, 3, 3), 0.3) + 0.1 * eye
    assert balance_term(flat) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="balance must be a non-negative weight, got -0.5"):
        DynamicShuffle(24, balance=-0.5)
    with pytest.raises(ValueError, match="balance=0.5.*LearnedShuffle cannot"):
        LearnedShuffle(24, balance=0.5)


@pytest.mark.parametrize("cls", [DynamicShuffle, LearnedShuffle])
def test_gumbel_noise_explores_in_training_only(cls):
    torch.manual_seed(0)
    clean = cls(24, groups=2, factors=(3, 4))
    noisy = cls(24, groups=2, factors=(3, 4), noise=3.0)
    noisy.load_state_dict(clean.state_dict())
    assert "noise=3" in repr(noisy)
    x = torch.randn(32, 24, 2, 2)
    # eval: deterministic, and the same permutation as without noise
    clean.eval(), noisy.eval()
    assert torch.equal(noisy.permutation(x), clean.permutation(x))
    assert torch.equal(noisy(x), clean(x))
    # training: the forward is still an exact permutation of each sample, but not always the
    # noise-free choice (per sample for DynamicShuffle, per batch for the static LearnedShuffle)
    noisy.train()
    seen = []
    for _ in range(4):
        xg = x.clone().requires_grad_(True)
        y = noisy(xg)
        idx = (y.detach()[:, :, 0, 0, None] == x[:, None, :, 0, 0]).float().argmax(-1)
        assert is_permutation(idx)
        assert torch.equal(y.detach(), x.gather(1, idx[..., None, None].expand_as(x)))
        seen.append(idx)
    per_call = len(torch.unique(seen[0], dim=0))
    assert per_call > 1 if cls is DynamicShuffle else per_call == 1
    assert (torch.cat(seen) != clean.permutation(x).repeat(4, 1)).any(dim=1).float().mean() > 0.2
    # gradients still reach every parameter through the noisy soft matrices
    (y * torch.randn_like(y)).sum().add(noisy.last_orthogonal_loss).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in noisy.parameters())
    with pytest.raises(ValueError, match="noise must be a non-negative scale, got -1"):
        cls(24, noise=-1)


def test_compact_index_gives_the_same_permutations_and_restores_the_tables():
    torch.manual_seed(0)
    layers = nn.ModuleList([DynamicShuffle(c, init="random") for c in (464, 232)]).eval()
    xs = [torch.randn(6, c, 3, 3) for c in (464, 232)]
    full = [m(x) for m, x in zip(layers, xs)]
    tables = [(m._index_ab, m._index_ab_inv) for m in layers]
    assert all(t is not None and i is not None for t, i in tables)
    with compact_index(layers):
        assert all(m._index_ab is None and m._index_ab_inv is None for m in layers)
        assert all(torch.equal(m(x), y) for m, x, y in zip(layers, xs, full))
    assert all(m._index_ab is t and m._index_ab_inv is i for m, (t, i) in zip(layers, tables))


@pytest.mark.parametrize("cls", [DynamicShuffle, LearnedShuffle])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("groups,factors", [(2, (3, 4)), (6, (2, 2))])
def test_regularizer_value_and_gradient_equal_the_formula(cls, shared, groups, factors):
    """R = mean over samples and groups of ||A A^T - I||^2, plus the same for B."""
    torch.manual_seed(0)
    layer = cls(24, groups=groups, factors=factors, shared=shared, init="random").train()
    if cls is DynamicShuffle:
        randomize_generator(layer, scale=1.0)
    x = torch.randn(5, 24, 2, 2)
    layer(x)
    got = layer.last_orthogonal_loss
    a_mat, b_mat = layer.factor_matrices(x)
    want = orthogonality(a_mat).mean() + orthogonality(b_mat).mean()
    assert torch.allclose(got, want, atol=1e-6)
    params = list(layer.parameters())
    for g, w in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        assert torch.allclose(g, w, atol=1e-6)


# --- parts of a channel concatenation (mix_concat) -----------------------------------------


def _parts(sizes, layout, n=8, h=4, w=5, seed=0):
    torch.manual_seed(seed)
    whole = torch.randn(n, sum(sizes), h, w)
    if layout == "channels_last":
        whole = whole.to(memory_format=torch.channels_last)
    # views into one tensor, like ShuffleNetV2's split halves
    return list(whole.split(list(sizes), dim=1))


@pytest.mark.parametrize("cls", [DynamicShuffle, LearnedShuffle])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize(
    "channels,groups,factors,sizes",
    [
        (24, 2, (3, 4), (12, 12)),
        (24, 6, (2, 2), (5, 19)),
        (116, None, None, (58, 58)),
        (464, None, None, (200, 200, 64)),
    ],
)
def test_parts_in_eval_are_the_gather_of_the_concatenation(
    cls, layout, shared, channels, groups, factors, sizes
):
    """``layer(*parts)`` == one gather of the concatenation with ``layer.permutation(*parts)``."""
    layer = cls(channels, groups=groups, factors=factors, shared=shared, init="random").eval()
    if cls is DynamicShuffle:
        randomize_generator(layer)
    parts = _parts(sizes, layout)
    x = torch.cat(parts, 1)
    with torch.no_grad():
        y = layer(*parts)
    idx = layer.permutation(*parts)
    assert is_permutation(idx)
    if cls is DynamicShuffle:
        assert len({tuple(r) for r in idx.tolist()}) > 1  # the samples differ
    ref = x.gather(1, idx[:, :, None, None].expand_as(x))
    assert torch.equal(y, ref)
    # the layout the concatenation and the gather give
    assert y.stride() == torch.cat(parts, 1).stride()
    # with autograd (the gather of the concatenation itself): the same values
    y_grad = layer(*[p.detach().requires_grad_(True) for p in parts])
    assert torch.equal(y_grad, y)
    # the same logits as pooling the concatenation, up to the order of the additions
    assert torch.allclose(layer.logits(*parts), layer.logits(x), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_pooled_parts_are_the_means_of_the_parts_bit_for_bit(dtype, layout):
    """Outside training the parts' sums are divided once: the numbers of ``mean``, exactly."""
    from dyshuffle.layers.dynamic import _pooled_parts

    parts = [p.to(dtype) for p in _parts((7, 13, 4), layout)]
    parts = [p * 100 + 1 for p in parts]  # means far from 0: rounding shows
    want = torch.cat([p.mean(dim=(2, 3)) for p in parts], dim=1)
    got = _pooled_parts(tuple(parts), training=False)
    assert got.dtype == dtype and torch.equal(got, want)
    # training keeps the per-part means (with their light backward)
    leaves = [p.detach().requires_grad_(True) for p in parts]
    got = _pooled_parts(tuple(leaves), training=True)
    assert torch.equal(got, want)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, leaves, g)
    for p, gp, gz in zip(parts, grads, g.split([7, 13, 4], dim=1)):
        assert torch.allclose(gp, (gz / (p.shape[2] * p.shape[3]))[:, :, None, None].expand_as(p))


@pytest.mark.parametrize(
    "channels,groups,factors,shared",
    [
        (116, None, None, True),
        (232, None, None, True),
        (464, None, None, True),
        (24, 2, (3, 4), False),
        (40, 1, (5, 8), True),
    ],
)
def test_inverse_index_inverts_the_permutation(channels, groups, factors, shared):
    """The scatter path looks up the inverse alone; it inverts the index the gather uses."""
    torch.manual_seed(channels)
    layer = DynamicShuffle(channels, groups=groups, factors=factors, shared=shared).eval()
    randomize_generator(layer)
    x = torch.randn(16, channels, 3, 3)
    idx = layer.permutation(x)
    assert len(torch.unique(idx, dim=0)) > 1
    with torch.no_grad():
        inv = layer._inverse_index(*layer._softmax_factors(layer.logits(x)))
    assert torch.equal(inv.expand_as(idx), invert_permutation(idx))
    with compact_index(layer), torch.no_grad():  # without the joint tables: inverted
        inv = layer._inverse_index(*layer._softmax_factors(layer.logits(x)))
    assert torch.equal(inv.expand_as(idx), invert_permutation(idx))


def test_detached_descriptor_leaves_the_input_only_the_permutations_gradient():
    torch.manual_seed(0)
    kwargs = dict(groups=6, factors=(2, 2), init="random")
    layer = DynamicShuffle(24, **kwargs, descriptor_grad=False).train()
    randomize_generator(layer, scale=1.0)
    attached = DynamicShuffle(24, **kwargs).train()
    attached.load_state_dict(layer.state_dict())
    x = torch.randn(8, 24, 3, 3, requires_grad=True)
    g = torch.randn(8, 24, 3, 3)
    y = layer(x)
    assert torch.equal(y, attached(x))  # the same forward
    params = list(layer.parameters())
    gx, *gp = torch.autograd.grad(y, [x, *params], g)
    idx = layer.permutation(x)
    # the input's gradient: the output's, permuted back, and nothing else
    assert torch.equal(gx, permute_channels(g, invert_permutation(idx)))
    assert all(p.abs().sum() > 0 for p in gp)  # the generator still learns
    gx_attached, *gp_attached = torch.autograd.grad(attached(x), [x, *attached.parameters()], g)
    assert not torch.allclose(gx_attached, gx)  # the descriptor's path, when attached
    assert all(torch.allclose(a, b) for a, b in zip(gp, gp_attached))
    assert "descriptor_grad=False" in repr(layer)


@pytest.mark.parametrize("shared", [True, False])
def test_context_with_the_input_itself_is_the_layer_that_pools_its_input(shared):
    """A layer built with ``context_channels = C`` and given its own input as the context is the
    ordinary layer: the same output, and the same gradients for the input (through both of its
    uses) and every parameter, in STE training; the same permutations in eval, parts included."""
    torch.manual_seed(0)
    kwargs = dict(groups=2, factors=(3, 4), shared=shared, init="random")
    layer = DynamicShuffle(24, **kwargs, context_channels=24).train()
    randomize_generator(layer)
    own = DynamicShuffle(24, **kwargs).train()
    own.load_state_dict(layer.state_dict())
    x = torch.randn(6, 24, 3, 2, requires_grad=True)
    g = torch.randn(6, 24, 3, 2)
    y = layer(x, context=x)
    assert torch.equal(y, own(x))
    got = torch.autograd.grad(y, [x, *layer.parameters()], g)
    want = torch.autograd.grad(own(x), [x, *own.parameters()], g)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))
    layer.eval(), own.eval()
    xe = x.detach().to(memory_format=torch.channels_last)
    assert len({tuple(r) for r in own.permutation(xe).tolist()}) > 1  # inputs choose apart
    with torch.no_grad():
        assert torch.equal(layer(xe, context=xe), own(xe))
        # the parts of a concatenation, kept apart (eager CPU), read the same context
        assert torch.equal(layer(xe[:, :10], xe[:, 10:], context=xe), own(xe))
    assert torch.equal(layer.permutation(xe[:, :10], xe[:, 10:], context=xe), own.permutation(xe))
    assert "context_channels=24" in repr(layer)


@pytest.mark.parametrize("descriptor_grad", [True, False])
def test_context_chooses_the_permutation_of_the_input(descriptor_grad):
    """With a context of another width, the permutation of each sample is a function of its
    context alone (the generator of the pooled context), applied to the input as one exact
    permutation; in STE training the input gets the permutation's gradient alone, the context
    the generator's (none with ``descriptor_grad=False``), every parameter a gradient."""
    torch.manual_seed(0)
    layer = DynamicShuffle(
        24,
        groups=6,
        factors=(2, 2),
        init="random",
        context_channels=10,
        descriptor_grad=descriptor_grad,
    ).eval()
    randomize_generator(layer)
    x, other = torch.randn(8, 24, 3, 3), torch.randn(8, 24, 3, 3)
    context = torch.randn(8, 10, 5, 5) * 3
    with torch.no_grad():
        assert torch.equal(layer.logits(x, context=context), layer.generator(context.mean((2, 3))))
    idx = layer.permutation(x, context=context)
    assert is_permutation(idx) and len(torch.unique(idx, dim=0)) > 1
    assert torch.equal(layer.permutation(other, context=context), idx)  # x does not choose
    assert torch.equal(layer.decide(x, context=context).permutation, idx)
    with torch.no_grad():
        assert torch.equal(layer(x, context=context), permute_channels(x, idx))
    layer.train()
    xg, cg = x.clone().requires_grad_(True), context.clone().requires_grad_(True)
    y = layer(xg, context=cg)
    assert torch.equal(y, permute_channels(x, idx))  # the STE forward is the hard permutation
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(xg.grad, permute_channels(g, invert_permutation(idx)))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    assert (cg.grad is not None and cg.grad.abs().sum() > 0) == descriptor_grad


def test_context_is_checked():
    x = torch.randn(4, 24, 3, 3)
    layer = DynamicShuffle(24, groups=6, factors=(2, 2), context_channels=10)
    with pytest.raises(ValueError, match=r"context_channels=10.*got none"):
        layer(x)
    with pytest.raises(ValueError, match=r"\(N, 10, H, W\).*N = 4, got shape \(4, 12, 3, 3\)"):
        layer(x, context=torch.randn(4, 12, 3, 3))
    with pytest.raises(ValueError, match=r"N = 4, got shape \(3, 10, 3, 3\)"):
        layer.eval().permutation(x, context=torch.randn(3, 10, 3, 3))
    plain = DynamicShuffle(24, groups=6, factors=(2, 2)).eval()  # the fused path checks too
    with pytest.raises(ValueError, match=r"without context_channels.*\(4, 10, 3, 3\)"):
        plain(x.to(memory_format=torch.channels_last), context=torch.randn(4, 10, 3, 3))
    with pytest.raises(ValueError, match=r"context_channels must be a positive integer, got 0"):
        DynamicShuffle(24, context_channels=0)
    with pytest.raises(ValueError, match=r"context_channels=10.*LearnedShuffle does not read"):
        LearnedShuffle(24, context_channels=10)
    with pytest.raises(ValueError, match=r"reads its own input; got context_channels=10"):
        StaticDynamicShuffle(24, context_channels=10)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("groups,factors", [(2, (3, 4)), (6, (2, 2))])  # a != b, a == b
def test_hard_identity_is_the_cross_group_shuffle_with_the_ste_gradient(shared, groups, factors):
    """``hard_identity``: the forward is the fixed G-group shuffle for every input, the gradient
    the straight-through one of identity factors (so the generator and, through the descriptor,
    the input get the dynamic layer's extra gradient)."""
    torch.manual_seed(0)
    kwargs = dict(groups=groups, factors=factors, shared=shared, init="random")
    layer = DynamicShuffle(24, **kwargs, hard_identity=True).train()
    randomize_generator(layer)
    x = torch.randn(6, 24, 3, 2, requires_grad=True)
    nearest = DynamicShuffle(24, **kwargs)
    nearest.load_state_dict(layer.state_dict())
    assert len({tuple(r) for r in nearest.permutation(x).tolist()}) > 1  # they would differ
    y = layer(x)
    assert torch.equal(y, channel_shuffle(x, groups))  # no input is permuted by its factors
    g, grads = check_ste_reference(layer, x, y, torch.eye(factors[0]), torch.eye(factors[1]))
    assert all(p.abs().sum() > 0 for p in grads[1:])  # the generator learns
    assert not torch.allclose(grads[0], channel_shuffle(g, 24 // groups))  # the descriptor's path
    # eval: the fixed shuffle too, on every path (the parts of a channels_last input scatter)
    layer.eval()
    xe = x.detach().to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(layer(xe), channel_shuffle(xe, groups))
        assert torch.equal(layer(xe[:, :12], xe[:, 12:]), channel_shuffle(xe, groups))
    want_idx = channel_shuffle(torch.arange(24).view(1, 24, 1, 1), groups).view(1, 24)
    assert torch.equal(layer.permutation(xe), want_idx.expand(6, -1))
    assert "hard_identity=True" in repr(layer)


def test_permutation_mode_identity_forces_the_identity_factors_and_restores_the_layers():
    """``permutation_mode(model, "identity")``: every dynamic layer of a model (SDS's included)
    applies its identity factors, which is the same weights built with ``hard_identity=True``;
    on leaving, each layer is as it was (a layer built with ``hard_identity`` keeps it)."""
    from dyshuffle.models import create_model

    torch.manual_seed(0)
    kwargs = dict(num_classes=10, stem="cifar", mixer="dynamic", init="random")
    model = create_model("shufflenet_v2_x0_5", **kwargs).eval()
    for m in model.modules():
        if isinstance(m, DynamicShuffle):
            randomize_generator(m)
    forced = create_model("shufflenet_v2_x0_5", **kwargs, hard_identity=True).eval()
    forced.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    layers = [m for m in model.modules() if isinstance(m, DynamicShuffle)]
    with torch.no_grad():
        hard = model(x)
        with permutation_mode(model, "identity") as same:
            assert same is model
            assert all(m.hard_identity and m.eval_permutation == "hard" for m in layers)
            identity = model(x)
        assert torch.equal(identity, forced(x))
        assert not torch.allclose(identity, hard)  # the random generators choose otherwise
        assert torch.equal(model(x), hard)
    assert not any(m.hard_identity for m in layers)
    assert all(m.eval_permutation == "hard" for m in layers)
    # a single layer, and a layer built with hard_identity keeps it in the other modes
    layer = DynamicShuffle(24, groups=6, factors=(2, 2), init="random").eval()
    randomize_generator(layer)
    xl = torch.randn(5, 24, 2, 2)
    assert not torch.equal(layer(xl), channel_shuffle(xl, 6))
    with permutation_mode(layer, "identity"):
        assert torch.equal(layer(xl), channel_shuffle(xl, 6))
    fixed = DynamicShuffle(24, groups=6, factors=(2, 2), hard_identity=True).eval()
    with permutation_mode(fixed, "hard"):
        assert torch.equal(fixed(xl), channel_shuffle(xl, 6))
    assert fixed.hard_identity
    # an SDS's dynamic part is a dynamic layer too
    sds = StaticDynamicShuffle(24, init="random").eval()
    dyn = [m for m in sds.modules() if isinstance(m, DynamicShuffle)]
    with permutation_mode(sds, "identity"):
        assert dyn and all(m.hard_identity for m in dyn)
    assert not any(m.hard_identity for m in dyn)
    with pytest.raises(ValueError, match="'fixed'"):
        with permutation_mode(layer, "fixed"):
            pass


@pytest.mark.parametrize("cls", [DynamicShuffle, LearnedShuffle])
@pytest.mark.parametrize("shared,groups,factors", [(True, 2, (3, 4)), (False, 6, (2, 2))])
def test_logit_cap_bounds_the_softmax_rows_and_keeps_the_ste_gradient(cls, shared, groups, factors):
    """``logit_cap=c``: the factors are ``softmax(c tanh(logits / c) / tau)``, so no row puts more
    than ``1 / (1 + (n - 1) exp(-2 c / tau))`` on one entry however large the logits; the layer
    stays an exact permutation with the straight-through gradient of those factors."""
    torch.manual_seed(0)
    cap, tau = 1.5, 0.5
    kwargs = dict(groups=groups, factors=factors, shared=shared, tau=tau, init="random")
    free, capped = cls(24, **kwargs), cls(24, **kwargs, logit_cap=cap)
    if cls is DynamicShuffle:
        randomize_generator(free, scale=1.0)
    capped.load_state_dict(free.state_dict())
    assert f"logit_cap={cap:g}" in repr(capped) and "logit_cap" not in repr(free)
    x = torch.randn(5, 24, 3, 2)
    # the capped factors are the softmax of the capped logits
    logits = free.logits(x).reshape(-1, capped.factor_groups, sum(n * n for n in factors))
    la, lb = (cap * torch.tanh(logits / cap) / tau).split([n * n for n in factors], dim=-1)
    got = capped.factor_matrices(x)
    for m, lg, n in zip(got, (la, lb), factors):
        assert torch.allclose(m, torch.softmax(lg.unflatten(-1, (n, n)), -1), atol=1e-6)
    # logits scaled far up: the free softmax saturates, the capped one stays under its bound
    with torch.no_grad():
        for p in free.parameters():
            p.mul_(100.0)
    capped.load_state_dict(free.state_dict())
    for m_free, m_cap, n in zip(free.factor_matrices(x), capped.factor_matrices(x), factors):
        bound = 1.0 / (1.0 + (n - 1) * torch.exp(torch.tensor(-2.0 * cap / tau)))
        assert m_cap.max() <= bound + 1e-6
        assert m_free.max() > bound + 1e-3
    # moderate logits: an exact permutation of each sample, gradients as the dense STE reference
    capped.load_state_dict(cls(24, **kwargs).state_dict())
    if cls is DynamicShuffle:
        randomize_generator(capped, scale=1.0)
    capped.train()
    xg = x.clone().requires_grad_(True)
    y = capped(xg)
    alpha, beta = capped._hard_factors(*capped.factor_matrices(xg))
    one_hot = torch.nn.functional.one_hot
    _, grads = check_ste_reference(
        capped, xg, y, one_hot(alpha, factors[0]), one_hot(beta, factors[1])
    )
    assert all(g.abs().sum() > 0 for g in grads)
    capped.eval()
    idx = capped.permutation(x)
    assert is_permutation(idx)
    assert torch.equal(capped(x), x.gather(1, idx[..., None, None].expand_as(x)))


@pytest.mark.parametrize("shared,groups,factors", [(True, 2, (3, 4)), (False, 6, (2, 2))])
def test_descriptor_norm_standardizes_the_generator_input_over_the_batch(shared, groups, factors):
    """``descriptor_norm``: in training the generator sees the channel means standardized over the
    batch (and the STE gradient is that of the dense reference through them); in ``eval()`` the
    running statistics, so each sample's permutation is the one it gets alone."""
    torch.manual_seed(0)
    layer = DynamicShuffle(24, groups=groups, factors=factors, shared=shared, descriptor_norm=True)
    randomize_generator(layer, scale=1.0)
    assert "descriptor_norm=True" in repr(layer)
    seen = []
    layer.generator.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    # channel means far from zero that vary little across images, as after a ReLU
    x = (3.0 + 0.3 * torch.randn(16, 24, 1, 1) + 0.1 * torch.randn(16, 24, 3, 2)).requires_grad_()
    layer.train()
    y = layer(x)
    d = seen[-1]
    assert torch.allclose(d.mean(0), torch.zeros(24), atol=1e-5)
    assert torch.allclose(d.var(0, unbiased=False), torch.ones(24), atol=1e-3)
    alpha, beta = layer._hard_factors(*layer.factor_matrices(x))
    one_hot = torch.nn.functional.one_hot
    _, grads = check_ste_reference(
        layer, x, y, one_hot(alpha, factors[0]), one_hot(beta, factors[1])
    )
    assert all(g.abs().sum() > 0 for g in grads)
    # eval: running statistics; a sample's permutation does not depend on its batch
    for _ in range(50):
        layer(x)
    layer.eval()
    xe = x.detach()
    idx = layer.permutation(xe)
    assert is_permutation(idx) and len({tuple(r) for r in idx.tolist()}) > 1
    alone = torch.cat([layer.permutation(xe[i : i + 1]) for i in range(16)])
    assert torch.equal(idx, alone)
    with torch.no_grad():
        assert torch.equal(layer(xe), xe.gather(1, idx[..., None, None].expand_as(xe)))
    with pytest.raises(ValueError, match="descriptor_norm=True .*LearnedShuffle"):
        LearnedShuffle(24, descriptor_norm=True)


@pytest.mark.parametrize("cap", [0, -1.0, float("inf"), float("nan")])
def test_logit_cap_rejects_non_positive_or_infinite_values(cap):
    with pytest.raises(ValueError, match=f"logit_cap must be a positive finite number.*{cap!r}"):
        DynamicShuffle(24, logit_cap=cap)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_parts_in_training_match_the_concatenation(layout):
    layer = DynamicShuffle(24, groups=6, factors=(2, 2), init="random").train()
    randomize_generator(layer, scale=1.0)
    parts = [p.detach().requires_grad_(True) for p in _parts((10, 14), layout)]
    x = torch.cat([p.detach() for p in parts], 1).requires_grad_(True)
    y, ref = layer(*parts), layer(x)  # training concatenates first: the same computation
    assert torch.equal(y, ref)
    g = torch.randn_like(y)
    params = list(layer.parameters())
    grads = torch.autograd.grad(y, [*parts, *params], g)
    ref_grads = torch.autograd.grad(ref, [x, *params], g)
    assert torch.equal(torch.cat(grads[:2], 1), ref_grads[0])
    assert all(torch.equal(got, want) for got, want in zip(grads[2:], ref_grads[1:]))


def test_parts_are_concatenated_first_off_the_parts_devices(monkeypatch):
    import dyshuffle.layers.dynamic as dynamic_module

    layer = DynamicShuffle(24, groups=6, factors=(2, 2), init="random").eval()
    randomize_generator(layer)
    parts = _parts((12, 12), "channels_last")
    x = torch.cat(parts, 1)
    monkeypatch.setattr(dynamic_module, "PARTS_DEVICES", set())
    with torch.no_grad():
        assert torch.equal(layer(*parts), layer(x))
    assert torch.equal(layer.logits(*layer._inputs(parts[0], tuple(parts[1:]))), layer.logits(x))


def test_parts_are_checked_and_hooks_see_them():
    from dyshuffle.layers import mix_concat

    layer = DynamicShuffle(24).eval()
    with pytest.raises(ValueError, match="built for 24 channels, got parts with 20"):
        layer(torch.randn(1, 10, 2, 2), torch.randn(1, 10, 2, 2))
    with pytest.raises(ValueError, match=r"same N, H and W.*\(1, 12, 2, 2\), \(1, 12, 3, 2\)"):
        layer(torch.randn(1, 12, 2, 2), torch.randn(1, 12, 3, 2))
    seen = []
    layer.register_forward_pre_hook(lambda m, args: seen.append(len(args)))
    parts = _parts((12, 12), "channels_last")
    mix_concat(layer, parts)
    assert seen == [2]
    # a mixer without accepts_parts gets the concatenation
    shuffle = ChannelShuffle(2)
    shuffle.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    assert torch.equal(mix_concat(shuffle, parts), channel_shuffle(torch.cat(parts, 1), 2))
    assert seen[-1] == (8, 24, 4, 5)


def test_traced_graphs_keep_the_concatenation_and_one_gather():
    layer = DynamicShuffle(24, groups=6, factors=(2, 2), init="random").eval()
    randomize_generator(layer)
    parts = _parts((12, 12), "channels_last")
    traced = torch.jit.trace(layer, tuple(parts))
    graph = str(traced.graph)
    assert "aten::gather" in graph and "scatter" not in graph
    with torch.no_grad():
        assert torch.equal(traced(*parts), layer(*parts))


def brute_force_margin(a_mat: torch.Tensor, b_mat: torch.Tensor) -> torch.Tensor:
    """Per sample, the smallest gap between the best and second best ``<M, P>`` over all
    permutations ``P`` of each factor matrix ``M`` (every group, both factors)."""
    gaps = []
    for m in (a_mat, b_mat):
        n = m.shape[-1]
        scores = torch.stack(
            [m[..., torch.arange(n), list(p)].sum(-1) for p in itertools.permutations(range(n))],
            dim=-1,
        )  # (N, Gf, n!)
        top = scores.sort(dim=-1, descending=True).values
        gaps.append((top[..., 0] - top[..., 1]).amin(-1))
    return torch.stack(gaps).amin(0)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("groups,factors", [(2, (3, 4)), (3, (2, 2))])
def test_decision_margin_is_the_score_gap_to_the_next_permutation(shared, groups, factors):
    a, b = factors
    layer = DynamicShuffle(groups * a * b, groups=groups, factors=factors, shared=shared).eval()
    randomize_generator(layer, scale=3.0)
    x = torch.randn(32, groups * a * b, 3, 3)
    margin = layer.decision_margin(x)
    a_mat, b_mat = layer.factor_matrices(x)
    assert margin.shape == (32,)
    assert torch.allclose(margin, brute_force_margin(a_mat, b_mat), atol=1e-6)
    assert (margin >= 0).all() and (margin <= 2 + 1e-6).all()
    assert margin.std() > 0  # the inputs move it
    # factors that are permutation matrices (saturated identity logits): the largest gap, 2
    nn.init.zeros_(layer.generator[-1].weight)
    layer.generator[-1].bias.data.copy_(20.0 * layer._identity_bias())
    assert torch.allclose(layer.decision_margin(x), torch.full((32,), 2.0), atol=1e-5)


def test_decision_margin_of_factors_wider_than_the_tables():
    # 8 x 8 factors (max_group_size 64): binarized greedily, no candidate table
    layer = DynamicShuffle(192, max_group_size=64).eval()
    assert (layer.a, layer.b) == (8, 8) and layer._onehot_t_a is None
    x = torch.randn(6, 192, 3, 3)
    # the default initialization, sharp identity logits: a clear choice, the same for every input
    margin = layer.decision_margin(x)
    assert torch.isfinite(margin).all() and (margin > 0.5).all() and (margin <= 2).all()
    # saturated: permutation matrices, the largest gap
    nn.init.zeros_(layer.generator[-1].weight)
    layer.generator[-1].bias.data.copy_(20.0 * layer._identity_bias())
    assert torch.allclose(layer.decision_margin(x), torch.full((6,), 2.0), atol=1e-5)
    assert torch.allclose(layer.decide(x).margin, torch.full((6,), 2.0), atol=1e-5)


def test_optimal_assignment_in_the_layer():
    # 8 x 8 factors far from permutations: the greedy choice misses the nearest permutation of
    # some; "optimal" applies the nearest one, as an exact permutation, and trains (STE)
    torch.manual_seed(0)
    greedy = DynamicShuffle(192, max_group_size=64, reduction=4).eval()
    randomize_generator(greedy, scale=0.5)
    optimal = DynamicShuffle(192, max_group_size=64, reduction=4, assignment="optimal").eval()
    optimal.load_state_dict(greedy.state_dict())
    x = torch.randn(16, 192, 3, 3)
    a_mat, b_mat = optimal.factor_matrices(x)
    alpha, beta = optimal._hard_factors(a_mat, b_mat)
    for f, chosen in ((a_mat, alpha), (b_mat, beta)):
        assert torch.allclose(score_of(f, chosen), scipy_optimum(f), atol=1e-9)
    assert (greedy.decision_margin(x) < 0).any()  # the greedy choice missed for some inputs
    assert (optimal.decision_margin(x) >= 0).all()
    idx = optimal.permutation(x)
    assert is_permutation(idx) and not torch.equal(idx, greedy.permutation(x))
    with torch.no_grad():
        assert torch.equal(optimal(x), x.gather(1, idx[..., None, None].expand_as(x)))
    optimal.train()
    optimal(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in optimal.parameters())


def test_decision_margin_edge_cases():
    # uniform softmax factors (zero logits): every permutation ties
    layer = DynamicShuffle(24, groups=2, factors=(3, 4)).eval()
    nn.init.zeros_(layer.generator[-1].weight)
    nn.init.zeros_(layer.generator[-1].bias)
    x = torch.randn(5, 24, 2, 2)
    assert torch.equal(layer.decision_margin(x), torch.zeros(5))
    # the learned static permutation: one margin for every input
    learned = LearnedShuffle(24, groups=2, factors=(3, 4), init="random").eval()
    m = learned.decision_margin(x)
    assert m.shape == (5,) and (m == m[0]).all() and 0 < m[0] <= 2
    # factors of size 1 only: nothing to decide; without tables (greedy): unknown
    assert torch.isinf(DynamicShuffle(4, groups=4, factors=(1, 1)).decision_margin(x[:, :4])).all()
    # greedy binarization: the gap of the permutation the greedy choice applies
    greedy = DynamicShuffle(24, groups=2, factors=(3, 4), assignment="greedy").eval()
    randomize_generator(greedy, scale=3.0)
    a_mat, b_mat = greedy.factor_matrices(x)
    want = torch.stack(
        [
            brute_force_gap(f, closest_permutation(f, "greedy")).amin(-1).float()
            for f in (a_mat, b_mat)
        ]
    ).amin(0)
    assert torch.allclose(greedy.decision_margin(x), want, atol=1e-6)


@pytest.mark.parametrize("cls", [DynamicShuffle, LearnedShuffle])
@pytest.mark.parametrize("shared", [True, False])
def test_decide_gives_the_applied_permutation_factors_and_margins_at_once(cls, shared):
    layer = cls(24, groups=2, factors=(3, 4), shared=shared, init="random").eval()
    if cls is DynamicShuffle:
        randomize_generator(layer, scale=3.0)
    parts = _parts((12, 12), "channels_last")
    x = torch.cat(parts, 1)
    got = layer.decide(*parts)
    a_mat, b_mat = layer.factor_matrices(x)
    assert torch.equal(got.a, a_mat) and torch.equal(got.b, b_mat)
    assert got.permutation.shape == (8, 24) and is_permutation(got.permutation)
    with torch.no_grad():  # the permutation the layer applies, to the parts or the whole
        want = x.gather(1, got.permutation[..., None, None].expand_as(x))
        assert torch.equal(layer(*parts), want) and torch.equal(layer(x), want)
    assert torch.allclose(got.margin, brute_force_margin(a_mat, b_mat).expand(8), atol=1e-6)
    if cls is DynamicShuffle:
        assert len({tuple(r) for r in got.permutation.tolist()}) > 1  # inputs choose apart


@pytest.mark.parametrize("assignment", ["greedy", "optimal"])
@pytest.mark.parametrize("factors", [(8, 8), (3, 8)])
def test_decide_binarizes_factors_without_a_table_once(assignment, factors, monkeypatch):
    # 8 x 8 factors have no table: decide gives the permutation and the margin of the one
    # binarization it made (a 3 x 3 factor's table choice needs none)
    a, b = factors
    layer = DynamicShuffle(2 * a * b, groups=2, factors=factors, assignment=assignment).eval()
    randomize_generator(layer, scale=0.5)
    x = torch.randn(6, 2 * a * b, 3, 3)
    want = layer.permutation(x), layer.decision_margin(x)
    calls = []

    def counted(m, *args, **kwargs):
        calls.append(m.shape[-1])
        return closest_permutation(m, *args, **kwargs)

    monkeypatch.setattr(dynamic_module, "closest_permutation", counted)
    got = layer.decide(x)
    assert sorted(calls) == sorted(factors)  # one call per factor, none again for the margin
    assert torch.equal(got.permutation, want[0]) and is_permutation(got.permutation)
    assert torch.allclose(got.margin, want[1]) and got.margin.shape == (6,)
    if assignment == "optimal":
        assert (got.margin >= 0).all()
