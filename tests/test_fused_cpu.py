"""The C kernel of the hard dynamic shuffle on the CPU (dyshuffle.layers.fused_cpu) against the
PyTorch path it replaces. It needs a C compiler, which the development and CI machines have."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from dyshuffle.layers import DynamicShuffle, fused, fused_cpu
from fused_cases import (
    SHAPES,
    check_kernel_is_the_pytorch_path,
    make_layer,
    make_model,
    make_parts,
    op_args,
    reference,
)

pytestmark = pytest.mark.skipif(
    fused._INTERPRETED or not fused.ENABLED or fused_cpu._compiler() is None,
    reason="the C kernel is not used under Triton's interpreter, with DYSHUFFLE_FUSED=0 or "
    "without a C compiler",
)


def _rows(layer: DynamicShuffle, parts, threads: int | None = None) -> tuple[torch.Tensor, ...]:
    """The kernel's output and the row of the joint index table it chose for each sample."""
    rows = torch.full((parts[0].shape[0],), -1, dtype=torch.int64)
    x0, x1, *args = op_args(layer, parts)[:-1]
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        out = fused_cpu.launch(x0, x1 if len(parts) == 2 else None, *args, rows=rows)
    finally:
        torch.set_num_threads(before)
    return out, rows


def test_the_kernel_is_built_once_and_available():
    assert fused_cpu.available()
    assert fused.available(torch.device("cpu"))
    first = fused_cpu.build()
    assert first.exists() and fused_cpu.build() == first  # cached: the same file


@pytest.mark.parametrize("channels,split,kwargs", SHAPES)
@torch.no_grad()
def test_kernel_is_the_pytorch_path(channels, split, kwargs):
    layer = make_layer(channels, seed=channels, **kwargs)
    parts = make_parts(9, channels, split, seed=channels)
    chosen = check_kernel_is_the_pytorch_path(layer, parts)
    # the rows it reports are those of the chosen permutations
    _, rows = _rows(layer, parts)
    assert torch.equal(layer._index_ab[rows], chosen)


@pytest.mark.parametrize("batch,hw", [(1, (3, 3)), (2, (1, 1)), (37, (9, 5))])
@torch.no_grad()
def test_one_thread_and_many_threads_agree(batch, hw):
    """Small problems run on one thread, large ones split samples and pixels between threads
    (at uneven boundaries here: 37 samples of 45 pixels)."""
    layer = make_layer(116, seed=3)
    parts = make_parts(batch, 116, 58, hw=hw, seed=3)
    out1, rows1 = _rows(layer, parts, threads=1)
    out3, rows3 = _rows(layer, parts, threads=3)
    assert torch.equal(out1, out3) and torch.equal(rows1, rows3)
    assert torch.equal(out1, reference(layer, parts))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_inputs_are_pooled_as_their_float32_values(dtype):
    layer = make_layer(116, seed=2)
    parts = make_parts(16, 116, 58, seed=2, dtype=dtype)
    # fp16 subnormals in the first part, which the generator reads with large weights: the
    # choice depends on their exact conversion
    tiny = parts[0] * 2.0**-20
    assert dtype != torch.float16 or (tiny.abs() < 2.0**-14).float().mean() > 0.9
    parts = (tiny, parts[1])
    with torch.no_grad():
        layer.generator[0].weight[:, :58] *= 2.0**20
    out, rows = _rows(layer, parts)
    out32, rows32 = _rows(layer, tuple(p.float() for p in parts))
    assert out.dtype == dtype
    assert torch.equal(rows, rows32) and len(set(rows.tolist())) > 1
    assert torch.equal(out.float(), out32)  # the values copied exactly
    assert torch.equal(out32, reference(layer, tuple(p.float() for p in parts)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_layer_converted_to_half_chooses_as_its_pytorch_path(dtype):
    """``layer.to(dtype)`` converts the weights and the float scoring table too; the kernel
    reads them as float32 values."""
    layer = make_layer(116, seed=4).to(dtype)
    assert layer._fused_score.dtype == dtype
    check_kernel_is_the_pytorch_path(layer, make_parts(16, 116, 58, seed=4, dtype=dtype))


@torch.no_grad()
def test_whole_model_evaluates_alike_in_fp32_and_bf16():
    model, layers = make_model(0, perturb=True)
    x = torch.randn(5, 3, 32, 32).to(memory_format=torch.channels_last)
    out = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model(x)
    for m in layers:
        m.fused = False
    assert torch.equal(out, model(x))
    # under autocast the PyTorch path runs the generator in bf16, the kernel in fp32: the
    # choices may differ on near-ties only, so the logits agree to bf16 rounding
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref16 = model(x)
    assert out16.dtype == ref16.dtype
    torch.testing.assert_close(out16.float(), ref16.float(), atol=0.1, rtol=0.05)


@torch.no_grad()
def test_empty_batch_and_public_function():
    layer = make_layer(116, seed=2)
    assert layer(*make_parts(0, 116, 58)).shape == (0, 116, 6, 7)
    x = make_parts(2, 116, None)[0]
    w1, b1, w2, b2, table, segment, index, num_a, tau = op_args(layer, (x,))[2:-1]
    args = (w1, b1, w2, b2, table, segment, num_a, index, tau)
    assert torch.equal(fused.hard_shuffle((x,), *args), reference(layer, (x,)))
    with pytest.raises(ValueError, match="channels_last"):
        fused.hard_shuffle((x.contiguous(),), *args)


def test_export_keeps_the_pytorch_operators():
    """torch.export (and ONNX, TorchScript) get a graph that other runtimes run: the PyTorch
    operators, not the C kernel."""
    layer = make_layer(116, seed=7)
    parts = make_parts(3, 116, 58, seed=7)
    program = torch.export.export(layer, parts)
    assert "gather" in str(program.graph) and "hard_shuffle" not in str(program.graph)
    with torch.no_grad():
        assert torch.equal(program.module()(*parts), layer(*parts))


@torch.no_grad()
def test_compiled_layer_keeps_the_kernel():
    """torch.compile (inductor, one graph) keeps the kernel as the custom operator
    ``dyshuffle::hard_shuffle``, the layer's only work in the generated code."""
    from torch._inductor.utils import run_and_get_code

    layer = make_layer(232, seed=9)
    parts = make_parts(5, 232, 116, hw=(4, 4), seed=9)
    torch.library.opcheck(
        torch.ops.dyshuffle.hard_shuffle.default,
        op_args(layer, parts),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(layer, fullgraph=True), *parts)
    text = "\n".join(code)
    assert "torch.ops.dyshuffle.hard_shuffle.default(" in text
    assert "argmax" not in text and "gather" not in text
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, reference(layer, parts))


@torch.no_grad()
def test_compiled_model_calls_the_kernel_in_every_layer(monkeypatch):
    model, layers = make_model(3)
    x = torch.randn(3, 3, 32, 32).to(memory_format=torch.channels_last)
    expected = model(x)
    calls = []
    real = fused_cpu.launch
    monkeypatch.setattr(fused_cpu, "launch", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    assert len(calls) == len(layers) > 0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_a_part_laid_out_otherwise_is_made_channels_last():
    """The operator's guard for graphs that lay a part out as NCHW: the same values."""
    layer = make_layer(116, seed=10)
    parts = make_parts(4, 116, 58, seed=10)
    args = list(op_args(layer, parts))
    args[1] = args[1].contiguous()  # NCHW: channel stride H * W
    assert args[1].stride(1) != 1
    with torch.no_grad():
        out = torch.ops.dyshuffle.hard_shuffle(*args)
        assert torch.equal(out, reference(layer, parts))


def test_without_a_compiler_the_layer_keeps_pytorch(monkeypatch, tmp_path):
    monkeypatch.setattr(fused_cpu, "_library", None)
    monkeypatch.setattr(fused_cpu, "_failure", None)
    monkeypatch.setenv("DYSHUFFLE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    monkeypatch.setattr(shutil, "which", lambda name: "/bin/false" if name == "false" else None)
    layer = make_layer(116, seed=8)
    parts = make_parts(3, 116, 58, seed=8)
    with pytest.warns(RuntimeWarning, match="not available"):
        assert not fused_cpu.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert not fused.available(torch.device("cpu"))
        with torch.no_grad():
            assert not layer._fusable(parts[0], parts[1:])
            assert torch.equal(layer(*parts), reference(layer, parts))
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    with pytest.raises(RuntimeError, match="not available: false failed"):
        fused_cpu.launch(*op_args(layer, parts)[:-1])
