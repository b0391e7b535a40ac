"""Host time of one channel-mixer call: what a launch-bound GPU waits for, measured on any machine.

On a GPU the CIFAR models are bound by the host (docs/BENCHMARKS.md: the fixed model's eager
inference takes about as long at batch 32 as at 1024), so each mixer layer costs the Python and
dispatch time of its call, not its kernels. This measures that time per call on the machine
at hand, on a tiny input (batch 1, 4 x 4 pixels by default: the tensors' own work is negligible)::

    python3 -m dyshuffle.tools.host_time                  # ShuffleNetV2 1.0x stage 2: 116 channels
    python3 -m dyshuffle.tools.host_time --channels 464 --calls 5000

Rows: the fixed shuffle of the concatenation (``mix_concat``: the concatenation and
``channel_shuffle``, two operators), the dynamic layer's inference through its fused kernel on
the GPU's path (the Triton launcher replaced by a no-op: dyshuffle's Python up to the launch, not
Triton's own launch time), the same with the C kernel of the CPU (which it computes), and the
training step of the layer (forward and backward of the mixer alone) for the fixed shuffle, the
fused training step (its two Triton kernels replaced by no-ops) and the PyTorch operators. Times
are the median over ``--rounds`` of the mean of ``--calls`` calls, in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from ..layers import DynamicShuffle, create_mixer, fused, mix_concat
from ._kernels import gpu_path_without_kernels

__all__ = ["host_times", "main"]


def _per_call(fn: Callable[[], object], calls: int, rounds: int) -> float:
    """Median over ``rounds`` of the mean seconds per call of ``fn``, in microseconds."""
    for _ in range(max(calls // 10, 10)):
        fn()
    means = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - t0) / calls)
    return statistics.median(means) * 1e6


def host_times(
    channels: int = 116, batch: int = 1, size: int = 4, calls: int = 2000, rounds: int = 7
) -> dict[str, float]:
    """Microseconds per call of each row of the module's table (see the module's docstring)."""
    torch.manual_seed(0)
    half = channels // 2
    parts = tuple(
        torch.randn(batch, c, size, size).contiguous(memory_format=torch.channels_last)
        for c in (half, channels - half)
    )
    grad = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    fixed = create_mixer("shuffle", channels, shuffle_groups=2)
    layer = DynamicShuffle(channels, fused_training=True)

    def infer(mixer) -> Callable[[], object]:
        return lambda: mix_concat(mixer, parts)

    def step(mixer) -> Callable[[], object]:
        inputs = tuple(p.clone().requires_grad_(True) for p in parts)

        def run() -> None:
            y = mix_concat(mixer, inputs)
            loss = getattr(mixer, "last_orthogonal_loss", None)
            if loss is not None and mixer.training:
                torch.autograd.backward((y, loss), (grad, torch.ones(())))
            else:
                y.backward(grad)

        return run

    out = {}
    with torch.no_grad():
        fixed.eval()
        layer.eval()
        out["fixed shuffle, inference"] = _per_call(infer(fixed), calls, rounds)
        with gpu_path_without_kernels():
            out["dynamic, inference, GPU path (kernel not run)"] = _per_call(
                infer(layer), calls, rounds
            )
        if fused.available(parts[0].device):
            out["dynamic, inference, C kernel"] = _per_call(infer(layer), calls, rounds)
    fixed.train()
    layer.train()
    out["fixed shuffle, training step"] = _per_call(step(fixed), calls, rounds)
    with gpu_path_without_kernels():
        out["dynamic, fused training step (kernels not run)"] = _per_call(
            step(layer), calls, rounds
        )
    layer.fused_training = False
    out["dynamic, PyTorch training step"] = _per_call(step(layer), calls, rounds)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m dyshuffle.tools.host_time", description=__doc__)
    p.add_argument("--channels", type=int, default=116)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=4, help="pixels of each side")
    p.add_argument("--calls", type=int, default=2000, help="calls per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    for name in ("channels", "batch", "size", "calls", "rounds", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.channels % 2:
        p.error(f"--channels must be even (two halves), got {args.channels}")
    torch.set_num_threads(args.threads)
    try:
        times = host_times(args.channels, args.batch, args.size, args.calls, args.rounds)
    except (RuntimeError, ValueError) as e:
        p.error(str(e))
    print(
        f"{args.channels} channels, batch {args.batch}, {args.size}x{args.size}, channels_last, "
        f"fp32, {args.threads} thread(s), torch {torch.__version__}; median of {args.rounds} "
        f"rounds of {args.calls} calls\n"
    )
    print("| call | us per call |")
    print("|---|---|")
    for name, us in times.items():
        print(f"| {name} | {us:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
