"""The layers as drop-in modules: empty batches, copies, in-place neighbours, subclasses, export."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dyshuffle import DynamicShuffle, LearnedShuffle, StaticDynamicShuffle
from dyshuffle.layers import (
    channel_shuffle,
    choose_groups,
    compact_index,
    fused,
    fused_cpu,
    permutation_mode,
)

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


def randomized(layer: DynamicShuffle) -> DynamicShuffle:
    """Large random generator weights, so that different inputs choose different permutations."""
    with torch.no_grad():
        for p in layer.generator.parameters():
            nn.init.normal_(p, 0.0, 3.0 / p.shape[-1] ** 0.5)
    return layer


def distinct(idx: torch.Tensor) -> int:
    return len({tuple(r) for r in idx.tolist()})


@pytest.mark.parametrize("cls", [DynamicShuffle, StaticDynamicShuffle])
def test_inspection_in_training_leaves_the_running_statistics_alone(cls):
    """``permutation``, ``factor_matrices``, ``decision_margin`` and ``decide`` in ``train()``
    with ``descriptor_norm``: the batch's statistics, as the training forward, and no update of
    the running ones (nor of ``num_batches_tracked``)."""
    torch.manual_seed(0)
    model = cls(24, descriptor_norm=True).train()
    layer = model if cls is DynamicShuffle else model.permute
    randomized(layer)
    x = 3.0 + torch.randn(8, 24, 4, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = layer.permutation(x)
    a_mat, b_mat = layer.factor_matrices(x)
    margin = layer.decision_margin(x)
    decision = layer.decide(x)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert torch.equal(decision.permutation, idx) and torch.equal(decision.margin, margin)
    assert torch.equal(decision.a, a_mat) and torch.equal(decision.b, b_mat)
    # what they report is what the training forward does with this batch
    with torch.no_grad():
        y = layer(x)
    assert distinct(idx) > 1
    assert torch.equal(y, x.gather(1, idx[:, :, None, None].expand_as(x)))
    assert layer.descriptor_bn.num_batches_tracked.item() == 1  # the forward's update alone


SOFT_MIXERS = [
    (DynamicShuffle, {"mode": "soft"}),
    (DynamicShuffle, {"mode": "soft", "shared": False, "groups": 4, "factors": (3, 4)}),
    (StaticDynamicShuffle, {"mode": "soft"}),
    (StaticDynamicShuffle, {"out_channels": 96, "mode": "soft"}),
]


@pytest.mark.parametrize("cls, kwargs", SOFT_MIXERS)
@pytest.mark.parametrize("training", [True, False])
def test_soft_matrices_keep_the_memory_format_of_the_input(cls, kwargs, training):
    """``"soft"`` training and soft evaluation (``permutation_mode``) give a channels_last output
    for a channels_last input, as the gather does, with the values and gradients of NCHW."""
    torch.manual_seed(0)
    layer = cls(48, **kwargs).train(training)
    x = torch.randn(3, 48, 5, 4)
    results = []
    with permutation_mode(layer, "soft"):
        for channels_last in (False, True):
            xi = layout(x, channels_last).requires_grad_()
            y = layer(xi)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            assert y.is_contiguous(memory_format=fmt)
            weights = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
            (grad,) = torch.autograd.grad(y, xi, weights)
            results.append((y, grad))
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("training,mode", [(False, "ste"), (True, "ste"), (True, "soft")])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_a_bfloat16_input_of_a_float32_layer_is_taken_on_every_path(
    training, mode, channels_last, autocast
):
    """As on the fused kernel's path (eval, channels_last): the generator in float32, the output
    in the input's dtype, a permutation of its values in eval and STE training; the gradients in
    the dtypes of what they are the gradients of. With autocast too."""
    torch.manual_seed(0)
    layer = randomized(DynamicShuffle(48, mode=mode)).train(training)
    x32 = torch.randn(6, 48, 5, 4).to(torch.bfloat16).float()  # values that bf16 holds exactly
    x = layout(x32.to(torch.bfloat16), channels_last).requires_grad_(training)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
        idx = layer.permutation(x)
    assert y.dtype == torch.bfloat16 and distinct(idx) > 1
    if not autocast:  # the float32 generator decides as for the float32 values
        assert torch.equal(idx, layer.permutation(x32))
    if mode == "ste":
        assert torch.equal(y, x.detach().gather(1, idx[:, :, None, None].expand_as(x)))
    else:
        torch.testing.assert_close(y.float(), layer(x32), atol=0.05, rtol=0.02)
    if training:
        y.float().pow(2).sum().backward()
        assert x.grad.dtype == torch.bfloat16 and x.grad.abs().sum() > 0
        grads = [p.grad for p in layer.generator.parameters()]
        assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


needs_cpu_kernel = pytest.mark.skipif(
    fused._INTERPRETED or not fused.ENABLED or fused_cpu._compiler() is None,
    reason="the C kernel is not used under Triton's interpreter, with DYSHUFFLE_FUSED=0 or "
    "without a C compiler",
)


@needs_cpu_kernel
@pytest.mark.parametrize("autocast", [False, True])
def test_the_cpu_kernel_and_the_pytorch_path_agree_on_a_bfloat16_input(autocast):
    torch.manual_seed(0)
    layer = randomized(DynamicShuffle(48)).eval()
    x = torch.randn(16, 48, 5, 4).to(torch.bfloat16, memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert layer._fusable(x, ())
        out = layer(x)
        layer.fused = False
        ref, idx = layer(x), layer.permutation(x)
    assert out.dtype == ref.dtype == torch.bfloat16 and distinct(idx) > 1
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, ref)
    assert torch.equal(ref, x.gather(1, idx[:, :, None, None].expand_as(x)))


@needs_cpu_kernel
def test_nan_inputs_get_the_identity_factors_on_the_kernel_and_the_pytorch_path():
    """A NaN in a sample makes its scores NaN; both paths then choose the first candidates, the
    identity factors, so its NaNs land in the same channels (the fixed cross-group shuffle's)."""
    torch.manual_seed(0)
    layer = randomized(DynamicShuffle(48, init="random")).eval()
    x = torch.randn(6, 48, 5, 4).contiguous(memory_format=torch.channels_last)
    x[1, 7, 2, 3] = float("nan")
    x[4, 40, 0, 0] = float("nan")
    with torch.no_grad():
        assert layer._fusable(x, ())
        out = layer(x)
        layer.fused = False
        ref = layer(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    fixed = channel_shuffle(x, layer.groups)
    for i in range(6):
        same = torch.equal(ref[i].nan_to_num(7.0), fixed[i].nan_to_num(7.0))
        assert same == (i in (1, 4)), i  # the other samples keep their own choices


def randomized_mixer(cls, **kwargs) -> nn.Module:
    layer = cls(48, **kwargs)
    randomized(layer if isinstance(layer, DynamicShuffle) else layer.permute)
    return layer


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("cls", [DynamicShuffle, StaticDynamicShuffle])
@pytest.mark.parametrize("channels_last", [False, True])
def test_graphs_traced_in_grad_mode_give_the_input_its_gradient(cls, channels_last, tmp_path):
    """``torch.export.export(..., strict=True)`` and ``torch.jit.trace`` of an eval model in grad
    mode, whose layer's input needs its gradient: the graphs hold the plain gather, so the
    exported module gives the input the eager gradient (strict export traced the autograd
    Function's forward with autograd off: no gradient) and the traced one can be saved."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(48, 48, 1), randomized_mixer(cls)).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(4, 48, 5, 3).contiguous(memory_format=fmt)
    dynamic = model[1] if cls is DynamicShuffle else model[1].permute
    assert distinct(dynamic.permutation(model[0](x))) > 1
    program = torch.export.export(model, (x,), strict=True).module()
    torch.jit.save(torch.jit.trace(model, (x,), check_trace=False), str(tmp_path / "m.ts"))
    traced = torch.jit.load(str(tmp_path / "m.ts"))
    results = []
    for run in (model, program, traced):
        xi = x.clone().requires_grad_(True)
        y = run(xi)
        (grad,) = torch.autograd.grad(y, xi, torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        results.append((y, grad))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=0)


@needs_cpu_kernel
@pytest.mark.parametrize("cls", [DynamicShuffle, StaticDynamicShuffle])
def test_an_eval_layer_compiled_in_grad_mode_takes_the_cpu_kernel(cls):
    """An input that needs no gradient, trainable weights, grad mode: the compiled layer's
    kernel gets the generator detached (an operator without a derivative given trainable
    weights did not compile) and gives the eager output; SDS's static weights get their
    gradients."""
    torch.manual_seed(0)
    layer = randomized_mixer(cls).eval()
    dynamic = layer if cls is DynamicShuffle else layer.permute
    x = torch.randn(8, 48, 5, 3).contiguous(memory_format=torch.channels_last)
    assert dynamic._fusable(x, ()) and distinct(dynamic.permutation(x)) > 1
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y, ref = compiled(x), layer(x)
    assert torch.equal(y, ref)
    # (the bare layer's hard permutation has no gradient; SDS's static part has)
    assert y.requires_grad == ref.requires_grad == (cls is StaticDynamicShuffle)
    if y.requires_grad:
        params = [p for p in layer.parameters() if p.requires_grad]
        got = torch.autograd.grad(y.pow(2).sum(), params, allow_unused=True)
        expected = torch.autograd.grad(ref.pow(2).sum(), params, allow_unused=True)
        assert got[0] is not None
        for g, e in zip(got, expected):
            assert (g is None) == (e is None)
            if g is not None:
                torch.testing.assert_close(g, e)


def _functional_net(cls, kwargs):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 48, 1), cls(48, **kwargs), nn.Conv2d(48, 5, 1))


def _loss(model, params, x, target):
    from dyshuffle import orthogonal_loss

    out = torch.func.functional_call(model, params, (x,)).mean((2, 3))
    return F.cross_entropy(out, target) + 0.1 * orthogonal_loss(model)


@pytest.mark.parametrize("cls, kwargs", MIXERS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_func_grad_equals_autograd(cls, kwargs, channels_last):
    """``torch.func.grad`` runs the layers' autograd Functions (straight-through estimator
    included) and gives autograd's gradients, also to the input."""
    model = _functional_net(cls, kwargs).train()
    x = layout(torch.randn(4, 3, 5, 5), channels_last)
    target = torch.tensor([0, 1, 2, 3])
    params = {k: v.detach() for k, v in model.named_parameters()}
    got, got_x = torch.func.grad(lambda p, x: _loss(model, p, x, target), argnums=(0, 1))(params, x)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    xr = x.clone().requires_grad_()
    _loss(model, leaves, xr, target).backward()
    for k, v in leaves.items():
        torch.testing.assert_close(got[k], v.grad, msg=k)
    torch.testing.assert_close(got_x, xr.grad)
    assert any(got[k].abs().sum() > 0 for k in got if k.startswith("1."))  # the mixer learns


@pytest.mark.parametrize("cls, kwargs", MIXERS)
def test_per_sample_gradients_with_vmap_equal_one_backward_per_sample(cls, kwargs):
    """``vmap(grad(...))``, the per-sample gradients of differential privacy and of influence
    functions, equals one autograd backward per sample."""
    model = _functional_net(cls, kwargs).train()
    x = torch.randn(3, 3, 5, 5)
    target = torch.tensor([0, 4, 2])
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, ti):
        return _loss(model, p, xi[None], ti[None])

    got = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, x, target)
    for i in range(3):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        one(leaves, x[i], target[i]).backward()
        for k, v in leaves.items():
            torch.testing.assert_close(got[k][i], v.grad, msg=f"{k}, sample {i}")


@pytest.mark.parametrize("cls, kwargs", MIXERS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_vmap_in_evaluation_equals_the_batched_call(cls, kwargs, channels_last):
    """Under ``vmap`` the layer leaves its kernels (no batching rule) for PyTorch operators."""
    layer = cls(48, **kwargs).eval()
    x = layout(torch.randn(4, 48, 5, 5), channels_last)
    with torch.no_grad():
        got = torch.func.vmap(lambda xi: layer(xi[None])[0])(x)
        torch.testing.assert_close(got, layer(x), rtol=0, atol=0)


def test_torch_func_grad_of_a_whole_model_equals_autograd():
    """The functorch recipe for a network with BatchNorm: buffers passed in, gradients as
    autograd's, for ShuffleNetV2 with dynamic shuffles on channels_last input."""
    from dyshuffle import orthogonal_loss
    from dyshuffle.models import create_model

    torch.manual_seed(0)
    model = create_model("shufflenet_v2_x0_5", num_classes=10, stem="cifar", mixer="dynamic")
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    target = torch.tensor([0, 1, 2, 3])
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def loss(p, b):
        out = torch.func.functional_call(model, (p, b), (x,))
        return F.cross_entropy(out, target) + 0.1 * orthogonal_loss(model)

    got = torch.func.grad(loss)(params, {k: v.clone() for k, v in buffers.items()})
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss(leaves, buffers).backward()
    for k, v in leaves.items():
        torch.testing.assert_close(got[k], v.grad, msg=k)


@pytest.mark.parametrize(
    ("mixer", "pointwise", "channels_last"),
    [
        ("dynamic", "conv", True),
        ("dynamic", "sds", True),
        ("shuffle", "sds", True),
        ("learned", "conv", False),
    ],
)
def test_a_compiled_training_step_equals_the_eager_one(mixer, pointwise, channels_last):
    """``torch.compile`` of a model in training (``dyshuffle train --compile``): the same loss
    and gradients as eager, through the straight-through Functions and the fixed shuffles (whose
    channels_last gradient a compiled graph read with the strides of torch's fake kernel)."""
    from dyshuffle import orthogonal_loss
    from dyshuffle.models.shufflenet_v2 import SHUFFLENET_V2_WIDTHS, ShuffleNetV2

    torch.manual_seed(0)
    model = ShuffleNetV2((1, 1, 1), SHUFFLENET_V2_WIDTHS[0.5], 10, "cifar", mixer, pointwise)
    twin = copy.deepcopy(model)
    x = layout(torch.randn(4, 3, 16, 16), channels_last)
    target = torch.tensor([0, 1, 2, 3])
    torch._dynamo.reset()
    results = []
    for m, run in (
        (model, torch.compile(model, backend="aot_eager", fullgraph=True)),
        (twin, twin),
    ):
        m.train().to(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
        loss = F.cross_entropy(run(x), target) + 0.1 * orthogonal_loss(m)
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in m.named_parameters()}))
    (loss, grads), (loss_eager, grads_eager) = results
    torch.testing.assert_close(loss, loss_eager)
    for k, g in grads_eager.items():
        torch.testing.assert_close(grads[k], g, msg=k)
