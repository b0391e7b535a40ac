"""Layers and inputs on which the fused kernels (tests/test_fused.py: Triton, and
tests/test_fused_cpu.py: C) are compared with the PyTorch path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dyshuffle.layers import DynamicShuffle
from dyshuffle.models import create_model

#: Triton's interpreter is on in this process (kernels run on CPU tensors)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: where the Triton kernels' tests run them
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
#: a test that runs a Triton kernel: on CUDA, or under the interpreter
kernel = pytest.mark.skipif(
    not (INTERPRETED or torch.cuda.is_available()),
    reason="needs CUDA or Triton's interpreter (test_under_triton_interpreter runs it)",
)


def run_under_triton_interpreter(path: str) -> None:
    """Run the test file ``path`` again in a fresh process with ``TRITON_INTERPRET=1`` (the
    interpreter must be on before Triton is first imported), and assert that it passes."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "DYSHUFFLE_FUSED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]


#: (channels, split of the two parts or None for one input, layer options)
SHAPES = [
    (116, 58, {}),  # ShuffleNetV2 1.0x stage 2: 2 x 2 factors, 29 groups
    (232, 116, {}),  # 2 x 4
    (464, None, {}),  # 4 x 4, one input
    (24, 12, {"groups": 2, "factors": (3, 4), "tau": 0.5}),
    (48, 20, {"cross_shuffle": False, "max_group_size": 8}),
]


def make_layer(channels: int, seed: int, device="cpu", **kwargs) -> DynamicShuffle:
    """A layer whose generator gives different permutations to different inputs."""
    torch.manual_seed(seed)
    layer = DynamicShuffle(channels, init="random", **kwargs)
    with torch.no_grad():
        for p in layer.generator.parameters():
            p.add_(torch.randn_like(p))
    return layer.eval().to(device)


def make_model(seed: int, device="cpu", train=False, perturb=False):
    """ShuffleNetV2 0.5x (CIFAR stem) with dynamic shuffles, channels_last on ``device``, and its
    dynamic layers; ``perturb``: their generators moved so that inputs get different
    permutations (as :func:`make_layer`)."""
    torch.manual_seed(seed)
    model = create_model("shufflenet_v2_x0_5", num_classes=10, stem="cifar", mixer="dynamic")
    model = model.train(train).to(device, memory_format=torch.channels_last)
    layers = [m for m in model.modules() if isinstance(m, DynamicShuffle)]
    if perturb:
        with torch.no_grad():
            for m in layers:
                for p in m.generator.parameters():
                    p.add_(torch.randn_like(p))
    return model, layers


def make_parts(
    n: int, channels: int, split: int | None, hw=(6, 7), seed=0, dtype=torch.float32, device="cpu"
) -> tuple[torch.Tensor, ...]:
    """One channels_last input, or two parts of it (``split`` channels first)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, *hw, generator=g).to(memory_format=torch.channels_last)
    x = x.to(device, dtype)
    if split is None:
        return (x,)
    # the first part a channel slice of a larger tensor, as ShuffleNetV2's split half
    return x[:, :split], x[:, split:].contiguous(memory_format=torch.channels_last)


def reference(layer: DynamicShuffle, parts) -> torch.Tensor:
    """The layer's output on its PyTorch operators."""
    layer.fused = False
    try:
        return layer(*parts)
    finally:
        layer.fused = True


def op_args(layer: DynamicShuffle, parts) -> tuple:
    """The arguments of the operator ``dyshuffle::hard_shuffle`` (the C kernel on the CPU, the
    Triton one on CUDA and under the interpreter) for ``layer`` on ``parts``."""
    first, last = layer.generator[0], layer.generator[-1]
    weights = tuple(t.detach() for t in (first.weight, first.bias, last.weight, last.bias))
    tables = (layer._fused_score, layer._fused_segment, layer._index_ab)
    num_a = layer._perms_a.shape[0]
    return (parts[0], parts[-1], *weights, *tables, num_a, layer.tau, len(parts) == 2)


def check_kernel_is_the_pytorch_path(layer: DynamicShuffle, parts) -> torch.Tensor:
    """``layer`` on ``parts`` takes its fused kernel, gives inputs different permutations and
    equals its PyTorch path and the permutation it reports; returns that permutation."""
    assert layer._fusable(parts[0], parts[1:])
    chosen = layer.permutation(*parts)
    assert len({tuple(r) for r in chosen.tolist()}) > 1, "inputs must get different permutations"
    out = layer(*parts)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, reference(layer, parts))
    # and it is the permutation the layer reports, applied to the concatenation
    cat = torch.cat(parts, 1)
    assert torch.equal(out, torch.stack([cat[i, chosen[i]] for i in range(cat.shape[0])]))
    return chosen
