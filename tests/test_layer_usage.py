"""The layers as drop-in modules: empty batches, copies, in-place neighbours, subclasses, export."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from dyshuffle import DynamicShuffle, LearnedShuffle, StaticDynamicShuffle
from dyshuffle.layers import choose_groups, compact_index

MIXERS = [
    (DynamicShuffle, {}),
    (DynamicShuffle, {"shared": False}),
    (DynamicShuffle, {"mode": "soft"}),
    (DynamicShuffle, {"max_group_size": 64}),  # 8 x 8 factors: greedy binarization
    (LearnedShuffle, {}),
    (StaticDynamicShuffle, {}),
]


def layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("cls, kwargs", MIXERS)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_an_empty_batch_gives_an_empty_output(cls, kwargs, training, channels_last):
    layer = cls(64, **kwargs).train(training)
    x = layout(torch.randn(0, 64, 4, 4), channels_last).requires_grad_(training)
    y = layer(x)
    assert y.shape == (0, 64, 4, 4)
    if training:
        y.sum().backward()
        assert x.grad.shape == x.shape
    if isinstance(layer, DynamicShuffle):
        assert layer.eval().permutation(x.detach()).shape == (0, 64)


@pytest.mark.parametrize("cls, kwargs", MIXERS)
def test_a_layer_copies_after_a_training_step(cls, kwargs):
    """The regularizer of the last training forward holds its graph; copies start without it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(48, 48, 1), cls(48, **kwargs))
    x = torch.randn(2, 48, 4, 4)
    model(x).sum().backward()
    for twin in (copy.deepcopy(model), torch.optim.swa_utils.AveragedModel(model).module):
        layers = [m for m in twin.modules() if isinstance(m, DynamicShuffle)]
        assert layers and all(m.last_orthogonal_loss is None for m in layers)
        twin.eval()
        torch.testing.assert_close(twin(x), model.eval()(x), rtol=0, atol=0)
        model.train()
    kept = [m for m in model.modules() if isinstance(m, DynamicShuffle)]
    assert all(m.last_orthogonal_loss is not None for m in kept)  # the original keeps its own


@pytest.mark.parametrize("cls, kwargs", MIXERS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_an_in_place_operation_may_follow_the_layer_when_its_output_is_not_saved(
    cls, kwargs, channels_last
):
    """In eval with an input that needs its gradient (saliency, attacks) nothing keeps the
    output, so ``nn.ReLU(inplace=True)`` after the layer gives the out-of-place gradients."""
    torch.manual_seed(0)
    layer = cls(48, **kwargs).eval()
    x = layout(torch.randn(3, 48, 5, 5), channels_last)
    grads = []
    for relu in (nn.ReLU(inplace=True), nn.ReLU()):
        xi = x.clone().requires_grad_(True)
        y = relu(layer(xi))
        y.pow(2).sum().backward()
        grads.append((y.detach(), xi.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


STE_MIXERS = [(c, k) for c, k in MIXERS if c is not StaticDynamicShuffle and "mode" not in k]


@pytest.mark.parametrize("cls, kwargs", STE_MIXERS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_an_in_place_operation_on_the_ste_output_is_autograds_in_place_error(
    cls, kwargs, channels_last
):
    """STE training keeps the output for the factors' gradient (as ``torch.sigmoid`` does): an
    in-place change of it is reported by autograd's version check, not a view error."""
    model = nn.Sequential(nn.Conv2d(48, 48, 1), cls(48, **kwargs), nn.ReLU(inplace=True)).train()
    y = model(layout(torch.randn(3, 48, 5, 5), channels_last))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_a_subclass_with_its_own_generator_never_takes_the_fused_kernel():
    class MaxPooled(DynamicShuffle):
        def logits(self, x, *parts):
            return self.generator(torch.cat((x, *parts), 1).amax((2, 3)))

    class Renamed(DynamicShuffle):  # nothing of the generator changed: the kernel stays
        pass

    assert not MaxPooled._fused_generator and Renamed._fused_generator
    assert not LearnedShuffle._fused_generator
    torch.manual_seed(0)
    layer = MaxPooled(48, init="random").eval()
    with torch.no_grad():
        for p in layer.generator.parameters():
            p.mul_(10)
    x = torch.randn(8, 48, 6, 6)
    idx = layer.permutation(x)
    assert len({tuple(r) for r in idx.tolist()}) > 1  # the max-pooled generator decides
    expected = x.gather(1, idx[:, :, None, None].expand_as(x))
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        torch.testing.assert_close(layer(inp), expected, rtol=0, atol=0)


@pytest.mark.parametrize("cls, kwargs", [(c, k) for c, k in MIXERS if k.get("mode") != "soft"])
def test_torch_export_of_a_bare_layer(cls, kwargs):
    """The layer as the root module (torch 2.14's export fails on a root with ``None``
    buffers), also with its joint tables dropped by :func:`compact_index`."""
    torch.manual_seed(0)
    layer = cls(48, **kwargs).eval()
    assert all(b is not None for _, b in layer.named_buffers())
    x = torch.randn(3, 48, 4, 4)
    program = torch.export.export(layer, (x,))
    torch.testing.assert_close(program.module()(x), layer(x), rtol=0, atol=0)
    if isinstance(layer, DynamicShuffle) and layer._index_ab is not None:
        with compact_index(layer):
            assert layer._index_ab is None and layer._index_ab_inv is None
            program = torch.export.export(layer, (x,))
        assert "_index_ab" in layer._buffers and layer._index_ab is not None
        torch.testing.assert_close(program.module()(x), layer(x), rtol=0, atol=0)


def test_integer_arguments_may_be_numpy_integers_but_not_bools():
    assert choose_groups(np.int64(48), np.int64(4), (np.int32(3), np.int64(4))) == (4, 3, 4)
    assert all(type(v) is int for v in choose_groups(48, np.int64(4)))
    with pytest.raises(ValueError, match="groups=True"):
        DynamicShuffle(48, groups=True)
    with pytest.raises(ValueError, match=r"groups=2\.0"):
        DynamicShuffle(48, groups=2.0)
    with pytest.raises(ValueError, match="two positive integers"):
        DynamicShuffle(48, factors=(True, 48))


def test_rectangular_sds_lists_the_groups_that_divide_both_widths():
    with pytest.raises(
        ValueError,
        match=r"in_channels=48 and out_channels=36; valid groups: "
        r"\[1, 2, 3, 4, 6, 12\]",
    ):
        StaticDynamicShuffle(48, 36, groups=8)
    assert StaticDynamicShuffle(48, 36, groups=6).groups == 6
