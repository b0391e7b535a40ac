"""The fused Triton kernel of the hard dynamic shuffle (dyshuffle.layers.fused) against the
PyTorch path it replaces.

The kernel needs CUDA or Triton's interpreter, which must be switched on before Triton is first
imported: without a GPU, ``test_under_triton_interpreter`` runs this file again in a fresh
process with ``TRITON_INTERPRET=1``, where the other tests run the kernel on CPU tensors. On a
CUDA machine they run directly on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from dyshuffle.layers import DynamicShuffle, LearnedShuffle, fused
from fused_cases import (
    DEVICE,
    INTERPRETED,
    SHAPES,
    check_kernel_is_the_pytorch_path,
    kernel,
    make_layer,
    make_model,
    make_parts,
    op_args,
    reference,
    run_under_triton_interpreter,
)

triton = pytest.importorskip("triton")


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="the kernel runs here")
def test_under_triton_interpreter():
    run_under_triton_interpreter(__file__)


def _layer(channels: int, seed: int, **kwargs) -> DynamicShuffle:
    return make_layer(channels, seed, DEVICE, **kwargs)


def _parts(n: int, channels: int, split: int | None, **kwargs):
    return make_parts(n, channels, split, device=DEVICE, **kwargs)


@kernel
@pytest.mark.parametrize("channels,split,kwargs", SHAPES)
@torch.no_grad()
def test_kernel_is_the_pytorch_path(channels, split, kwargs):
    layer = _layer(channels, seed=channels, **kwargs)
    check_kernel_is_the_pytorch_path(layer, _parts(9, channels, split, seed=channels))


@kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_inputs_are_pooled_in_float32(dtype):
    layer = _layer(116, seed=1)
    parts = _parts(7, 116, 58, dtype=dtype)
    out = layer(*parts)
    assert out.dtype == dtype
    # the same choice as the float32 path on the same values, and the values copied exactly
    ref = reference(layer, tuple(p.float() for p in parts))
    assert torch.equal(out.float(), ref)


@kernel
@torch.no_grad()
def test_whole_model_evaluates_alike():
    model, layers = make_model(0, DEVICE, perturb=True)
    x = torch.randn(3, 3, 32, 32).to(DEVICE, memory_format=torch.channels_last)
    out = model(x)
    for m in layers:
        m.fused = False
    ref = model(x)
    assert torch.equal(out, ref)


@kernel
@torch.no_grad()
def test_empty_batch():
    layer = _layer(116, seed=2)
    out = layer(*_parts(0, 116, 58))
    assert out.shape == (0, 116, 6, 7)


@kernel
def test_pytorch_path_where_the_kernel_does_not_apply(monkeypatch):
    layer = _layer(116, seed=3)
    x = _parts(4, 116, None)[0]
    with torch.no_grad():
        assert layer._fusable(x, ())
        assert not layer._fusable(x.contiguous(), ())  # NCHW
        first, second = _parts(4, 116, 58)
        assert layer._fusable(first, (second,))
        assert not layer._fusable(first, (second[:, :29], second[:, 29:]))  # three parts
    assert not layer._fusable(x.requires_grad_(), ())  # autograd through the gather
    with torch.no_grad():
        x = x.detach()
        assert not layer.train()._fusable(x, ())
        layer.eval()
        for name, value in (("logit_cap", 3.0), ("hard_identity", True), ("fused", False)):
            monkeypatch.setattr(layer, name, value)
            assert not layer._fusable(x, ())
            monkeypatch.undo()
        assert layer._fusable(x, ())
        monkeypatch.setattr(fused, "ENABLED", False)  # DYSHUFFLE_FUSED=0
        assert not layer._fusable(x, ())
        monkeypatch.undo()
        learned = LearnedShuffle(116).eval().to(DEVICE)
        assert not learned._fusable(x, ())  # no generator to fuse
        per_group = DynamicShuffle(116, shared=False).eval().to(DEVICE)
        assert not per_group._fusable(x, ())  # no joint table


@kernel
def test_public_function_checks_its_parts():
    layer = _layer(116, seed=4)
    first, last = layer.generator[0], layer.generator[-1]
    args = (
        first.weight, first.bias, last.weight, last.bias,
        layer._fused_score, layer._fused_segment, layer._perms_a.shape[0], layer._index_ab,
    )  # fmt: skip
    nchw = torch.randn(2, 116, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="channels_last"):
        fused.hard_shuffle((nchw,), *args)
    x = _parts(2, 116, None)[0]
    with torch.no_grad():
        assert torch.equal(fused.hard_shuffle((x,), *args), reference(layer, (x,)))
    with pytest.raises(ValueError, match="got 3"):
        fused.hard_shuffle((x, x, x), *args)
    with pytest.raises(ValueError, match=r"\(2, 58, 3, 3\)"):
        fused.hard_shuffle((x[:, :58], torch.randn(2, 58, 3, 3, device=DEVICE)), *args)


def test_score_table_scores_every_candidate():
    from dyshuffle.layers.permutation import permutation_table

    perms_a, onehot_a = permutation_table(2)
    perms_b, onehot_b = permutation_table(3)
    table, segment = fused.score_table(onehot_a, onehot_b)
    assert table.shape == (2 + 6, 4 + 9)
    assert segment.tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    # a pair of permutation matrices scores a + b with itself (a and b rows hit), less elsewhere
    flat = torch.cat([onehot_a[1], onehot_b[4]])
    scores = table @ flat
    assert scores[:2].argmax() == 1 and scores[2:].argmax() == 4
    assert scores[1] == 2 and scores[2 + 4] == 3


@kernel
@torch.no_grad()
def test_custom_op_is_the_kernel():
    layer = _layer(232, seed=5, tau=2.0)
    parts = _parts(6, 232, 116, seed=5)
    out = torch.ops.dyshuffle.hard_shuffle(*op_args(layer, parts))
    assert torch.equal(out, reference(layer, parts))


@kernel
@torch.no_grad()
def test_compiled_layer_keeps_the_kernel():
    """Inductor keeps the operator (on the CPU the kernel runs under Triton's interpreter)."""
    from torch._inductor.utils import run_and_get_code

    layer = _layer(116, seed=6)
    parts = _parts(16, 116, 58, hw=(8, 8), seed=6)
    torch.library.opcheck(torch.ops.dyshuffle.hard_shuffle.default, op_args(layer, parts))
    # parts whose channels are not contiguous (as a compiled graph may lay them out): the same
    nchw = [p.contiguous() for p in parts]
    out = torch.ops.dyshuffle.hard_shuffle(*op_args(layer, nchw))
    assert torch.equal(out, reference(layer, parts))
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    out, code = run_and_get_code(compiled, *parts)
    assert torch.equal(out, reference(layer, parts))
    text = "\n".join(code)
    calls = [
        line.strip() for line in text.splitlines() if "hard_shuffle" in line or "gather" in line
    ]
    assert "dyshuffle.hard_shuffle.default" in text, "the compiled code:\n" + "\n".join(calls)
    assert "gather" not in text, "the compiled code:\n" + "\n".join(calls)


@kernel
def test_exported_graphs_keep_pytorch_operators():
    """torch.export (and ONNX, torch.jit) get the PyTorch path: other runtimes lack the kernel."""
    layer = _layer(116, seed=7)
    parts = _parts(3, 116, 58, seed=7)
    program = torch.export.export(layer, parts)
    text = str(program.graph)
    assert "hard_shuffle" not in text and "gather" in text
    with torch.no_grad():
        assert torch.equal(program.module()(*parts), layer(*parts))
