"""Count the ATen operators one inference call and one training step dispatch, per mixer.

On a GPU, a small model at small or medium batch is bound by launching kernels, not by the
kernels: each dispatched operator costs several microseconds of host time. The count is
independent of the machine, so it can be compared on a CPU for what a GPU will pay::

    python3 -m dyshuffle.tools.op_count                       # ShuffleNetV2 1.0x, CIFAR stem
    python3 -m dyshuffle.tools.op_count --mixers shuffle dynamic dynamic:factor_grad=channels

"Top-level" operators are those not called from inside another ATen operator (what Python
dispatches); "compute" leaves out the ones that only make views or metadata (no kernel). The
optimizer step uses the multi-tensor (``foreach``) implementation, PyTorch's default for CUDA
tensors (on the CPU its default is one set of operators per parameter, which a GPU does not pay).
Likewise the dynamic layers run their accelerator path: in CPU inference they keep the halves of
ShuffleNetV2's concatenation apart (``dyshuffle.layers.dynamic.PARTS_DEVICES``), which a GPU does
not; ``--cpu-path`` counts that path instead. The fused kernels of the layers' inference
(``DynamicShuffle(fused=True)``: Triton on a GPU, C on the CPU) are not ATen operators; the
count is of the PyTorch operators they replace, each layer's inference with the kernel being one
launch instead. The fused training step (``dynamic:fused_training=true``) is counted as it runs
on a GPU, its two Triton kernels replaced by counters of their launches (one operator each; the
step computes nothing then, which changes no count): what the training step dispatches with it.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from ..layers import DynamicShuffle, orthogonal_loss
from ..layers import dynamic as dynamic_module
from ..models import create_model
from ._kernels import KernelStub, gpu_path_without_kernels

__all__ = ["count_ops", "main"]

#: operators that make views or read metadata: no kernel on any device
VIEW_OPS = frozenset(
    "aten::" + name
    for name in (
        "view as_strided resolve_conj resolve_neg detach _reshape_alias _unsafe_view empty "
        "empty_strided result_type t transpose expand expand_as unsqueeze squeeze permute "
        "reshape select slice unflatten flatten diagonal alias lift_fresh view_as unbind split "
        "chunk split_with_sizes numpy_T"
    ).split()
)


def _top_level(prof) -> list[str]:
    return [
        e.name
        for e in prof.events()
        if e.name.startswith("aten::")
        and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))
    ]


def count_ops(model: torch.nn.Module, x: torch.Tensor, train: bool) -> tuple[int, int]:
    """``(top-level, compute)`` operators of one inference call or one training step, with the
    dynamic layers on their PyTorch operators (``fused`` off while counting)."""
    fused = [(m, m.fused) for m in model.modules() if isinstance(m, DynamicShuffle)]
    for m, _ in fused:
        m.fused = False
    try:
        return _count(model, x, train)
    finally:
        for m, value in fused:
            m.fused = value


def _count(model: torch.nn.Module, x: torch.Tensor, train: bool) -> tuple[int, int]:
    fused_training = train and any(
        isinstance(m, DynamicShuffle) and m.fused_training for m in model.modules()
    )
    if not fused_training:
        return _count_ops(model, x, train, None)
    with gpu_path_without_kernels() as launches:
        return _count_ops(model, x, train, launches)


def _count_ops(
    model: torch.nn.Module, x: torch.Tensor, train: bool, launches: KernelStub | None
) -> tuple[int, int]:
    target = torch.zeros(x.shape[0], dtype=torch.long)
    # foreach: CUDA's default (multi-tensor kernels), so that the count is what a GPU dispatches
    opt = torch.optim.SGD(
        model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True
    )

    def step() -> None:
        if train:
            model.train()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), target) + 0.1 * orthogonal_loss(model)
            loss.backward()
            opt.step()
        else:
            model.eval()
            with torch.no_grad():
                model(x)

    step()  # lazy state (optimizer buffers) out of the counted call
    before = 0 if launches is None else launches.launches
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    names = _top_level(prof)
    kernels = 0 if launches is None else launches.launches - before
    return len(names) + kernels, sum(n not in VIEW_OPS for n in names) + kernels


def _mixer(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return name, kwargs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m dyshuffle.tools.op_count", description=__doc__)
    p.add_argument("--model", default="shufflenet_v2_x1_0")
    p.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--mixers", nargs="+", default=["shuffle", "dynamic"], help="NAME or NAME:key=value,..."
    )
    p.add_argument(
        "--cpu-path",
        action="store_true",
        help="count the dynamic layers' CPU inference path (parts of the concatenation kept "
        "apart) instead of the accelerator path",
    )
    args = p.parse_args(argv)
    # the profiler's C++ library (kineto) logs its start and stop, and without a GPU a failed
    # device query, on stderr; 6 is above its highest level (USDT, 5). It reads the variable once,
    # when a process first profiles; a level the user set is kept
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    devices = dynamic_module.PARTS_DEVICES
    dynamic_module.PARTS_DEVICES = devices if args.cpu_path else set()
    try:
        return _table(p, args)
    finally:
        dynamic_module.PARTS_DEVICES = devices


def _table(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    size = 32 if args.stem == "cifar" else 224
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, size, size).to(memory_format=torch.channels_last)
    path = "CPU path" if args.cpu_path else "accelerator path"
    print(
        f"{args.model}, {args.stem} stem, batch {args.batch}, channels_last, fp32, CPU, torch "
        f"{torch.__version__}, {path} of the dynamic layers\n"
    )
    print(
        "| mixer | layers | infer ops (compute) | train-step ops (compute) "
        "| extra compute ops per layer, infer / train |"
    )
    print("|---|---|---|---|---|")
    counted = []
    for spec in args.mixers:
        name, kwargs = _mixer(spec)
        try:
            model = create_model(
                args.model, stem=args.stem, num_classes=10, mixer=name, **kwargs
            ).to(memory_format=torch.channels_last)
        except (TypeError, ValueError) as e:
            p.error(f"mixer {spec!r}: {e}")
        layers = sum(isinstance(m, DynamicShuffle) for m in model.modules())
        counted.append((spec, name, layers, count_ops(model, x, False), count_ops(model, x, True)))
    # the extra operators: over the fixed shuffle when it is listed, else over the first mixer
    base = next((c for c in counted if c[1] == "shuffle"), counted[0])[3:]
    for spec, _, layers, infer, train in counted:
        extra = "-"
        if layers:
            extra = (
                f"{(infer[1] - base[0][1]) / layers:.1f} / {(train[1] - base[1][1]) / layers:.1f}"
            )
        print(
            f"| {spec} | {layers} | {infer[0]} ({infer[1]}) | {train[0]} ({train[1]}) | {extra} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
