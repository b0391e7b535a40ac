"""The training loop behind ``dyshuffle train``.

:func:`train` builds the data, the model, the optimizer and the schedules from a
:class:`~dyshuffle.train.config.TrainConfig`, trains (one process, or one per device under
``torchrun``), evaluates every epoch and writes the run folder::

    config.yaml   the resolved configuration
    last.pt       checkpoint after every epoch (and every ``save_every_steps`` steps), atomic
    best.pt       checkpoint of the best validation top-1
    metrics.csv   one row per epoch
    tb/           TensorBoard event files
    curves.png    loss, accuracy and learning rate per epoch
    results.json  final top-1/top-5 (soft and hard permutations for dynamic models), parameters,
                  MACs, time, device, versions, commit and command line

Resuming (``resume=`` a checkpoint) restores the model, the optimizer, the scheduler, the EMA,
the gradient scaler, the RNG states and the position in the epoch; the data order is a function of
``(seed, epoch)``, so a resumed run continues exactly as if it had never stopped. Fine-tuning
(``init_checkpoint``) starts a new run from the weights of a trained checkpoint
(:func:`load_init_checkpoint`).
"""

from __future__ import annotations

import contextlib
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from dyshuffle.data import BatchMix, mix_batch, mix_seed

from .._progress import progress_bar
from .checkpoint import (
    CheckpointError,
    layer_defaults,
    load_checkpoint,
    load_model,
    resolve_weights,
    save_checkpoint,
    set_tau,
)
from .config import ConfigError, TrainConfig
from .distributed import (
    DistInfo,
    all_reduce_sum,
    average_buffers,
    barrier,
    broadcast_object,
    cleanup,
    setup,
)
from .optim import create_optimizer, lr_factor, tau_at
from .report import environment, git_commit, plot_curves, write_json, write_metrics, write_text

__all__ = [
    "NonFiniteLossError",
    "SetupError",
    "TrainResult",
    "TrainingInterrupted",
    "evaluate",
    "has_dynamic_layers",
    "train",
]


class SetupError(ValueError):
    """Bad input found before training starts (config, data, model); nothing was written."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM: a checkpoint was saved and the run stopped."""

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    """What :func:`train` returns: the evaluated model (unwrapped, eval mode), the results dict
    (also in ``results.json``) and the run folder."""

    model: nn.Module
    results: dict[str, Any]
    run_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)


def has_dynamic_layers(model: nn.Module) -> bool:
    """True when ``model`` holds a :class:`~dyshuffle.layers.DynamicShuffle` (or subclass)."""
    from dyshuffle.layers import DynamicShuffle

    return any(isinstance(m, DynamicShuffle) for m in model.modules())


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    *,
    amp: str = "none",
    dist_info: DistInfo | None = None,
    num_classes: int | None = None,
    progress: bool = False,
    desc: str = "evaluate",
) -> dict[str, Any]:
    """Top-1, top-5 and mean cross-entropy of ``model`` over ``loader`` (all ranks together).

    Every rank evaluates its own share; correct counts, loss sums and sample counts are summed
    with ``all_reduce``, so the result is the metric of the whole split. ``progress``: a bar of
    the batches (``desc``) on a terminal, drawn by the first rank.

    Returns:
        ``top1``, ``top5`` (percent), ``loss``, ``count`` (all ranks), ``correct1``,
        ``correct5`` and ``local`` (this rank's ``count``/``correct1``/``correct5``).
    """
    info = dist_info or DistInfo(device=device)
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # correct1, correct5, count
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    bar = progress_bar(
        _batches(loader), desc, enabled=progress and info.is_main, unit="batch"
    )  # fmt: skip
    for x, y in loader.epoch(0):
        bar.update(1)
        with _autocast(device, amp):
            out = model(x)
        out = out.float()
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices  # (N, k)
        hit = top == y[:, None]
        counts += torch.stack(
            [hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(y), device=device)]
        )
        loss_sum += F.cross_entropy(out, y, reduction="sum").double()
    bar.close()
    local = counts.tolist()
    all_reduce_sum(counts, info)
    all_reduce_sum(loss_sum, info)
    c1, c5, n = counts.tolist()
    model.train(was_training)
    return {
        "top1": 100.0 * c1 / max(n, 1),
        "top5": 100.0 * c5 / max(n, 1),
        "loss": loss_sum.item() / max(n, 1),
        "count": n,
        "correct1": c1,
        "correct5": c5,
        "local": {"count": local[2], "correct1": local[0], "correct5": local[1]},
    }


# -- setup helpers ----------------------------------------------------------------------------


def _batches(loader: Any) -> int | None:
    """Batches of one pass over ``loader`` (``None`` when it cannot say)."""
    try:
        return len(loader)
    except TypeError:
        return None


def _labels_of(data: Tensor | list[tuple[str, int]]) -> Callable[[], Tensor]:
    """The labels of an array data set's ``(N,)`` tensor or of a file list's ``(path, label)``
    pairs, read when called."""
    if isinstance(data, Tensor):
        return lambda: data
    return lambda: torch.tensor([label for _, label in data], dtype=torch.long)


def build_loaders(cfg: TrainConfig, info: DistInfo, verbose: bool = True) -> tuple[Any, Any, Any]:
    """Load the data set of ``cfg`` and its train/validation iterators on ``info.device``.

    Rank 0 reads (and downloads, decodes and caches) first; the other ranks then read the cache.

    Returns:
        ``(data, train_loader, val_loader)``.
    """
    from dyshuffle.data import ArrayData, FileLoader, InMemoryLoader, load_data, subset_indices

    def per_class(labels):  # --subset-per-class: a subset keeps each class's share
        return _labels_of(labels) if cfg.subset_per_class else None

    def load():
        return load_data(
            cfg.data,
            cfg.data_dir,
            loader=cfg.loader,
            download=cfg.download,
            cache_dir=cfg.cache_dir,
            train_split=cfg.train_split,
            val_split=cfg.val_split,
            val_fraction=cfg.val_fraction,
            image_size=cfg.image_size,
            workers=max(cfg.workers, 1),
            verbose=verbose and info.is_main,
            progress=cfg.progress and verbose and info.is_main,
        )

    data = load() if info.is_main else None
    barrier(info)
    if data is None:
        data = load()
    hflip = data.hflip if cfg.hflip is None else cfg.hflip
    augment = dict(  # training loaders only
        auto_augment=cfg.auto_augment, ra_magnitude=cfg.ra_magnitude,
        random_erasing=cfg.random_erasing,
    )  # fmt: skip
    common = dict(
        mean=data.mean, std=data.std, seed=cfg.seed, world_size=info.world_size, rank=info.rank,
        channels_last=cfg.channels_last,
    )  # fmt: skip
    if isinstance(data, ArrayData):
        tr, va = (
            subset_indices(len(data.train_labels), cfg.train_subset, per_class(data.train_labels)),
            subset_indices(len(data.val_labels), cfg.val_subset, per_class(data.val_labels)),
        )
        if tr is not None:
            data.train_images, data.train_labels = data.train_images[tr], data.train_labels[tr]
        if va is not None:
            data.val_images, data.val_labels = data.val_images[va], data.val_labels[va]
        dev = info.device
        pad = data.crop_padding if cfg.crop_padding is None else cfg.crop_padding
        train_loader = InMemoryLoader(
            data.train_images.to(dev), data.train_labels.to(dev), batch_size=cfg.batch_size,
            train=True, crop_padding=pad, hflip=hflip, **augment, **common,
        )  # fmt: skip
        val_loader = InMemoryLoader(
            data.val_images.to(dev), data.val_labels.to(dev), batch_size=cfg.eval_batch_size,
            train=False, **common,
        )  # fmt: skip
        return data, train_loader, val_loader
    tr, va = (
        subset_indices(len(data.train_samples), cfg.train_subset, per_class(data.train_samples)),
        subset_indices(len(data.val_samples), cfg.val_subset, per_class(data.val_samples)),
    )
    if tr is not None:
        data.train_samples = [data.train_samples[i] for i in tr.tolist()]
    if va is not None:
        data.val_samples = [data.val_samples[i] for i in va.tolist()]
    files = dict(image_size=data.image_size, device=info.device, workers=cfg.workers, **common)
    train_loader = FileLoader(
        data.train_samples, batch_size=cfg.batch_size, train=True, hflip=hflip, **augment, **files
    )
    val_loader = FileLoader(data.val_samples, batch_size=cfg.eval_batch_size, train=False, **files)
    return data, train_loader, val_loader


def build_model(cfg: TrainConfig, num_classes: int, input_size: tuple[int, int, int]) -> nn.Module:
    """``create_model`` from the config; ``stem="auto"`` is ``cifar`` for images up to 64 pixels."""
    from dyshuffle.models import create_model

    stem = cfg.stem if cfg.stem != "auto" else ("cifar" if input_size[-1] <= 64 else "imagenet")
    try:
        return create_model(
            cfg.model,
            num_classes=num_classes,
            stem=stem,
            mixer=cfg.mixer,
            pointwise=cfg.pointwise,
            in_chans=input_size[0],
            **cfg.mixer_kwargs,
        )
    except TypeError as e:  # a keyword that the model or its layers do not take
        if not cfg.mixer_kwargs:
            raise
        raise ConfigError(
            f"mixer_kwargs {cfg.mixer_kwargs} do not fit {cfg.model} with mixer={cfg.mixer!r} "
            f"and pointwise={cfg.pointwise!r}: {e}"
        ) from e


def load_init_checkpoint(model: nn.Module, path: str, class_names: list[str]) -> str:
    """Load the weights of a trained checkpoint into a new run's ``model`` (``init_checkpoint``).

    The checkpoint, a file or a run folder, is read as the deploy commands read it
    (:func:`~dyshuffle.train.checkpoint.load_model`): the weights its run evaluated, the EMA ones
    when it evaluated those. Its model must be ``model`` but for the number of classes; when
    that differs, ``model``'s classifier (``pretrained_cfg["classifier"]``) keeps its fresh
    initialization and everything else is loaded. Parameters and buffers only: the temperature
    of the dynamic layers is the new run's.

    Args:
        model: the configured model, freshly built.
        path: the checkpoint file or run folder.
        class_names: the classes of the new run.

    Returns:
        One line that says what was loaded.

    Raises:
        ConfigError: the checkpoint is missing or not loadable, or its model differs from
            ``model`` in more than the number of classes (naming each argument and both values).
    """
    try:  # (building the checkpoint's model draws initial weights: not from this run's RNG)
        with torch.random.fork_rng(devices=[]):
            source, state = load_model(path)
    except CheckpointError as e:  # the message names the path
        raise ConfigError(f"--init-checkpoint: {e}") from e
    theirs = {k: v for k, v in state["model_args"].items() if k != "num_classes"}
    ours = {k: v for k, v in model.model_args.items() if k != "num_classes"}
    unset = object()
    differ = [k for k in {**theirs, **ours} if theirs.get(k, unset) != ours.get(k, unset)]
    if differ:

        def show(args: dict[str, Any]) -> str:
            return ", ".join(f"{k}={args[k]!r}" if k in args else f"{k} unset" for k in differ)

        raise ConfigError(
            f"--init-checkpoint {path} was trained with {show(theirs)}, the configured model has "
            f"{show(ours)} (only the number of classes may differ)"
        )
    weights = source.state_dict()
    which = {"ema": "EMA", "model": "model"}[resolve_weights(state)]
    line = f"fine-tuning from {path}: its {which} weights after epoch {state['epoch']}"
    theirs_n, ours_n = state["model_args"]["num_classes"], model.model_args["num_classes"]
    if theirs_n != ours_n:
        head = model.pretrained_cfg["classifier"]
        heads = (head,) if isinstance(head, str) else tuple(head)

        def in_head(key: str) -> bool:
            return any(key.startswith(f"{h}.") for h in heads)

        weights = {k: v for k, v in weights.items() if not in_head(k)}
        weights.update({k: v for k, v in model.state_dict().items() if in_head(k)})
        line += (
            f", all but its {theirs_n}-class classifier ({', '.join(heads)}): this run's "
            f"{ours_n}-class one starts freshly initialized"
        )
    elif list(state.get("class_names", class_names)) != list(class_names):
        line += ", its classifier too, although its classes have other names"
    model.load_state_dict(weights)
    return line


def _micro_batches(n: int, parts: int) -> list[slice]:
    """``parts`` consecutive slices of ``range(n)`` as even as can be (none empty)."""
    size, extra = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + size + (i < extra))
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _ema_avg_fn(decay: float):
    """EMA update for ``AveragedModel``: decay warmed up as ``min(decay, (1 + n) / (10 + n))``."""

    @torch.no_grad()
    def fn(ema_params: list[Tensor], params: list[Tensor], n_averaged: Tensor) -> None:
        if not torch.is_floating_point(ema_params[0]):  # BatchNorm's num_batches_tracked: copy
            for e, p in zip(ema_params, params):
                e.copy_(p)
            return
        if n_averaged.device.type == "cpu":  # AveragedModel keeps the count on the CPU: no sync
            n = float(n_averaged)
            torch._foreach_lerp_(ema_params, params, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))
            return
        n = n_averaged.to(device=ema_params[0].device, dtype=ema_params[0].dtype)
        d = torch.clamp((1.0 + n) / (10.0 + n), max=decay)
        torch._foreach_mul_(ema_params, d)
        torch._foreach_add_(ema_params, torch._foreach_mul(params, 1.0 - d))

    return fn


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, IndexError):
            torch.cuda.set_rng_state_all(state["cuda"])


_NO_MIX = BatchMix("none", 1.0, None)


class _StopFlag:
    """SIGINT/SIGTERM handler: the first signal asks the loop to save and stop; a second SIGINT
    interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(
            f"\n{self.signal_name}: saving a checkpoint after this step "
            "(press Ctrl-C again to quit now)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


#: temporary files of the run folder's atomic writes, left behind by a process killed mid-write
_TEMP_FILES = (
    ".last.pt.*.tmp",
    ".best.pt.*.tmp",
    ".config.yaml.*.tmp",
    ".metrics.csv.*.tmp",
    ".results.json.*.tmp",
    ".curves.png.*.tmp",
    ".curves.png.tmp.png",  # (the name before dyshuffle._atomic)
)


def _remove_stale_temp_files(run_dir: Path) -> None:
    """Delete the temporary files of earlier, killed writers (only rank 0 writes the folder)."""
    for pattern in _TEMP_FILES:
        for path in run_dir.glob(pattern):
            with contextlib.suppress(OSError):
                path.unlink()


def _default_output(cfg: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.data}-{cfg.model}-{cfg.mixer}-{stamp}"


# -- the loop -------------------------------------------------------------------------------------


class _Run:
    """State of one training run (kept in one place so that checkpoints capture all of it)."""

    def __init__(
        self,
        cfg: TrainConfig,
        info: DistInfo,
        resume: dict[str, Any] | None,
        command: str | None,
    ) -> None:
        self.cfg, self.info, self.command = cfg, info, command
        self.main = info.is_main
        self.device = info.device
        self.t_start = time.time()
        # the code that trains is the code at the start: a checkout that moves on during the run
        # (a pull beside a long run) must not name its commit in the results
        self.commit = git_commit()
        self._last_plot = time.time()
        try:
            self._setup(resume)
        except (ValueError, FileNotFoundError, NotADirectoryError, KeyError) as e:
            raise SetupError(str(e)) from e

    # ---- setup
    def _setup(self, resume: dict[str, Any] | None) -> None:
        cfg, info = self.cfg, self.info
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not cfg.deterministic
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        out = Path(cfg.output) if cfg.output else None
        if out is None:
            out = Path(broadcast_object(str(_default_output(cfg)), info))
        self.run_dir = out
        if resume is None and (out / "last.pt").exists():
            raise ConfigError(
                f"{out} already holds a run (last.pt); continue it with --resume {out} "
                f"or choose another --output"
            )

        random.seed(cfg.seed)
        np.random.seed(cfg.seed % (1 << 32))
        torch.manual_seed(cfg.seed)

        self.data, self.train_loader, self.val_loader = build_loaders(cfg, info)
        data = self.data
        self.class_names = list(data.class_names)
        self.input_size = tuple(data.input_size)
        self.model = build_model(cfg, len(self.class_names), self.input_size).to(self.device)
        #: what --init-checkpoint loaded (a resumed run continues from its own last.pt instead)
        self.init_note: str | None = None
        if cfg.init_checkpoint and resume is None:  # before the EMA, which copies the weights
            self.init_note = load_init_checkpoint(self.model, cfg.init_checkpoint, self.class_names)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.dynamic = has_dynamic_layers(self.model)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch

        self.optimizer = create_optimizer(
            self.model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.nesterov,
            tuple(cfg.betas), cfg.dynamic_lr_scale, cfg.dynamic_weight_decay,
        )  # fmt: skip
        warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        total = self.total_steps

        def factor(step: int) -> float:
            return lr_factor(step, total, cfg.schedule, warmup, cfg.onecycle_pct, cfg.min_lr_ratio)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.ema = None
        if cfg.ema:
            from torch.optim.swa_utils import AveragedModel

            self.ema = AveragedModel(
                self.model, multi_avg_fn=_ema_avg_fn(cfg.ema_decay), use_buffers=True
            )
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_top1, self.best_epoch = -1.0, -1
        self.history: list[dict[str, Any]] = []
        self.partial = {"sums": [0.0, 0.0, 0.0, 0.0], "train_seconds": 0.0}
        self.train_seconds = 0.0
        self._last_eval: dict[str, Any] | None = None
        if resume is not None:
            self._load(resume)

        net: nn.Module = self.model
        #: the DistributedDataParallel wrapper (its ``no_sync`` between micro-batches)
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        if info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = self.ddp = nn.parallel.DistributedDataParallel(net, device_ids=ids)
        if cfg.compile:
            net = torch.compile(net)
        self.net = net
        self._set_tau(self.global_step)

        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _remove_stale_temp_files(self.run_dir)
            write_text(self.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            if resume is not None:
                self._repair_outputs(resume)
        self.writer = None
        if self.main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                str(self.run_dir / "tb"), purge_step=self.global_step if resume else None
            )

    def _load(self, state: dict[str, Any]) -> None:
        if state["model_args"] != self.model.model_args:
            raise ConfigError(
                f"the checkpoint's model {state['model_args']} differs from the configured "
                f"{self.model.model_args}"
            )
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ConfigError("the checkpoint has no EMA weights but the config enables ema")
            self.ema.module.load_state_dict(state["ema"])
            self.ema.n_averaged.fill_(int(state.get("ema_n_averaged", 1)))
        saved_optimizer = (state.get("config") or {}).get("optimizer", self.cfg.optimizer)
        if saved_optimizer != self.cfg.optimizer:
            raise ConfigError(
                f"the checkpoint was trained with optimizer {saved_optimizer!r}; its state does "
                f"not fit {self.cfg.optimizer!r} (the optimizer cannot change on resume)"
            )
        # options given with --resume override the saved ones: keep the configured
        # hyperparameters (lr, weight decay, momentum, Nesterov, betas) and peak learning rates
        configured = [
            {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
        ]
        base_lrs = list(self.scheduler.base_lrs)
        saved_groups = len(state["optimizer"]["param_groups"])
        if saved_groups != len(configured):
            raise ConfigError(
                f"the checkpoint's optimizer has {saved_groups} parameter groups, this "
                f"configuration's {len(configured)}: the dynamic layers' parameters have groups "
                f"of their own with dynamic_lr_scale != 1 or a dynamic_weight_decay, and that "
                f"cannot change on resume"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for group, hyper in zip(self.optimizer.param_groups, configured):
            group.update(hyper)
        self.scheduler.base_lrs = base_lrs
        # the learning rate of the next step under the configured schedule (--lr, --schedule,
        # --epochs ...), computed as LambdaLR does (the same numbers when nothing changed)
        step = self.scheduler.last_epoch
        lrs = [b * f(step) for f, b in zip(self.scheduler.lr_lambdas, base_lrs)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state.get("step_in_epoch", 0))
        self.global_step = int(state["global_step"])
        self.best_top1 = float(state.get("best_top1", -1.0))
        self.best_epoch = int(state.get("best_epoch", -1))
        self.history = list(state.get("metrics", []))
        self.partial = dict(state.get("partial") or self.partial)
        if not self.main:  # the saved sums are those of all ranks (see _save_mid_epoch): once
            self.partial["sums"] = [0.0] * len(self.partial["sums"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if state.get("rng") is not None:
            _set_rng_state(state["rng"])
        if self.step_in_epoch >= self.steps_per_epoch:  # a checkpoint at the very end of an epoch
            raise ConfigError(
                f"checkpoint step {self.step_in_epoch} is past the {self.steps_per_epoch} steps of "
                f"an epoch: the data or batch size changed since it was written"
            )

    def _repair_outputs(self, state: dict[str, Any]) -> None:
        """Rewrite what the completed epochs of ``state`` imply (rank 0, on resume).

        ``last.pt`` is written after ``best.pt``, ``metrics.csv`` and the curves of its epoch, so
        a crash before it redoes the epoch and rewrites them; this repairs the run folder of a
        crash in between (or of checkpoints of earlier versions, which wrote ``last.pt`` first),
        and drops rows of an epoch that is being redone.
        """
        if not self.history:
            return
        write_metrics(self.run_dir / "metrics.csv", self.history)
        if self.epoch >= self.cfg.epochs:  # nothing left to train: the final curves
            self._plot_curves()
        if self.step_in_epoch == 0 and self.best_epoch == self.epoch:
            best = self.run_dir / "best.pt"
            try:
                written = load_checkpoint(best).get("global_step")
            except (FileNotFoundError, ValueError):
                written = None
            if written != self.global_step:  # best.pt of that epoch: the checkpoint itself
                save_checkpoint(best, state)

    # ---- helpers
    def _mix(self, x: Tensor, y: Tensor, step: int) -> tuple[Tensor, BatchMix]:
        """Mixup/CutMix of batch ``step`` of the epoch (a no-op unless configured). The draws
        come from a generator of ``(seed, epoch, step, rank)``: a resumed run mixes alike."""
        cfg = self.cfg
        if cfg.mixup == 0 and cfg.cutmix == 0:
            return x, _NO_MIX
        g = torch.Generator().manual_seed(mix_seed(cfg.seed, self.epoch, step, self.info.rank))
        return mix_batch(x, y, g, mixup=cfg.mixup, cutmix=cfg.cutmix, prob=cfg.mix_prob)

    def _set_tau(self, step: int) -> float | None:
        cfg = self.cfg
        if cfg.tau_start is None or not self.dynamic:
            return None
        tau = tau_at(step, self.total_steps, cfg.tau_start, cfg.tau_end, cfg.tau_schedule)
        set_tau(self.model, tau)
        if self.ema is not None:
            set_tau(self.ema.module, tau)
        return tau

    def current_tau(self) -> float | None:
        from dyshuffle.layers import DynamicShuffle

        for m in self.model.modules():
            if isinstance(m, DynamicShuffle):
                return float(m.tau)
        return None

    def eval_model(self) -> nn.Module:
        use_ema = self.ema is not None and self.cfg.eval_weights in ("auto", "ema")
        return self.ema.module if use_ema else self.model

    def state(self, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint dict of the run as it stands (``partial``: the epoch's metric sums so
        far, if not this rank's)."""
        cfg, data = self.cfg, self.data
        return {
            "model": self.model.state_dict(),
            "model_args": dict(self.model.model_args),
            "layer_defaults": layer_defaults(),
            "class_names": self.class_names,
            "input_size": list(self.input_size),
            # how evaluation cropped the images (predict and inspect crop new ones alike)
            "eval_crop_fraction": float(getattr(self.val_loader, "crop_fraction", 1.0)),
            "mean": list(data.mean),
            "std": list(data.std),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "config": cfg.to_dict(),
            "ema": None if self.ema is None else self.ema.module.state_dict(),
            "ema_n_averaged": None if self.ema is None else int(self.ema.n_averaged),
            "eval_weights": "ema" if self.eval_model() is not self.model else "model",
            "tau": self.current_tau(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": _rng_state(),
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "metrics": self.history,
            "partial": self.partial if partial is None else partial,
            "train_seconds": self.train_seconds,
            "dataset": {"name": cfg.data, "source": data.source},
        }

    def save(self, name: str = "last.pt", partial: dict[str, Any] | None = None) -> Path:
        path = self.run_dir / name
        if self.main:
            save_checkpoint(path, self.state(partial))
        return path

    def _save_mid_epoch(self, sums: Tensor) -> Path:
        """``last.pt`` within an epoch; every rank calls this. The checkpoint holds the metric
        sums of all ranks so far, which a resumed run (of any number of processes) starts from
        on rank 0 only: every sample is counted once."""
        total = all_reduce_sum(sums.clone(), self.info)
        return self.save(partial={**self.partial, "sums": total.tolist()})

    def _check(self, bad: Tensor, stop: _StopFlag) -> tuple[bool, bool]:
        """``(non-finite loss seen, stop requested)``, agreed by all ranks."""
        if not self.info.enabled:
            return bool(bad.item()), stop.requested
        flags = torch.stack(
            [bad.to(torch.int64), torch.tensor(int(stop.requested), device=bad.device)]
        )
        all_reduce_sum(flags, self.info)
        return bool(flags[0].item()), bool(flags[1].item())

    def _nan_error(self) -> NonFiniteLossError:
        last = self.run_dir / "last.pt"
        kept = f"the last good checkpoint is kept: {last}" if last.exists() else "no checkpoint yet"
        return NonFiniteLossError(
            f"training stopped: the loss became NaN or infinite in epoch {self.epoch + 1} "
            f"(by step {self.global_step}); {kept}. Try a lower --lr, --grad-clip, or --amp none."
        )

    # ---- training
    def train_epoch(self, stop: _StopFlag) -> dict[str, Any]:
        cfg, dev, net = self.cfg, self.device, self.net
        net.train()
        steps = self.steps_per_epoch
        start = self.step_in_epoch
        # loss*n, correct, n, orthogonal*n  (sums over this rank's samples)
        sums = torch.tensor(self.partial["sums"], dtype=torch.float64, device=dev)
        bad = torch.zeros((), dtype=torch.bool, device=dev)
        w = cfg.ortho_weight
        from dyshuffle.layers import orthogonal_loss

        bar = None
        if cfg.progress and self.main:
            bar = progress_bar(steps, f"epoch {self.epoch + 1}/{cfg.epochs}", initial=start)
        t0 = time.perf_counter()
        seconds_before = self.partial["train_seconds"]
        # one process: check every step on the CPU (free), else at log/save steps or on a signal;
        # several processes agree at log/save steps (an all_reduce)
        single = not self.info.enabled
        for step, (x, y) in enumerate(self.train_loader.epoch(self.epoch, start), start=start):
            self._set_tau(self.global_step)
            x, mix = self._mix(x, y, step)
            self.optimizer.zero_grad(set_to_none=True)
            n = y.shape[0]
            parts = _micro_batches(n, cfg.grad_accum_steps)
            tasks: list[tuple[Tensor, int]] = []  # (task loss, samples) of each micro-batch
            for i, part in enumerate(parts):
                # DistributedDataParallel reduces the gradients in the last backward pass only
                sync = i + 1 == len(parts) or self.ddp is None
                with contextlib.nullcontext() if sync else self.ddp.no_sync():
                    x_i, y_i = x[part], y[part]  # (views)
                    yb_i = None if mix.y_b is None else mix.y_b[part]
                    with _autocast(dev, cfg.amp):
                        out = net(x_i)
                        task = self.criterion(out, y_i)
                        if yb_i is not None:  # mixed labels: the cross-entropy is linear in them
                            task = mix.lam * task + (1.0 - mix.lam) * self.criterion(out, yb_i)
                        ortho = orthogonal_loss(self.model) if self.dynamic else None
                        loss = task + w * ortho if (w > 0 and ortho is not None) else task
                    if len(parts) > 1:  # the batch's mean: each micro-batch by its share
                        loss = loss * (y_i.shape[0] / n)
                    self.scaler.scale(loss).backward()
                with torch.no_grad():
                    m = y_i.shape[0]
                    bad |= ~torch.isfinite(loss.detach())
                    # in place, without host-device copies (no synchronization per step)
                    tasks.append((task.detach(), m))
                    sums[0].add_(task.detach().double(), alpha=m)
                    hit = out.argmax(1) == y_i
                    if yb_i is None:
                        sums[1].add_(hit.sum())
                    else:  # the share of each sample's mixed label that the prediction hits
                        hit_b = out.argmax(1) == yb_i
                        sums[1].add_(hit.sum().double() * mix.lam)
                        sums[1].add_(hit_b.sum().double() * (1.0 - mix.lam))
                    sums[2].add_(m)
                    if ortho is not None:
                        sums[3].add_(ortho.detach().double(), alpha=m)
            if cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.global_step += 1
            self.step_in_epoch = step + 1
            last_step = step + 1 == steps
            log_now = self.global_step % cfg.log_every == 0 or last_step
            save_now = cfg.save_every_steps > 0 and self.global_step % cfg.save_every_steps == 0
            if log_now or save_now or (single and (stop.requested or dev.type == "cpu")):
                is_bad, stop_now = self._check(bad, stop)
                if is_bad:
                    raise self._nan_error()
                # the batch's task loss: the mean over its micro-batches by their samples
                step_loss = sum(float(t) * m for t, m in tasks) / n if log_now else None
                if log_now and bar is not None:
                    bar.set_postfix(
                        loss=f"{step_loss:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.3g}"
                    )
                if log_now and self.writer is not None:
                    self.writer.add_scalar("train/loss_step", step_loss, self.global_step)
                    self.writer.add_scalar(
                        "train/lr", self.scheduler.get_last_lr()[0], self.global_step
                    )
                self.partial = {
                    "sums": sums.tolist(),
                    "train_seconds": seconds_before + time.perf_counter() - t0,
                }
                if stop_now and not last_step:  # on the last step, the epoch end saves
                    if bar is not None:
                        bar.close()
                    path = self._save_mid_epoch(sums)
                    barrier(self.info)
                    raise TrainingInterrupted(
                        f"interrupted by {stop.signal_name} in epoch {self.epoch + 1} "
                        f"after step {self.step_in_epoch}/{steps}; checkpoint saved to {path}; "
                        f"continue with: {self._resume_command()}",
                        path,
                    )
                if save_now and not last_step:
                    self._save_mid_epoch(sums)
            if bar is not None:
                bar.update(1)
            if cfg.debug_step_delay > 0:
                time.sleep(cfg.debug_step_delay)
        if bar is not None:
            bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = seconds_before + time.perf_counter() - t0
        all_reduce_sum(sums, self.info)
        loss_sum, correct, count, ortho_sum = sums.tolist()
        return {
            "train_loss": loss_sum / max(count, 1),
            "train_top1": 100.0 * correct / max(count, 1),
            "ortho_loss": ortho_sum / max(count, 1) if self.dynamic else None,
            "epoch_seconds": seconds,
            "images_per_s": count / max(seconds, 1e-9),
        }

    def run(self) -> TrainResult:
        cfg, info = self.cfg, self.info
        if self.main:
            self._print_header()
        with _StopFlag() as stop:
            while self.epoch < cfg.epochs:
                train_stats = self.train_epoch(stop)
                self.train_seconds += train_stats["epoch_seconds"]
                average_buffers(self.model, info)
                if self.ema is not None:
                    average_buffers(self.ema.module, info)
                ep = self.epoch + 1
                row: dict[str, Any] = {
                    "epoch": ep,
                    "step": self.global_step,
                    "lr": self.scheduler.get_last_lr()[0],
                    "tau": self.current_tau(),
                }
                row.update(train_stats)
                if ep % cfg.eval_every == 0 or ep == cfg.epochs:
                    m = evaluate(
                        self.eval_model(), self.val_loader, self.device, amp=cfg.amp,
                        dist_info=info, progress=cfg.progress, desc=f"validate epoch {ep}",
                    )  # fmt: skip
                    row.update(val_loss=m["loss"], val_top1=m["top1"], val_top5=m["top5"])
                    self._last_eval = {**m, "epoch": ep}
                self.epoch, self.step_in_epoch = ep, 0
                self.partial = {"sums": [0.0, 0.0, 0.0, 0.0], "train_seconds": 0.0}
                self.history.append(row)
                improved = row.get("val_top1") is not None and row["val_top1"] > self.best_top1
                if improved:
                    self.best_top1, self.best_epoch = row["val_top1"], ep
                if self.main:
                    # last.pt last: a crash before it resumes from the previous checkpoint and
                    # redoes the epoch, rewriting its metrics.csv row, curves and best.pt
                    self._log_epoch(row)
                    if improved:
                        self.save("best.pt")
                    self.save("last.pt")
                stop_now = self._check(torch.zeros((), dtype=torch.bool, device=self.device), stop)[
                    1
                ]
                if stop_now and ep < cfg.epochs:
                    barrier(info)
                    raise TrainingInterrupted(
                        f"interrupted by {stop.signal_name} at the end of epoch {ep}; checkpoint "
                        f"saved to {self.run_dir / 'last.pt'}; continue with: "
                        f"{self._resume_command()}",
                        self.run_dir / "last.pt",
                    )
        return self._finish()

    def _resume_command(self) -> str:
        """How to continue this run (under torchrun, with torchrun: any number of processes)."""
        if self.info.enabled:
            return (
                f"torchrun --nproc_per_node={self.info.world_size} -m dyshuffle.cli train "
                f"--resume {self.run_dir}"
            )
        return f"dyshuffle train --resume {self.run_dir}"

    def _print_header(self) -> None:
        from dyshuffle.macs import count_params

        cfg = self.cfg
        n_train = self.train_loader.num_samples * self.info.world_size
        n_val = len(getattr(self.data, "val_labels", getattr(self.data, "val_samples", [])))
        print(
            f"dyshuffle train: {cfg.data} ({n_train} training / {n_val} validation images, "
            f"{len(self.class_names)} classes, {'x'.join(map(str, self.input_size))}) | "
            f"{cfg.model} stem={self.model.model_args.get('stem')} mixer={cfg.mixer} "
            f"({count_params(self.model) / 1e6:.3f}M params) | {cfg.epochs} epochs x "
            f"{self.steps_per_epoch} steps of {self.train_loader.plan.global_batch} | "
            f"{self.device}{f' x {self.info.world_size}' if self.info.enabled else ''} | "
            f"-> {self.run_dir}",
            flush=True,
        )
        if self.epoch or self.step_in_epoch:
            print(f"resuming at epoch {self.epoch + 1}, step {self.step_in_epoch}", flush=True)
        if self.init_note:
            print(self.init_note, flush=True)

    def _log_epoch(self, row: dict[str, Any]) -> None:
        cfg = self.cfg
        val = (
            f" | val loss {row['val_loss']:.3f} top-1 {row['val_top1']:.2f}%"
            if "val_top1" in row
            else ""
        )
        ortho = f" ortho {row['ortho_loss']:.3f}" if row.get("ortho_loss") is not None else ""
        print(
            f"epoch {row['epoch']:>3}/{cfg.epochs} | train loss {row['train_loss']:.3f} "
            f"top-1 {row['train_top1']:.2f}%{ortho}{val} | lr {row['lr']:.3g} | "
            f"{row['epoch_seconds']:.1f}s {row['images_per_s']:.0f} img/s",
            flush=True,
        )
        write_metrics(self.run_dir / "metrics.csv", self.history)
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("epoch", "step") and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"epoch/{k}", v, row["epoch"])
            self.writer.flush()
        # the figure costs about a second: redraw it at most once a minute and after the last epoch
        if row["epoch"] == cfg.epochs or time.time() - self._last_plot > 60:
            self._plot_curves()
            self._last_plot = time.time()

    def _plot_curves(self) -> None:
        title = f"{self.cfg.model} {self.cfg.mixer} on {self.cfg.data}"
        plot_curves(self.run_dir / "curves.png", self.history, title)

    def _finish(self) -> TrainResult:
        from dyshuffle.layers import permutation_mode
        from dyshuffle.macs import count_macs, count_params

        cfg, info = self.cfg, self.info
        model = self.eval_model()
        final = self._last_eval
        if final is None or final["epoch"] != self.epoch:
            final = evaluate(
                model, self.val_loader, self.device, amp=cfg.amp, dist_info=info,
                progress=cfg.progress, desc="validate",
            )  # fmt: skip
        results: dict[str, Any] = {
            "top1": final["top1"],
            "top5": final["top5"],
            "val_loss": final["loss"],
            "val_count": final["count"],
            "val_correct1": final["correct1"],
            "local": final["local"],
        }
        if self.dynamic:
            results.update(top1_hard=final["top1"], top5_hard=final["top5"])
            # the soft matrices (the binarization gap), and the same weights with every layer's
            # identity factors forced (what the permutations the layers chose are worth)
            for mode, what in (("soft", "soft permutations"), ("identity", "identity factors")):
                with permutation_mode(model, mode):
                    m = evaluate(
                        model, self.val_loader, self.device, amp=cfg.amp, dist_info=info,
                        progress=cfg.progress, desc=f"validate ({what})",
                    )  # fmt: skip
                results.update({f"top1_{mode}": m["top1"], f"top5_{mode}": m["top5"]})
        model.eval()
        c, h, w = self.input_size
        results.update(
            best_top1=self.best_top1,
            best_epoch=self.best_epoch,
            params=count_params(model),
            macs=count_macs(model, (1, c, h, w)),
            train_seconds=self.train_seconds,
            wall_seconds=time.time() - self.t_start,
            epochs=cfg.epochs,
            images_per_s=(self.history[-1]["images_per_s"] if self.history else None),
            eval_weights="ema" if model is not self.model else "model",
            dataset=cfg.data,
            num_train=self.train_loader.num_samples * info.world_size,
            num_val=final["count"],
            num_classes=len(self.class_names),
            model_args=dict(self.model.model_args),
            world_size=info.world_size,
            amp=cfg.amp,
            channels_last=cfg.channels_last,
            grad_checkpointing=cfg.grad_checkpointing,
            **environment(self.device),
            commit=self.commit,
            command=self.command,
            run_dir=str(self.run_dir),
        )
        if self.main:
            write_json(self.run_dir / "results.json", results)
            soft = ""
            if self.dynamic:
                soft = (
                    f" (hard permutations; soft {results['top1_soft']:.2f}%, identity factors "
                    f"{results['top1_identity']:.2f}%)"
                )
            print(
                f"test top-1 {results['top1']:.2f}%{soft}, top-5 {results['top5']:.2f}% on "
                f"{results['num_val']} images | {results['params'] / 1e6:.3f}M params, "
                f"{results['macs'] / 1e6:.2f}M MACs | trained in {self.train_seconds:.1f}s "
                f"on {results['device']} | {self.run_dir}",
                flush=True,
            )
        if self.writer is not None:
            self.writer.close()
        return TrainResult(model=model, results=results, run_dir=self.run_dir, history=self.history)


def train(
    cfg: TrainConfig,
    *,
    resume: dict[str, Any] | None = None,
    command: str | None = None,
) -> TrainResult:
    """Train (and evaluate) per ``cfg``; under ``torchrun`` every rank calls this.

    Args:
        cfg: the validated configuration.
        resume: a checkpoint dict to continue from (see :mod:`~dyshuffle.train.checkpoint`);
            ``cfg.init_checkpoint``, which started the run, is then not loaded again.
        command: the command line, recorded in ``results.json``.

    Raises:
        SetupError: bad configuration, data or model (before anything is written).
        NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
        TrainingInterrupted: SIGINT/SIGTERM (a checkpoint was saved).
    """
    try:
        info = setup(cfg.device)
    except ValueError as e:
        raise SetupError(str(e)) from e
    try:
        return _Run(cfg, info, resume, command).run()
    finally:
        cleanup()
