"""``dyshuffle bench``: speed, memory, parameters and MACs of the channel mixers, side by side.

Gong et al., "Dynamic Shuffle: An Efficient Channel Mixture Method" (arXiv 2310.02776) promise
"negligible extra computation and memory occupancy". This command measures it (issue 5): the
fixed channel shuffle, the dynamic shuffle (hard permutations in inference, a full training step),
the static-dynamic shuffle and a 1x1 convolution, as single layers and inside whole
ShuffleNetV2 models, in one run and interleaved, so that every ratio compares numbers taken
under the same conditions.

For each precision and layout it writes one CSV whose name says the device, precision, layout and
torch version (``results/bench/cpu-2threads_fp32_channels_last_torch2.14.1-cu130.csv``), prints
a markdown table and can update ``docs/BENCHMARKS.md`` in place. ``--plot PATH`` draws the whole
models' latency ratios to the fixed shuffle against the issue's targets
(:func:`plot_latency_ratios`), from a run's CSVs or, with ``--from-csv``, from committed ones.

Measurement:

- **latency**: median over ``--repeats`` timed blocks, after ``--warmup`` untimed calls; a block
  runs the call enough times to last at least ``--min-block-ms`` and is timed with the device
  synchronized before and after; the variants of one configuration are timed round-robin
  (fixed, dynamic, ... , fixed, dynamic, ...), so load from other processes hits all of them.
- **throughput**: batch / median latency.
- **training memory**: CUDA: ``torch.cuda.max_memory_allocated`` over one training step. CPU:
  the bytes of the distinct tensor storages saved for backward during the forward pass
  (``torch.autograd.graph.saved_tensors_hooks``; parameters not counted twice) plus the
  parameters, their gradients and the optimizer state. Transient buffers of the backward pass are
  not included on CPU.
- **parameters and MACs**: :func:`dyshuffle.macs.count_params` and
  :func:`dyshuffle.macs.count_macs` at batch 1, in evaluation mode (hard permutations).
- **ratios**: each value divided by the fixed shuffle's value of the same part, target, batch and
  mode (empty where the fixed value is zero, e.g. the parameters of a parameter-free layer).
  ``latency_ratio_paired`` is the median over the rounds of the ratio within each round, which
  is less sensitive to load that changes during the run (the two runs of a round are adjacent).

On a CPU shared with other processes, run with ``OMP_WAIT_POLICY=PASSIVE``: by default the
OpenMP workers spin after each parallel region and compete with the main thread for the cores,
which inflates every small operation by orders of magnitude (see docs/BENCHMARKS.md). The
variable, the 1-minute load average during each measurement and the exact command are recorded in
the CSV.

A training step is forward, ``cross_entropy + 0.1 * orthogonal_loss`` (models) or
``<y, g> + 0.1 * orthogonal_loss`` with a fixed random ``g`` (layers), backward and an SGD step
(momentum 0.9, Nesterov, weight decay 5e-4). ``bf16`` runs under ``torch.autocast`` with
``bfloat16``; the weights stay fp32.

This module imports only torch and the ``dyshuffle`` library at import time, so the GPU check
(``scripts/gpu_bench.sh``) runs on a bare machine with ``PYTHONPATH=src``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import difflib
import gc
import io
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dyshuffle import layers as _layers
from dyshuffle._atomic import atomic_write, atomic_write_text
from dyshuffle.layers import ChannelShuffle, orthogonal_loss

__all__ = [
    "COLUMNS",
    "BenchConfig",
    "add_ratios",
    "csv_name",
    "main",
    "markdown_section",
    "plot_latency_ratios",
    "ratio_series",
    "read_csv",
    "run_benchmark",
    "saved_tensor_bytes",
    "time_round_robin",
    "update_markdown",
    "write_csv",
]

#: columns of the CSV files, in order
COLUMNS = [
    "device",
    "device_name",
    "torch",
    "precision",
    "layout",
    "threads",
    "compile",
    "part",
    "target",
    "input",
    "variant",
    "mode",
    "batch",
    "repeats",
    "latency_ms",
    "latency_p25_ms",
    "latency_p75_ms",
    "throughput_per_s",
    "train_mem_mb",
    "mem_method",
    "params",
    "macs",
    "latency_ratio",
    "latency_ratio_paired",
    "throughput_ratio",
    "train_mem_ratio",
    "params_ratio",
    "macs_ratio",
    "note",
    "load_avg",
    "cpu_env",
    "commit",
    "date",
    "command",
]
#: value column -> ratio column (value / value of the fixed shuffle)
RATIOS = {
    "latency_ms": "latency_ratio",
    "throughput_per_s": "throughput_ratio",
    "train_mem_mb": "train_mem_ratio",
    "params": "params_ratio",
    "macs": "macs_ratio",
}
BASELINE = "fixed"
#: single-layer variants: the project's fixed shuffle, the same permutation by PyTorch's native
#: kernel (``torch.nn.functional.channel_shuffle``, which keeps channels_last; since commit
#: 95c8394 the project's shuffle calls it, so the two time the same kernel and their ratio shows the
#: measurement noise), the dynamic and static-dynamic shuffles and the 1x1 convolution that SDS
#: replaces
LAYER_VARIANTS = ("fixed", "fixed_native", "dynamic", "static_dynamic", "conv1x1")
MODEL_VARIANTS = ("fixed", "fixed_native", "dynamic", "static_dynamic")
DEFAULT_VARIANTS = LAYER_VARIANTS
MODES = ("infer", "train")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
STEM_RESOLUTION = {"cifar": 32, "imagenet": 224}
STEM_CLASSES = {"cifar": 10, "imagenet": 1000}
ORTHO_WEIGHT = 0.1
DEFAULT_MODELS = ("shufflenet_v2_x0_5", "shufflenet_v2_x1_0")
DEFAULT_LAYER_SHAPES = ("116x28", "232x14", "464x7")


# --- measurement primitives ------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(
    fns: dict[str, Callable[[], Any]],
    *,
    device: torch.device,
    warmup: int = 2,
    repeats: int = 10,
    min_block_s: float = 0.0,
    max_inner: int = 1000,
    failures: dict[str, str] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every function, timed in interleaved blocks.

    Each function runs ``warmup`` times untimed, then once timed to choose its block length
    (the number of calls that lasts at least ``min_block_s``). Then ``repeats`` rounds time one
    block of each function in turn, with the device synchronized around every block.

    Args:
        fns: name -> function of no arguments.
        device: synchronized around the timed blocks.
        warmup: untimed calls of each function.
        repeats: timed blocks of each function.
        min_block_s: least duration of a block (short calls are repeated inside one block).
        max_inner: most calls in one block.
        failures: when given, a function that raises during its warm-up (anything but running
            out of device memory: a kernel that does not compile on this device, say) is left
            out of the rounds and ``failures[name]`` says what it raised; the others are timed.
            ``None``: the exception propagates.

    Returns:
        name -> ``repeats`` seconds-per-call values, one per block (none for a failed function).
    """
    inner: dict[str, int] = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            _synchronize(device)
            t0 = time.perf_counter()
            fn()
            _synchronize(device)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:
            if failures is None:
                raise
            failures[name] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            continue
        once = max(time.perf_counter() - t0, 1e-9)
        inner[name] = max(1, min(max_inner, math.ceil(min_block_s / once)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if name not in inner:
                continue
            k = inner[name]
            _synchronize(device)
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            _synchronize(device)
            times[name].append((time.perf_counter() - t0) / k)
    return times


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of the distinct storages that autograd saves for backward while ``fn`` runs.

    Every tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` is attributed to its
    storage; each storage counts once, and storages of ``exclude`` (the parameters) not at all.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in excluded:
            storages[ptr] = max(storages.get(ptr, 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _layout_of(t: Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _tensor_bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --- what is measured --------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """Everything one run of the benchmark needs (one CSV per precision and layout)."""

    device: str = "cpu"
    precisions: Sequence[str] = ("fp32",)
    layouts: Sequence[str] = ("channels_last",)
    parts: Sequence[str] = ("layer", "model")
    batches: Sequence[int] = (1, 32, 256)
    models: Sequence[str] = DEFAULT_MODELS
    stems: Sequence[str] = ("cifar", "imagenet")
    layer_shapes: Sequence[str] = DEFAULT_LAYER_SHAPES
    layer_variants: Sequence[str] = LAYER_VARIANTS
    model_variants: Sequence[str] = MODEL_VARIANTS
    modes: Sequence[str] = MODES
    warmup: int = 2
    repeats: int = 10
    min_block_ms: float = 20.0
    threads: int | None = 2
    compile: str = "none"
    time_budget_s: float | None = None
    seed: int = 0
    verbose: bool = True
    skip: list[str] = field(default_factory=list)
    refs: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    commit: str = ""


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return name


#: environment variables that change how the CPU threads wait (recorded with the results)
CPU_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS")


def _cpu_env() -> str:
    return " ".join(f"{k}={os.environ[k]}" for k in CPU_ENV if k in os.environ)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def csv_name(
    device: str,
    device_name: str,
    precision: str,
    layout: str,
    threads: int | None,
    torch_version: str = torch.__version__,
    suffix: str = "",
) -> str:
    """File name that says the device, precision, layout and torch version.

    ``cpu-2threads_fp32_channels_last_torch2.14.1-cu130.csv``,
    ``cuda-NVIDIA-H100-80GB-HBM3_bf16_channels_last_torch2.14.1-cu130.csv`` (letters, digits,
    ``.``, ``_`` and ``-`` only).
    """
    dev = f"cpu-{threads}threads" if device == "cpu" else f"{device}-{device_name}"
    return f"{_slug(dev)}_{precision}_{layout}_torch{_slug(torch_version)}{suffix}.csv"


def _parse_shape(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise ValueError(f"layer shape {text!r} is not CHANNELSxSIZE, e.g. 116x28")
    return int(m.group(1)), int(m.group(2))


class NativeShuffle(nn.Module):
    """The fixed channel shuffle by PyTorch's ``channel_shuffle`` kernel (keeps channels_last)."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        return F.channel_shuffle(x, self.groups)


def _native_mixer(channels: int, **kwargs: Any) -> nn.Module:
    return NativeShuffle(2)


def load_ref_layers(commit: str) -> Any:
    """Import ``src/dyshuffle/layers`` as it was at git ``commit``, as a separate package.

    Lets ``--ref COMMIT`` time an earlier implementation of the layers side by side with the
    current one (variants ``dynamic@COMMIT``, ``static_dynamic@COMMIT``).
    """
    import importlib
    import tempfile

    root = Path(__file__).resolve().parents[2]
    listing = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", commit, "src/dyshuffle/layers"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    # the modules and the sources they build (the CPU kernel's C file)
    files = [f for f in listing.stdout.split() if f.endswith((".py", ".c"))]
    if listing.returncode or not files:
        raise ValueError(
            f"--ref {commit!r}: no src/dyshuffle/layers at that commit ({listing.stderr})"
        )
    name = "_dyshuffle_layers_" + re.sub(r"\W", "_", commit)
    # the commit's custom operators in a namespace of their own: registered as dyshuffle::...
    # they would replace the current layers' operators in this process (compiled graphs of
    # both would run the commit's kernel)
    namespace = name.lstrip("_").encode()
    folder = Path(tempfile.mkdtemp(prefix="dyshuffle-ref-"))
    (folder / name).mkdir()
    for f in files:
        text = subprocess.run(
            ["git", "show", f"{commit}:{f}"], cwd=root, capture_output=True, check=True
        ).stdout
        if f.endswith(".py"):
            text = text.replace(b'"dyshuffle::', b'"' + namespace + b"::")
            text = text.replace(b"torch.ops.dyshuffle.", b"torch.ops." + namespace + b".")
        (folder / name / Path(f).name).write_bytes(text)
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))


#: option words that are not strings: ``dynamic=false``, ``logit_cap=none``
_OPTION_WORDS = {"true": True, "false": False, "none": None}


def _option_value(text: str) -> bool | int | float | str | None:
    if text.lower() in _OPTION_WORDS:
        return _OPTION_WORDS[text.lower()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def split_variant(variant: str, refs: dict[str, Any] | None = None) -> tuple[str, Any, dict]:
    """Parse ``NAME[@COMMIT][:KEY=VALUE,...]``.

    ``"dynamic@abc123"`` is the dynamic shuffle of the layers at commit ``abc123`` (loaded with
    ``--ref abc123``); ``"dynamic:reduction=16,max_group_size=8"`` passes keywords to the dynamic
    (or static-dynamic) layer; values are ``true``/``false``/``none``, integers, floats or
    strings.

    Returns:
        ``(name, layers package or None, keywords)``.
    """
    refs = refs or {}
    head, _, opts = variant.partition(":")
    base, _, ref = head.partition("@")
    if base not in LAYER_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid names: {', '.join(LAYER_VARIANTS)}")
    if ref and ref not in refs:
        raise ValueError(f"variant {variant!r} names ref {ref!r}, not loaded (use --ref {ref})")
    kwargs: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise ValueError(f"variant {variant!r}: option {item!r} is not KEY=VALUE")
        kwargs[key] = _option_value(value)
    if kwargs and base not in ("dynamic", "static_dynamic"):
        raise ValueError(f"variant {variant!r}: only dynamic and static_dynamic take options")
    return base, refs.get(ref), kwargs


def _build_layer(variant: str, channels: int, refs: dict[str, Any] | None = None) -> nn.Module:
    base, mod, kwargs = split_variant(variant, refs)
    layers = mod if mod is not None else _layers
    if base == "fixed":
        return ChannelShuffle(2, channels)
    if base == "fixed_native":
        return NativeShuffle(2)
    if base == "dynamic":
        return layers.DynamicShuffle(channels, **kwargs)
    if base == "static_dynamic":
        return layers.StaticDynamicShuffle(channels, **kwargs)
    return nn.Conv2d(channels, channels, 1, bias=False)  # conv1x1


def _build_model(
    variant: str, name: str, stem: str, refs: dict[str, Any] | None = None
) -> nn.Module:
    from dyshuffle.models import create_model

    base, mod, options = split_variant(variant, refs)
    if base not in MODEL_VARIANTS:
        raise ValueError(f"{variant!r} is no model variant; valid: {', '.join(MODEL_VARIANTS)}")
    kwargs: dict[str, Any] = {"mixer": "shuffle", "pointwise": "conv"}
    if base == "fixed_native":
        kwargs["mixer"] = _native_mixer
    elif base == "dynamic":
        kwargs["mixer"] = "dynamic" if mod is None else mod.DynamicShuffle
        kwargs.update(options)
    elif base == "static_dynamic":
        if mod is not None:
            raise ValueError(f"model variant {variant!r}: only dynamic@REF is supported")
        kwargs["pointwise"] = "sds"
        if options:
            kwargs["pointwise_kwargs"] = options
    return create_model(name, num_classes=STEM_CLASSES[stem], stem=stem, **kwargs)


def _ortho(variant: str, refs: dict[str, Any]) -> Callable[[nn.Module], Tensor]:
    """The orthogonal regularizer that sees the dynamic layers of ``variant``."""
    _, mod, _ = split_variant(variant, refs)
    return orthogonal_loss if mod is None else mod.orthogonal_loss


def _counts(module: nn.Module, input_size: tuple[int, int, int, int]) -> tuple[int, int]:
    from dyshuffle.macs import count_macs, count_params

    was_training = module.training
    module.eval()
    try:
        return count_params(module), count_macs(module, input_size)
    finally:
        module.train(was_training)


class _Case:
    """One module (layer or model) prepared for inference calls and training steps."""

    def __init__(
        self,
        module: nn.Module,
        x: Tensor,
        kind: str,
        device: torch.device,
        precision: str,
        compile_mode: str,
        ortho: Callable[[nn.Module], Tensor] = orthogonal_loss,
    ) -> None:
        self.module = module
        self.ortho = ortho
        self.x = x
        self.device = device
        self.dtype = PRECISIONS[precision]
        params = [p for p in module.parameters() if p.requires_grad]
        self.params = params
        self.opt = (
            torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)
            if params
            else None
        )
        self.kind = kind
        gen = torch.Generator(device="cpu").manual_seed(1)
        if kind == "model":
            self.target = torch.randint(0, 10, (x.shape[0],), generator=gen).to(device)
            self.x_train = x
        else:
            self.x_train = x.detach().clone().requires_grad_(True)
            self.gy: Tensor | None = None
        self.fwd = module
        if compile_mode != "none":
            self.fwd = torch.compile(
                module, mode=None if compile_mode == "default" else compile_mode
            )

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def infer(self) -> None:
        self.module.eval()
        with torch.no_grad(), self._autocast():
            self.fwd(self.x)

    def _backward(self) -> None:
        """Forward and backward of the training objective (see the module docstring)."""
        with self._autocast():
            y = self.fwd(self.x_train)
            if self.kind == "model":
                out, grads = [F.cross_entropy(y.float(), self.target)], [None]
            else:  # d<y, g>/dy = g: backpropagate g without a product and a sum
                if self.gy is None or self.gy.shape != y.shape:
                    gen = torch.Generator(device="cpu").manual_seed(2)
                    self.gy = torch.randn(y.shape, generator=gen).to(self.device, y.dtype)
                out, grads = [y], [self.gy.to(memory_format=_layout_of(y))]
        reg = self.ortho(self.module)
        if reg.requires_grad:
            out, grads = [*out, ORTHO_WEIGHT * reg], [*grads, None]
        if grads[0] is None:
            out[0] = sum(out[1:], out[0])
            out, grads = out[:1], None
        torch.autograd.backward(out, grads)

    def train_step(self) -> None:
        self.module.train()
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        if self.kind != "model":
            self.x_train.grad = None
        self._backward()
        if self.opt is not None:
            self.opt.step()

    def _optimizer_state(self) -> list[Tensor]:
        if self.opt is None:
            return []
        return [t for s in self.opt.state.values() for t in s.values() if isinstance(t, Tensor)]

    def train_memory(self) -> tuple[float, str]:
        """Training memory in MB and how it was measured (see the module docstring)."""
        resident = _tensor_bytes(self.params) + _tensor_bytes(self._optimizer_state())
        if self.device.type == "cuda":
            # other variants' models stay on the device: count this step's increase over what
            # was allocated before it, plus this model's parameters, optimizer state and input
            gc.collect()
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.train_step()
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - before
            total = peak + resident + _tensor_bytes([self.x_train])
            return total / 2**20, "cuda_peak_increase+params+optimizer_state+input"
        self.module.train()
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        if self.kind != "model":
            self.x_train.grad = None
        saved = saved_tensor_bytes(self._backward, exclude=self.params)
        if self.opt is not None:
            self.opt.step()
        total = saved + _tensor_bytes(self.params) + resident  # + gradients
        return total / 2**20, "saved_tensors+params+grads+optimizer_state"


class _Budget:
    def __init__(self, seconds: float | None) -> None:
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def spent(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def _log(cfg: BenchConfig, msg: str) -> None:
    if cfg.verbose:
        print(msg, file=sys.stderr, flush=True)


def _measure_group(
    cases: dict[str, _Case],
    modes: Sequence[str],
    cfg: BenchConfig,
    device: torch.device,
    base: dict[str, Any],
    budget: _Budget | None = None,
    *,
    on_mode: Callable[[list[dict[str, Any]]], None],
) -> None:
    """Measure every variant and mode of one (part, target, batch); ``on_mode`` gets the rows of
    each mode as soon as it is measured (so a run stopped during the next mode, a compilation
    for instance, keeps them)."""
    rows = []
    batch = base["batch"]
    for mode in modes:
        if budget is not None and budget.spent():
            _log(cfg, f"time budget spent: skipping {base['target']} b={batch} {mode}")
            continue
        fns = {v: (case.infer if mode == "infer" else case.train_step) for v, case in cases.items()}
        note = ""
        failures: dict[str, str] = {}  # a variant that raises is reported, the others measured
        try:
            times = time_round_robin(
                fns,
                device=device,
                warmup=cfg.warmup,
                repeats=cfg.repeats,
                min_block_s=cfg.min_block_ms / 1e3,
                failures=failures,
            )
        except torch.cuda.OutOfMemoryError:
            times, note = {v: [] for v in cases}, "out of memory"
            torch.cuda.empty_cache()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        ref_times = times.get(BASELINE, [])
        for variant, case in cases.items():
            if ref_times and len(times[variant]) == len(ref_times):
                # rounds are interleaved: the ratio within a round sees the same load
                paired = statistics.median(t / r for t, r in zip(times[variant], ref_times))
            else:
                paired = None
            ts = sorted(times[variant])
            row = dict(
                base,
                variant=variant,
                mode=mode,
                repeats=len(ts),
                note=f"failed: {failures[variant]}" if variant in failures else note,
                latency_ratio_paired=paired,
                load_avg=load,
            )
            if ts:
                q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
                med = statistics.median(ts)
                row.update(
                    latency_ms=med * 1e3,
                    latency_p25_ms=q[0] * 1e3,
                    latency_p75_ms=q[2] * 1e3,
                    throughput_per_s=batch / med,
                )
            if mode == "train" and ts:
                try:
                    row["train_mem_mb"], row["mem_method"] = case.train_memory()
                except torch.cuda.OutOfMemoryError:
                    row["note"] = "out of memory (memory step)"
                    torch.cuda.empty_cache()
            rows.append(row)
        for variant, what in failures.items():
            print(
                f"bench: {variant} {base['target']} b={batch} {mode} failed: {what}",
                file=sys.stderr,
            )
        _log(cfg, "  " + _format_progress(rows[-len(cases) :]))
        on_mode(rows[-len(cases) :])


def _format_progress(rows: list[dict[str, Any]]) -> str:
    r0 = rows[0]
    parts = [f"{r0['part']} {r0['target']} b={r0['batch']} {r0['mode']}:"]
    for r in rows:
        lat = r.get("latency_ms")
        parts.append(f"{r['variant']}={lat:.3f}ms" if lat is not None else f"{r['variant']}=n/a")
    return " ".join(parts)


def run_benchmark(
    cfg: BenchConfig, precision: str, layout: str, on_rows: Callable[[list], None] | None = None
) -> list[dict[str, Any]]:
    """Measure every configured part, target, batch, variant and mode for one precision/layout.

    Args:
        cfg: the configuration.
        precision: ``"fp32"`` or ``"bf16"``.
        layout: ``"channels_last"`` or ``"contiguous"``.
        on_rows: called with all rows so far after each measured mode of each group (to save
            partial results).

    Returns:
        rows (dicts over :data:`COLUMNS`) with the ratios to the fixed shuffle filled in.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    device = torch.device(cfg.device)
    fmt = LAYOUTS[layout]
    common = dict(
        device=device.type,
        device_name=_device_name(device),
        torch=torch.__version__,
        precision=precision,
        layout=layout,
        threads=torch.get_num_threads() if device.type == "cpu" else "",
        compile=cfg.compile,
        cpu_env=_cpu_env() if device.type == "cpu" else "",
        commit=cfg.commit,
        date=datetime.date.today().isoformat(),
        command=cfg.command,
    )
    budget = _Budget(cfg.time_budget_s)
    rows: list[dict[str, Any]] = []

    def done(new: list[dict[str, Any]]) -> None:
        rows.extend(new)
        if on_rows is not None:
            on_rows(add_ratios(rows))

    def prep(module: nn.Module) -> nn.Module:
        return module.to(device=device, memory_format=fmt)

    def measure(
        part: str, target: str, shape: tuple[int, ...], modules: dict, counts: dict, batch: int
    ) -> None:
        """Measure every variant of one part (layer or model) at one batch size."""
        gen = torch.Generator().manual_seed(cfg.seed)
        x = torch.randn(batch, *shape, generator=gen)
        x = x.to(device=device).contiguous(memory_format=fmt)
        cases = {
            v: _Case(m, x, part, device, precision, cfg.compile, _ortho(v, cfg.refs))
            for v, m in modules.items()
        }
        base = dict(common, part=part, target=target, input="x".join(map(str, shape)), batch=batch)

        def save(new: list[dict[str, Any]]) -> None:
            for r in new:
                r["params"], r["macs"] = counts[r["variant"]]
            done(new)

        _measure_group(cases, cfg.modes, cfg, device, base, budget, on_mode=save)

    def run_layers() -> None:
        for shape in cfg.layer_shapes:
            channels, size = _parse_shape(shape)
            counts = {}
            modules = {}
            for variant in cfg.layer_variants:
                torch.manual_seed(cfg.seed)
                module = _build_layer(variant, channels, cfg.refs)
                counts[variant] = _counts(module, (1, channels, size, size))
                modules[variant] = prep(module)
            for batch in cfg.batches:
                if budget.spent():
                    _log(cfg, f"time budget spent: skipping layer {shape} batch {batch}")
                    continue
                target = f"C{channels} {size}x{size}"
                measure("layer", target, (channels, size, size), modules, counts, batch)

    def run_models() -> None:
        for name in cfg.models:
            for stem in cfg.stems:
                res = STEM_RESOLUTION[stem]
                counts = {}
                modules = {}
                for variant in cfg.model_variants:
                    torch.manual_seed(cfg.seed)
                    model = _build_model(variant, name, stem, cfg.refs)
                    counts[variant] = _counts(model, (1, 3, res, res))
                    modules[variant] = prep(model)
                for batch in cfg.batches:
                    key = f"{name}/{stem}/{batch}"
                    if budget.spent() or any(re.fullmatch(p, key) for p in cfg.skip):
                        _log(cfg, f"skipping model {key}")
                        continue
                    measure("model", f"{name} {stem}", (3, res, res), modules, counts, batch)
                del modules
                gc.collect()

    for part in cfg.parts:
        {"layer": run_layers, "model": run_models}[part]()
    return add_ratios(rows)


# --- ratios, CSV and markdown ------------------------------------------------------------------


def _key(row: dict[str, Any]) -> tuple:
    return tuple(str(row.get(k, "")) for k in ("part", "target", "batch", "mode"))


def _number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill the ratio columns: each value over the fixed shuffle's value in the same group.

    The group is (part, target, batch, mode). A ratio is left empty when either value is missing
    or the fixed value is zero.
    """
    base = {_key(r): r for r in rows if r.get("variant") == BASELINE}
    out = []
    for r in rows:
        r = dict(r)
        ref = base.get(_key(r))
        for col, ratio in RATIOS.items():
            v, b = _number(r.get(col)), _number(ref.get(col)) if ref else None
            r[ratio] = v / b if v is not None and b else None
        out.append(r)
    return out


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``rows`` with :data:`COLUMNS` (atomically: a temp file, then ``os.replace``)."""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(r.get(k)) for k in COLUMNS})
    return atomic_write_text(path, text.getvalue())


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a benchmark CSV as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fmt(v: Any, digits: int = 3) -> str:
    x = _number(v)
    if x is None:
        return ""
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{digits}g}" if abs(x) < 10 else f"{x:.1f}"


def _fmt_ratio(v: Any) -> str:
    x = _number(v)
    return "" if x is None else f"{x:.2f}"


def _fmt_count(v: Any, unit: float, suffix: str) -> str:
    x = _number(v)
    return "" if x is None else f"{x / unit:.3g}{suffix}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of benchmark rows (one line per part, target, batch, mode and variant)."""
    head = (
        "| part | target | batch | mode | variant | latency ms (p25-p75) | x fixed | samples/s "
        "| train MB | x fixed | params | x fixed | MACs/sample | x fixed | note |"
    )
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        lat = _number(r.get("latency_ms"))
        spread = (
            f"{_fmt(r.get('latency_ms'))} ({_fmt(r.get('latency_p25_ms'))}-"
            f"{_fmt(r.get('latency_p75_ms'))})"
            if lat is not None
            else ""
        )
        macs = _number(r.get("macs"))
        per_sample = None if macs is None else macs
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r.get("part", "")),
                    str(r.get("target", "")),
                    str(r.get("batch", "")),
                    str(r.get("mode", "")),
                    str(r.get("variant", "")),
                    spread,
                    _fmt_ratio(r.get("latency_ratio")),
                    _fmt(r.get("throughput_per_s")),
                    _fmt(r.get("train_mem_mb")),
                    _fmt_ratio(r.get("train_mem_ratio")),
                    _fmt_count(r.get("params"), 1e6, "M"),
                    _fmt_ratio(r.get("params_ratio")),
                    _fmt_count(per_sample, 1e6, "M"),
                    _fmt_ratio(r.get("macs_ratio")),
                    str(r.get("note", "") or ""),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def _ratio(num: Any, den: Any) -> float | None:
    a, b = _number(num), _number(den)
    return a / b if a is not None and b else None


def _model_index(rows: Sequence[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """The whole-model rows of one run by (target, batch as text, mode, variant)."""
    return {
        (r.get("target"), str(r.get("batch")), r.get("mode"), r.get("variant")): r
        for r in rows
        if r.get("part") == "model"
    }


def _latency_ratio(
    by: dict[tuple, dict[str, Any]], target: Any, batch: str, mode: str, variant: str
) -> float | None:
    """Median latency of ``variant`` over the fixed shuffle's, in one run (``None``: missing).

    The one computation behind the summary tables and the ``--plot`` figures.
    """

    def latency(var: str) -> Any:
        return by.get((target, batch, mode, var), {}).get("latency_ms")

    return _ratio(latency(variant), latency(BASELINE))


def summary_table(rows: Sequence[dict[str, Any]], variant: str = "dynamic") -> str:
    """The issue's target ratios for whole models: ``variant`` over the fixed shuffle.

    One line per model, stem and batch: inference and training-step latency, training memory,
    parameters and MACs over the fixed shuffle, and the latencies over the native-kernel fixed
    shuffle (``fixed_native``) when it was measured. Empty where a value is missing.
    """
    by = _model_index(rows)
    keys = sorted(
        {(t, b) for (t, b, _, v) in by if v == variant},
        key=lambda k: (k[0], int(k[1])),
    )
    head = (
        f"| model | batch | infer {variant}/fixed | train {variant}/fixed "
        f"| train memory | params | MACs | infer {variant}/fixed_native "
        f"| train {variant}/fixed_native |"
    )
    lines = [head, "|" + "---|" * 9]
    for target, batch in keys:

        def get(mode: str, var: str, col: str, target=target, batch=batch) -> Any:
            return by.get((target, batch, mode, var), {}).get(col)

        def lat(mode: str, target=target, batch=batch) -> str:
            r = _fmt_ratio(_latency_ratio(by, target, batch, mode, variant))
            paired = _fmt_ratio(get(mode, variant, "latency_ratio_paired"))
            return f"{r} ({paired})" if r and paired else r

        cells = [
            lat("infer"),
            lat("train"),
            _ratio(get("train", variant, "train_mem_mb"), get("train", "fixed", "train_mem_mb")),
            _ratio(get("infer", variant, "params"), get("infer", "fixed", "params")),
            _ratio(get("infer", variant, "macs"), get("infer", "fixed", "macs")),
            _ratio(get("infer", variant, "latency_ms"), get("infer", "fixed_native", "latency_ms")),
            _ratio(get("train", variant, "latency_ms"), get("train", "fixed_native", "latency_ms")),
        ]
        text = [c if isinstance(c, str) else _fmt_ratio(c) for c in cells]
        lines.append(f"| {target} | {batch} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def markdown_section(name: str, rows: Sequence[dict[str, Any]], command: str | None = None) -> str:
    """The markdown section of one CSV: conditions, the exact command, a summary, the table."""
    r0 = rows[0] if rows else {}
    command = command or r0.get("command") or "?"
    commit = r0.get("commit")
    stamp = ", ".join(x for x in (f"commit {commit}" if commit else "", r0.get("date")) if x)
    cond = (
        f"device **{r0.get('device', '?')}** ({r0.get('device_name', '?')}"
        + (
            f", {r0.get('threads')} thread{'' if str(r0.get('threads')) == '1' else 's'}"
            if r0.get("threads") not in (None, "")
            else ""
        )
        + f"), precision **{r0.get('precision', '?')}**, layout **{r0.get('layout', '?')}**, "
        f"torch {r0.get('torch', '?')}, compile {r0.get('compile', 'none')}"
        + (f", {r0.get('cpu_env')}" if r0.get("cpu_env") else "")
    )
    loads = [x for x in (_number(r.get("load_avg")) for r in rows) if x is not None]
    if loads:
        cond += (
            f"; 1-minute load average of the machine while measuring: "
            f"{min(loads):.1f} to {max(loads):.1f}"
        )
    memo = {r.get("mem_method") for r in rows if r.get("mem_method")}
    lines = [
        f"<!-- bench:{name} -->",
        f"### {name}",
        "",
        cond + ".",
        "",
        f"Command: `{command}`" + (f" ({stamp})" if stamp else ""),
        "",
        "Training memory: " + (", ".join(sorted(memo)) or "not measured") + ".",
        "",
    ]
    dynamic = [
        v
        for v in dict.fromkeys(r.get("variant") for r in rows if r.get("part") == "model")
        if v and v.startswith("dynamic")
    ]
    for variant in dynamic:
        lines += [
            f"Whole models, `{variant}` over the fixed shuffle: latency as the ratio of the "
            "medians (in parentheses: the median of the ratios within each round); memory, "
            "parameters and MACs as in the table below.",
            "",
            summary_table(rows, variant),
            "",
        ]
    lines += [markdown_table(rows), f"<!-- /bench:{name} -->"]
    return "\n".join(lines)


def update_markdown(path: str | os.PathLike, name: str, section: str) -> Path:
    """Replace the section of ``name`` in the markdown file ``path`` (append when absent)."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(
        rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.DOTALL
    )
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path


# --- figure: whole-model latency ratios against the targets ---------------------------

#: the issue's targets for whole models: latency over the fixed shuffle's, per mode
LATENCY_TARGETS = {"infer": 1.10, "train": 1.35}
MODE_TITLES = {
    "infer": "inference (eval, hard permutations)",
    "train": "training step (forward, backward, SGD)",
}
#: the CSV columns that say under which conditions a run measured (figure title or legend)
CONDITIONS = ("device", "device_name", "threads", "precision", "layout", "torch", "compile")
#: formats ``--plot`` writes (by the file's suffix)
PLOT_FORMATS = (".png", ".svg", ".pdf")


@dataclass
class RatioSeries:
    """One line of the ``--plot`` figure: a mixer's median latency over the fixed shuffle's, per
    batch, for one model and stem of one run (one CSV, one set of conditions).

    ``ratio`` is :func:`_latency_ratio`, the number of the summary tables; ``paired`` is the CSV's
    ``latency_ratio_paired``; ``low`` / ``high`` are the variant's 25th / 75th percentile over
    the fixed shuffle's 75th / 25th (``None`` where the CSV lacks them).
    """

    source: str
    mode: str
    variant: str
    target: str
    conditions: dict[str, str]
    batches: list[int] = field(default_factory=list)
    ratio: list[float] = field(default_factory=list)
    paired: list[float | None] = field(default_factory=list)
    low: list[float | None] = field(default_factory=list)
    high: list[float | None] = field(default_factory=list)


def _conditions(row: dict[str, Any]) -> dict[str, str]:
    return {c: str(row.get(c) if row.get(c) is not None else "") for c in (*CONDITIONS, "cpu_env")}


def ratio_series(sources: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> list[RatioSeries]:
    """The whole-model latency ratios of each run, as lines over the batch size.

    Args:
        sources: ``(name, rows)`` per run, e.g. ``(csv stem, read_csv(path))``; rows of several
            conditions in one source are kept apart.

    Returns:
        one series per source, conditions, mode, non-fixed variant and model/stem with at least
        one ratio, batches in increasing order.
    """
    out: list[RatioSeries] = []
    for source, rows in sources:
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for r in rows:
            if r.get("part") == "model":
                groups.setdefault(tuple(_conditions(r).items()), []).append(r)
        for cond, group in groups.items():
            by = _model_index(group)
            variants = [v for v in dict.fromkeys(k[3] for k in by) if v and v != BASELINE]
            targets = list(dict.fromkeys(k[0] for k in by))
            for mode in MODES:
                for variant in variants:
                    for target in targets:
                        s = RatioSeries(source, mode, variant, str(target), dict(cond))
                        batches = sorted(
                            {b for (t, b, m, v) in by if (t, m, v) == (target, mode, variant)},
                            key=int,
                        )
                        for b in batches:
                            ratio = _latency_ratio(by, target, b, mode, variant)
                            if ratio is None:
                                continue
                            row, fixed = (
                                by[(target, b, mode, variant)],
                                by[(target, b, mode, BASELINE)],
                            )
                            s.batches.append(int(b))
                            s.ratio.append(ratio)
                            s.paired.append(_number(row.get("latency_ratio_paired")))
                            s.low.append(
                                _ratio(row.get("latency_p25_ms"), fixed.get("latency_p75_ms"))
                            )
                            s.high.append(
                                _ratio(row.get("latency_p75_ms"), fixed.get("latency_p25_ms"))
                            )
                        if s.batches:
                            out.append(s)
    return out


def _model_label(target: str) -> str:
    """``"shufflenet_v2_x1_0 cifar"`` -> ``"ShuffleNetV2 1.0x, CIFAR stem"``."""
    name, _, stem = target.partition(" ")
    m = re.fullmatch(r"shufflenet_v2_x(\d+)_(\d+)", name)
    name = f"ShuffleNetV2 {m.group(1)}.{m.group(2)}x" if m else name
    stem = {"cifar": "CIFAR", "imagenet": "ImageNet"}.get(stem, stem)
    return f"{name}, {stem} stem" if stem else name


def _condition_items(c: dict[str, str]) -> dict[str, str]:
    """The conditions of a series as short phrases, one per aspect (device, precision, ...)."""
    cpu = c["device"] == "cpu"
    threads = c["threads"]
    where = c["device"] + (f", {threads} thread{'' if threads == '1' else 's'}" if threads else "")
    comp = c["compile"]
    return {
        "device": f"{c['device_name'] or '?'} ({where})",
        "precision": c["precision"] + (" (autocast)" if c["precision"] == "bf16" else ""),
        "layout": c["layout"],
        "torch": f"torch {c['torch']}",
        "compile": "eager" if comp in ("", "none") else f"torch.compile {comp}",
        "env": c["cpu_env"] or ("default OpenMP wait policy" if cpu else ""),
    }


def _short_names(sources: Sequence[str]) -> dict[str, str]:
    """Run names for a legend: each source without the part all of them share (up to a ``_``).

    One source: ``{source: source}``. Several: ``{source: "..." + rest}`` and, under ``""``, the
    shared part (for the title).
    """
    names = list(dict.fromkeys(sources))
    if len(names) == 1:
        return {names[0]: names[0]}
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind("_") + 1]
    return {"": prefix, **{n: "..." + n[len(prefix) :] if prefix else n for n in names}}


def _ratio_panel(
    ax: Any,
    mode: str,
    lines: Sequence[tuple[RatioSeries, str]],
    batches: Sequence[int],
    colors: dict[str, str],
    markers: dict[str, str],
    styles: dict[str, str],
    tags: dict[str, str],
) -> None:
    """One mode's panel of :func:`plot_latency_ratios` (``tags``: run -> number, for a line of
    one point, whose line style does not show)."""
    from matplotlib.ticker import NullLocator

    target = LATENCY_TARGETS[mode]
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(batches[0] / 1.8, batches[-1] * 1.8)
    ax.set_xlabel("batch size (log scale)")
    ax.set_ylabel("latency / latency of the fixed shuffle")
    ax.set_title(f"{MODE_TITLES[mode]}: target <= {target:.2f}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.axhline(1.0, color="0.4", lw=0.8)
    core = [target, 1.0] + [y for s, _ in lines for y in (*s.ratio, *s.paired) if y is not None]
    lo, hi = min(core), max(core)
    pad = max(0.03, 0.08 * (hi - lo))
    lo, hi = lo - pad, hi + pad
    whiskers = [y for s, _ in lines for y in (*s.low, *s.high) if y is not None]
    span = hi - lo  # whiskers may widen the frame by a tenth, no more: the medians stay legible
    ylo, yhi = max(min([lo, *whiskers]), lo - span / 10), min(max([hi, *whiskers]), hi + span / 10)
    ax.set_ylim(ylo, yhi)
    ax.axhspan(target, yhi, color="crimson", alpha=0.06, lw=0)
    ax.axhline(target, color="crimson", ls="--", lw=1.2)
    if not lines:
        ax.text(0.5, 0.5, "not measured in these CSVs", transform=ax.transAxes,
                ha="center", va="center", color="0.4")  # fmt: skip
        return
    n = len(lines)
    step = min(0.1, 1.0 / max(n - 1, 1))  # log2 units: the points of one batch side by side
    for j, (s, key) in enumerate(lines):
        shift = 2 ** ((j - (n - 1) / 2) * step)
        x = [b * shift for b in s.batches]
        color, marker = colors[s.variant], markers[s.target]
        err = [
            [r - w if w is not None else 0.0 for r, w in zip(s.ratio, s.low)],
            [w - r if w is not None else 0.0 for r, w in zip(s.ratio, s.high)],
        ]
        ax.errorbar(x, s.ratio, yerr=err, ls="none", ecolor=color, elinewidth=0.8, capsize=1.5,
                    alpha=0.45)  # fmt: skip
        ax.plot(x, s.ratio, color=color, marker=marker, ls=styles[key], lw=1.1, ms=5.5)
        paired = [(xi, p) for xi, p in zip(x, s.paired) if p is not None]
        if paired:
            ax.plot(*zip(*paired), ls="none", marker=marker, ms=9, mfc="none", mec=color, mew=0.8)
        if len(x) == 1 and tags.get(key):
            ax.annotate(tags[key], (x[0], s.ratio[0]), xytext=(6, -3), textcoords="offset points",
                        fontsize=8, color=color, fontweight="bold")  # fmt: skip
    if any(y < ylo or y > yhi for y in whiskers):
        ax.text(0.01, 0.01, "some whiskers run past the frame", transform=ax.transAxes,
                fontsize=7, color="0.3")  # fmt: skip


def plot_latency_ratios(
    sources: Sequence[tuple[str, Sequence[dict[str, Any]]]],
    path: str | os.PathLike,
    *,
    dpi: int = 100,
) -> list[RatioSeries]:
    """Draw the whole-model latency ratios to the fixed shuffle against the issue's targets.

    One panel per mode (inference with hard permutations, training step); in each, every
    non-fixed mixer's ratio (:func:`ratio_series`, the summary tables' number) against the batch
    size on a log axis, one line per mixer (color), model and stem (marker) and run (line style,
    when there are several runs or conditions); the target as a dashed line; open markers for the
    paired ratio; whiskers from the CSV's quartiles. Conditions common to every line go in the
    title, the others in the legend. Written atomically (a temporary file in the same folder,
    then ``os.replace``) with matplotlib's Agg canvas (no pyplot, no global backend change).

    Args:
        sources: ``(name, rows)`` per run, e.g. ``(csv stem, read_csv(path))``.
        path: the figure; ``.png`` (default), ``.svg`` or ``.pdf``.
        dpi: resolution of a PNG.

    Returns:
        the series drawn.

    Raises:
        ValueError: no whole-model row with a fixed shuffle to compare with.
    """

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    series = ratio_series(sources)
    if not series:
        names = ", ".join(name for name, _ in sources)
        raise ValueError(f"no whole-model rows with a fixed shuffle to plot in {names}")
    path = Path(path)
    fmt = path.suffix.lower()[1:] or "png"

    items = [_condition_items(s.conditions) for s in series]
    common = {k: v for k, v in items[0].items() if v and all(i[k] == v for i in items)}
    varying = [k for k in items[0] if k not in common and any(i[k] for i in items)]
    short = _short_names([s.source for s in series])
    keys = [
        ", ".join(([short[s.source]] if len(short) > 1 else []) + [i[k] for k in varying if i[k]])
        for s, i in zip(series, items)
    ]
    variants = list(dict.fromkeys(s.variant for s in series))
    targets = list(dict.fromkeys(s.target for s in series))
    run_labels = list(dict.fromkeys(keys))
    colors = {v: f"C{j % 10}" for j, v in enumerate(variants)}
    markers = {t: "osD^vP*X"[j % 8] for j, t in enumerate(targets)}
    styles = {k: ["-", "--", ":", "-."][j % 4] for j, k in enumerate(run_labels)}
    tags = {k: str(j + 1) for j, k in enumerate(run_labels)} if len(run_labels) > 1 else {}
    batches = sorted({b for s in series for b in s.batches})

    fig = Figure(figsize=(11, 6.8), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, mode in zip(fig.subplots(1, len(MODES)), MODES):
        lines = sorted(
            ((s, k) for s, k in zip(series, keys) if s.mode == mode),
            key=lambda sk: (run_labels.index(sk[1]), variants.index(sk[0].variant)),
        )
        _ratio_panel(ax, mode, lines, batches, colors, markers, styles, tags)

    def header(text: str) -> tuple[Line2D, str]:
        return Line2D([], [], ls="none"), text

    groups = [
        [header("mixer (color)")] + [(Line2D([], [], color=colors[v], lw=2), v) for v in variants],
        [header("model, stem (marker)")]
        + [
            (Line2D([], [], color="0.3", marker=markers[t], ls="none"), _model_label(t))
            for t in targets
        ],
        [header("markers and whiskers")]
        + [
            (Line2D([], [], color="0.3", marker="o", ls="none"), "ratio of the medians (tables)"),
            (Line2D([], [], mec="0.3", mfc="none", marker="o", ms=8, ls="none"), "paired ratio"),
            (Line2D([], [], color="0.3", marker="|", ms=12, ls="none"), "p25-p75 / fixed p75-p25"),
            (Line2D([], [], color="crimson", ls="--"), "issue's target (shaded: above)"),
        ],
    ]
    if len(run_labels) > 1:
        groups.append(
            [header("run (line style; number: a run's lone points)")]
            + [(Line2D([], [], color="0.3", ls=styles[k]), f"{tags[k]}: {k}") for k in run_labels]
        )
    depth = max(len(g) for g in groups)  # one group per legend column
    entries = [e for g in groups for e in g + [header("")] * (depth - len(g))]
    handles, labels = zip(*entries)
    legend = fig.legend(
        handles, labels, loc="outside lower center", ncol=len(groups), fontsize=8, frameon=False
    )
    for text in legend.get_texts():
        if text.get_text() in {g[0][1] for g in groups}:
            text.set_fontweight("bold")
    where = f"{short['']}*.csv" if "" in short else f"{series[0].source}.csv"
    fig.suptitle(
        "Whole models: each mixer's median latency over the fixed shuffle's, in the same run\n"
        + ", ".join(common.values())
        + f"; {where}",
        fontsize=10,
    )

    atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi))
    return series


def _git_commit() -> str:
    """Short hash of the source commit, with ``+modified`` when the tree differs from it."""
    from .train.report import git_commit

    full = git_commit() or ""
    return full[:7] + ("+modified" if full.endswith("-dirty") else "")


# --- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dyshuffle bench",
        description=(
            "Measure the fixed shuffle, the dynamic shuffle (hard inference, training step), "
            "the static-dynamic shuffle and a 1x1 convolution, as single layers and inside "
            "ShuffleNetV2, side by side; write a CSV per precision/layout and a markdown table."
        ),
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=list(PRECISIONS))
    p.add_argument("--layout", nargs="+", default=["channels_last"], choices=list(LAYOUTS))
    p.add_argument("--part", nargs="+", default=["layer", "model"], choices=["layer", "model"])
    p.add_argument(
        "--batch",
        nargs="+",
        type=int,
        default=None,
        help="batch sizes (default: 1 32 256 on CPU, 1 32 256 1024 on CUDA)",
    )
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument(
        "--stems", nargs="+", default=["cifar", "imagenet"], choices=list(STEM_RESOLUTION)
    )
    p.add_argument(
        "--layer-shapes",
        nargs="+",
        default=list(DEFAULT_LAYER_SHAPES),
        metavar="CxS",
        help="single-layer inputs, channels x spatial size",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help=(
            f"NAME[@COMMIT][:KEY=VALUE,...] with NAME in {', '.join(LAYER_VARIANTS)} "
            "(model part: no conv1x1), e.g. dynamic:reduction=16"
        ),
    )
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument(
        "--skip",
        nargs="+",
        default=[],
        metavar="REGEX",
        help="skip model configurations MODEL/STEM/BATCH matching a regex",
    )
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 2; --quick: 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 10; --quick: 5)")
    p.add_argument(
        "--min-block-ms",
        type=float,
        default=20.0,
        help="least duration of one timed block (short calls repeat inside it)",
    )
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument(
        "--compile",
        default="none",
        choices=["none", "default", "reduce-overhead", "max-autotune-no-cudagraphs"],
        help="torch.compile every module (all variants alike)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="skip the remaining configurations once this much time has passed",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="batches 1 and 32, 5 repeats, 1 warm-up (unless given): a CPU run of a few minutes",
    )
    p.add_argument("--out-dir", default="results/bench", help="folder of the CSV files")
    p.add_argument(
        "--suffix", default=None, help="appended to the CSV name (default: '_quick' with --quick)"
    )
    p.add_argument(
        "--markdown",
        default=None,
        metavar="PATH",
        help="update this markdown file (e.g. docs/BENCHMARKS.md) with the tables",
    )
    p.add_argument(
        "--from-csv",
        nargs="+",
        default=None,
        metavar="CSV",
        help="measure nothing: render existing CSV files as markdown",
    )
    p.add_argument(
        "--plot",
        default=None,
        metavar="PATH",
        help=(
            "also draw the whole models' latency ratios to the fixed shuffle against the issue's "
            "targets, one panel per mode (.png, .svg or .pdf); with --from-csv, from those CSVs"
        ),
    )
    p.add_argument(
        "--command", default=None, help="command line to record in the markdown (default: this one)"
    )
    p.add_argument(
        "--ref",
        nargs="+",
        default=[],
        metavar="COMMIT",
        help="also time the layers of an earlier git commit (variants dynamic@COMMIT; needs git)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def _is_model_variant(variant: str, refs: dict[str, Any]) -> bool:
    base, mod, _ = split_variant(variant, refs)
    return base in MODEL_VARIANTS and (mod is None or base == "dynamic")


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Counts and names that would only fail (or measure nothing) later: a usage error now."""
    if args.plot is not None and Path(args.plot).suffix.lower() not in PLOT_FORMATS:
        parser.error(f"--plot {args.plot!r}: the name must end in {', '.join(PLOT_FORMATS)}")
    if args.from_csv:
        for path in args.from_csv:
            if not Path(path).is_file():
                parser.error(f"--from-csv {path!r} does not exist")
        return
    for flag, value, low in (
        ("--warmup", args.warmup, 0),
        ("--repeats", args.repeats, 1),
        ("--threads", args.threads, 1),
        *(("--batch", b, 1) for b in args.batch or ()),
    ):
        if value is not None and value < low:  # (None: the default)
            parser.error(f"{flag} must be at least {low}, got {value}")
    if args.plot is not None and "model" not in args.part:
        parser.error(f"--plot {args.plot!r} draws whole models: --part must include model")
    from dyshuffle.models import list_models

    known = set(list_models())
    for name in args.models:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            parser.error(f"unknown model {name!r} in --models{hint} (dyshuffle table lists them)")


def _schedule(args: argparse.Namespace, device: str) -> tuple[list[int], int, int]:
    """Batch sizes, warm-up and timed runs: what was given, else the defaults (``--quick``:
    batches up to 32, 1 warm-up, 5 runs)."""
    batches = args.batch or ([1, 32, 256] if device == "cpu" else [1, 32, 256, 1024])
    if args.quick and not args.batch:
        batches = [b for b in batches if b <= 32] or batches[:1]
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 10)
    return batches, warmup, repeats


def _plot(path: str | None, sources: list[tuple[str, list[dict[str, str]]]]) -> int:
    """``--plot``: draw the figure from the runs' rows; 0, or 1 when there is nothing to draw."""
    if path is None:
        return 0
    try:
        plot_latency_ratios(sources, path)
    except ValueError as e:
        print(f"dyshuffle bench: --plot {path}: {e}; no figure written", file=sys.stderr)
        return 1
    print(f"figure: {path}", file=sys.stderr)
    return 0


def _resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} asked for, but CUDA is not available")
    return name


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dyshuffle bench``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in CPU_ENV if k in os.environ)
    command = args.command or (
        (env + " " if env else "") + "dyshuffle bench " + " ".join(shlex.quote(a) for a in argv)
    )

    if args.from_csv:
        out = io.StringIO()
        sources = []
        for path in args.from_csv:
            rows = read_csv(path)
            if not rows:
                print(f"{path}: no rows, skipped", file=sys.stderr)
                continue
            name = Path(path).stem
            sources.append((name, rows))
            section = markdown_section(name, rows, args.command)
            print(section, file=out)
            if args.markdown:
                update_markdown(args.markdown, name, section)
        print(out.getvalue())
        return _plot(args.plot, sources)

    try:
        device = _resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    if device == "cpu":
        torch.set_num_threads(args.threads)
        torch.set_flush_denormal(True)
        if args.threads > 1 and "OMP_WAIT_POLICY" not in os.environ and not args.quiet:
            print(
                "dyshuffle bench: OMP_WAIT_POLICY is not set; on a CPU shared with other "
                "processes, spinning OpenMP workers can inflate small operations by orders of "
                "magnitude. Consider OMP_WAIT_POLICY=PASSIVE dyshuffle bench ...",
                file=sys.stderr,
            )
    else:
        torch.backends.cudnn.benchmark = True
    batches, warmup, repeats = _schedule(args, device)
    refs = {ref: load_ref_layers(ref) for ref in args.ref}
    variants = args.variants or [*DEFAULT_VARIANTS, *(f"dynamic@{ref}" for ref in refs)]
    for v in variants:
        try:
            split_variant(v, refs)  # a valid name, a loaded ref, KEY=VALUE options
        except ValueError as e:
            parser.error(str(e))
    if BASELINE not in variants:
        variants = [BASELINE, *variants]  # every ratio needs the fixed shuffle
    cfg = BenchConfig(
        device=device,
        precisions=args.precision,
        layouts=args.layout,
        parts=args.part,
        batches=batches,
        models=args.models,
        stems=args.stems,
        layer_shapes=args.layer_shapes,
        layer_variants=variants,
        model_variants=[v for v in variants if _is_model_variant(v, refs)],
        modes=args.modes,
        warmup=warmup,
        repeats=repeats,
        min_block_ms=args.min_block_ms,
        threads=args.threads if device == "cpu" else None,
        compile=args.compile,
        time_budget_s=args.time_budget,
        seed=args.seed,
        verbose=not args.quiet,
        skip=args.skip,
        refs=refs,
        command=command,
        commit=_git_commit(),
    )
    suffix = args.suffix if args.suffix is not None else ("_quick" if args.quick else "")
    sections = []
    sources: list[tuple[str, list[dict[str, str]]]] = []
    failed = False
    for precision in cfg.precisions:
        for layout in cfg.layouts:
            dev = torch.device(device)
            name = csv_name(
                dev.type, _device_name(dev), precision, layout, cfg.threads, suffix=suffix
            )
            path = Path(args.out_dir) / name
            _log(cfg, f"== {precision} {layout} -> {path}")
            try:
                rows = run_benchmark(
                    cfg, precision, layout, on_rows=lambda rs, path=path: write_csv(rs, path)
                )
            except Exception:  # keep what was measured, say what failed
                traceback.print_exc()
                failed = True
                rows = read_csv(path) if path.exists() else []
            write_csv(rows, path)
            # the section shows the numbers as the CSV keeps them (6 significant digits), so
            # that --from-csv regenerates it to the digit
            written = read_csv(path)
            sources.append((path.stem, written))
            section = markdown_section(path.stem, written, command)
            sections.append(section)
            if args.markdown:
                update_markdown(args.markdown, path.stem, section)
    print("\n\n".join(sections))
    plotted = _plot(args.plot, sources)
    return 1 if failed or plotted else 0


if __name__ == "__main__":
    raise SystemExit(main())
