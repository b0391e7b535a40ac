"""The fused STE training step (dyshuffle.layers.fused_training) against the PyTorch path.

As in tests/test_fused.py, without a GPU ``test_under_triton_interpreter`` runs this file again
in a fresh process with ``TRITON_INTERPRET=1``, where the other tests run the kernels on CPU
tensors; on a CUDA machine they run on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from dyshuffle.layers import DynamicShuffle, compact_index, fused, fused_training
from fused_cases import (
    DEVICE,
    INTERPRETED,
    SHAPES,
    kernel,
    make_layer,
    make_model,
    make_parts,
    run_under_triton_interpreter,
)

pytest.importorskip("triton")


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="the kernels run here")
def test_under_triton_interpreter():
    run_under_triton_interpreter(__file__)


def _training_layer(channels: int, seed: int, **kwargs) -> DynamicShuffle:
    layer = make_layer(channels, seed, DEVICE, **kwargs).train()
    layer.fused_training = True
    return layer


def _step(layer, parts, fused_step: bool, grad_out, orth_weight=0.37, nchw_grad=False):
    """Output, regularizer, input gradients and generator gradients of one STE step."""
    layer.fused_training = fused_step
    inputs = [p.detach().clone().requires_grad_(True) for p in parts]
    layer.zero_grad()
    y = layer(*inputs)
    out = y.contiguous() if nchw_grad else y  # NCHW: the gradient arrives in another layout
    loss = (out * grad_out).sum() + orth_weight * layer.last_orthogonal_loss
    loss.backward()
    weights = [p.grad.clone() for p in layer.generator.parameters()]
    return y.detach(), layer.last_orthogonal_loss.detach(), [p.grad for p in inputs], weights


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), 1e-6)


def check_fused_step_is_the_pytorch_step(layer, parts, rel=1e-5, **kwargs):
    assert layer._fusable_training(parts[0], parts[1:])
    chosen = layer.permutation(*parts)
    assert len({tuple(r) for r in chosen.tolist()}) > 1, "inputs must get different permutations"
    grad_out = torch.randn(parts[0].shape[0], layer.channels, *parts[0].shape[2:]).to(DEVICE)
    ref = _step(layer, parts, False, grad_out, **kwargs)
    got = _step(layer, parts, True, grad_out, **kwargs)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got[0], ref[0])  # the same permutation, values copied
    assert _close(got[1], ref[1], rel)
    for g, r in zip(got[2] + got[3], ref[2] + ref[3], strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert _close(g, r, rel), ((g - r).abs().max().item(), r.abs().max().item())


@kernel
@pytest.mark.parametrize("channels,split,kwargs", SHAPES)
def test_fused_step_is_the_pytorch_step(channels, split, kwargs):
    layer = _training_layer(channels, seed=channels, **kwargs)
    check_fused_step_is_the_pytorch_step(layer, make_parts(5, channels, split, device=DEVICE))


@kernel
@pytest.mark.parametrize(
    "channels,split,n,hw,rel",
    [
        (58, 29, 24, (5, 3), 1e-5),  # 1 x 2 factors: a factor with one permutation
        (976, 488, 4, (3, 5), 5e-5),  # ShuffleNetV2 2.0x stage 4 (sums over 976 channels)
        (24, None, 9, (1, 1), 1e-5),  # one pixel
    ],
)
def test_fused_step_at_the_edges(channels, split, n, hw, rel):
    layer = _training_layer(channels, seed=channels)
    parts = make_parts(n, channels, split, hw=hw, seed=3, device=DEVICE)
    check_fused_step_is_the_pytorch_step(layer, parts, rel=rel)


@kernel
def test_gradient_in_another_layout_and_regularizer_unused():
    layer = _training_layer(116, seed=11)
    parts = make_parts(4, 116, 58, seed=11, device=DEVICE)
    check_fused_step_is_the_pytorch_step(layer, parts, nchw_grad=True)
    # the regularizer left out of the loss: its gradient is zero, the factors still learn
    check_fused_step_is_the_pytorch_step(layer, parts, orth_weight=0.0)


@kernel
def test_half_input_without_autocast():
    """bfloat16 features in a float32 layer: the generator runs in float32 on both paths."""
    layer = _training_layer(116, seed=1)
    parts = make_parts(7, 116, 58, seed=1, dtype=torch.bfloat16, device=DEVICE)
    check_fused_step_is_the_pytorch_step(layer, parts, rel=2e-2)


@kernel
def test_compiled_step_follows_the_temperature():
    """A temperature schedule under torch.compile: the step of every new tau is that tau's (the
    regularizer and the gradients depend on it), without a new graph for each (1 / tau is a
    tensor of the graph, not a constant)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    layer = _training_layer(116, seed=23)
    parts = make_parts(4, 116, 58, seed=23, device=DEVICE)
    grad_out = torch.randn(4, 116, 6, 7, device=DEVICE)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter)
    for tau in (1.0, 0.7, 2.0, 0.5, 3.0):
        layer.tau = tau
        ref = _step(layer, parts, True, grad_out)
        got = _step(compiled, parts, True, grad_out)
        assert torch.equal(got[0], ref[0]) and _close(got[1], ref[1], 1e-6), tau
        for g, r in zip(got[2] + got[3], ref[2] + ref[3], strict=True):
            assert _close(g, r, 1e-5), tau
    assert counter.frame_count <= 2  # (the first tau a constant, then a graph input)


def _model_steps(nets, fused_steps):
    """Loss, mean regularizer and parameter gradients of one step of a ShuffleNetV2 0.5x (as
    ``net`` of ``nets``, the model or a compiled form of it) with each ``fused_training``."""
    model, layers = make_model(0, DEVICE, train=True)
    x = torch.randn(3, 3, 32, 32).to(DEVICE, memory_format=torch.channels_last)
    target = torch.tensor([1, 4, 7], device=DEVICE)
    torch._dynamo.reset()
    results = []
    for net, flag in zip(nets(model), fused_steps, strict=True):
        for m in layers:
            m.fused_training = flag
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), target)
        orth = torch.stack([m.last_orthogonal_loss for m in layers]).mean()
        (loss + 0.1 * orth).backward()
        results.append((loss.detach(), orth.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss0, orth0, grads0), (loss1, orth1, grads1) = results
    for g0, g1 in zip(grads0, grads1, strict=True):
        # (the gradients of the biases before batch norms are zero but for rounding)
        assert (g1 - g0).abs().max() <= 1e-4 * g0.abs().max() + 1e-6
    return (loss0, orth0), (loss1, orth1)


@kernel
def test_whole_model_trains_alike():
    (loss0, _), (loss1, _) = _model_steps(lambda model: (model, model), (False, True))
    assert torch.equal(loss0, loss1)


@kernel
def test_second_derivatives_are_refused():
    """The kernels' gradients are not differentiable: double backward raises, it is never zero."""
    layer = _training_layer(116, seed=15)
    x = make_parts(3, 116, None, device=DEVICE)[0].requires_grad_(True)
    y = layer(x)
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        gx.sum().backward()


@kernel
def test_empty_batch():
    layer = _training_layer(116, seed=13)
    parts = [p.requires_grad_(True) for p in make_parts(0, 116, 58, device=DEVICE)]
    y = layer(*parts)
    (y.sum() + layer.last_orthogonal_loss).backward()
    assert y.shape == (0, 116, 6, 7)
    assert parts[1].grad.shape == (0, 58, 6, 7)
    assert all(torch.count_nonzero(p.grad) == 0 for p in layer.generator.parameters())


@kernel
def test_pytorch_step_where_the_kernels_do_not_apply(monkeypatch):
    layer = _training_layer(116, seed=14)
    x = make_parts(4, 116, None, device=DEVICE)[0]
    assert layer._fusable_training(x, ())
    assert not layer._fusable_training(x.contiguous(), ())  # NCHW
    empty = torch.empty(4, 116, 0, 3, device=DEVICE).contiguous(memory_format=torch.channels_last)
    assert not layer._fusable_training(empty, ())  # no pixels
    with torch.no_grad():
        assert not layer._fusable_training(x, ())
    for name, value in (
        ("fused_training", False),
        ("mode", "soft"),
        ("noise", 1.0),
        ("balance", 0.1),
        ("descriptor_grad", False),
        ("hard_identity", True),
        ("logit_cap", 3.0),
    ):
        monkeypatch.setattr(layer, name, value)
        assert not layer._fusable_training(x, ()), name
        monkeypatch.undo()
    assert layer._fusable_training(x, ())
    assert not layer.eval()._fusable_training(x, ())
    layer.train()
    with compact_index(layer):  # no joint tables
        assert not layer._fusable_training(x, ())
    monkeypatch.setattr(fused, "ENABLED", False)  # DYSHUFFLE_FUSED=0
    assert not layer._fusable_training(x, ())
    monkeypatch.undo()
    per_group = DynamicShuffle(116, shared=False, fused_training=True).to(DEVICE)
    assert not per_group._fusable_training(x, ())


def _op_args(layer, parts, orth_scale=0.25) -> tuple:
    """The arguments of the operator ``dyshuffle::ste_shuffle`` for ``layer(*parts)``."""
    x1 = parts[1] if len(parts) == 2 else None
    weights = layer._generator_weights()
    inv_tau = torch.full((1,), 1.0 / layer.tau, device=DEVICE)
    return (parts[0], x1, *weights, *layer._fused_training_tables(), inv_tau, orth_scale)


@kernel
@pytest.mark.parametrize("split,hw", [(58, (6, 7)), (None, (6, 7)), (58, (1, 1))])
def test_operators_pass_opcheck(split, hw):
    """The operators that torch.compile keeps: schema, the fake tensors' shapes and strides
    (also on 1 x 1 maps), the autograd formula, and the traced (AOT) forward and backward
    against the eager ones."""
    layer = _training_layer(116, seed=21)
    parts = make_parts(3, 116, split, hw=hw, seed=21, device=DEVICE)
    parts = [p.requires_grad_(True) for p in parts]
    args = _op_args(layer, parts)
    torch.library.opcheck(torch.ops.dyshuffle.ste_shuffle, args)
    y, _, _, hid, soft, row = (t.detach() for t in torch.ops.dyshuffle.ste_shuffle(*args))
    assert torch.equal(y, layer(*parts))  # the operator's forward is the layer's output
    w1, _, w2, _ = (w.detach() for w in layer._generator_weights())
    tables = layer._fused_training_tables()
    backward_args = (
        torch.randn_like(y),
        torch.tensor(0.5, device=DEVICE),
        y,
        soft,
        hid,
        row,
        w1,
        w2,
        *(tables[k] for k in (1, 2, 6, 7, 5, 4)),  # segment, column, rows, moved, inv_cols, inv
        parts[0].shape[1],
        split is not None,
        args[-2],  # 1 / tau
        0.25,
    )
    torch.library.opcheck(torch.ops.dyshuffle.ste_shuffle_backward, backward_args)


@kernel
@pytest.mark.parametrize(
    "backend,split", [("aot_eager", 58), ("aot_eager", None), ("inductor", 58)]
)
@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")  # (the graph recorder's)
def test_compiled_step_is_the_eager_step(backend, split):
    """Under torch.compile the layer's training step is the two operators, and gives the eager
    fused step's output, regularizer and gradients."""
    from torch._inductor.utils import run_and_get_code

    layer = _training_layer(116, seed=22)
    parts = make_parts(4, 116, split, seed=22, device=DEVICE)
    grad_out = torch.randn(4, 116, 6, 7, device=DEVICE)
    ref = _step(layer, parts, True, grad_out)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    if backend == "inductor":
        got, code = run_and_get_code(_step, compiled, parts, True, grad_out)
        text = "\n".join(code)
    else:
        from torch._dynamo.testing import AotEagerAndRecordGraphs

        recorder = AotEagerAndRecordGraphs()
        compiled = torch.compile(layer, backend=recorder, fullgraph=True)
        got = _step(compiled, parts, True, grad_out)
        text = "\n".join(g.code for g in recorder.fw_graphs + recorder.bw_graphs)
    assert "dyshuffle.ste_shuffle.default" in text
    assert "dyshuffle.ste_shuffle_backward.default" in text
    assert "gather" not in text  # (the PyTorch path's hard permutation)
    assert torch.equal(got[0], ref[0]) and _close(got[1], ref[1], 1e-6)
    for g, r in zip(got[2] + got[3], ref[2] + ref[3], strict=True):
        assert g.shape == r.shape and _close(g, r, 1e-5)


@kernel
def test_compiled_model_step_is_the_eager_step():
    """A whole model compiled: its 16 dynamic layers' steps and regularizers, as in eager."""

    def eager_and_compiled(model):
        return model, torch.compile(model, backend="aot_eager")

    (loss0, orth0), (loss1, orth1) = _model_steps(eager_and_compiled, (True, True))
    assert _close(loss1, loss0, 1e-5) and _close(orth1, orth0, 1e-5)


def test_channel_tables_move_along_one_factor():
    """``moved[k, c]`` is the channel of the same group and column (k < a) or row (k >= a)."""
    groups, a, b = 3, 2, 4
    for cross in (True, False):
        rows, moved = fused_training.channel_tables(groups, a, b, cross)
        c = torch.arange(groups * a * b)
        slot, group = (c // groups, c % groups) if cross else (c % (a * b), c // (a * b))
        i, j = slot // b, slot % b
        assert torch.equal(rows[0].long(), i) and torch.equal(rows[1].long(), a + j)
        for k in range(a + b):
            m = moved[k].long()
            ms, mg = (m // groups, m % groups) if cross else (m % (a * b), m // (a * b))
            assert torch.equal(mg, group)
            if k < a:
                assert torch.equal(ms // b, torch.full_like(i, k)) and torch.equal(ms % b, j)
            else:
                assert torch.equal(ms // b, i) and torch.equal(ms % b, torch.full_like(j, k - a))


def test_option_is_checked():
    with pytest.raises(ValueError, match="fused_training"):
        DynamicShuffle(116, fused_training="yes")
