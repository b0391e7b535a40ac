"""The run configuration: one flat dataclass, YAML recipes as defaults, command-line overrides.

Every field is a YAML key and a ``--option`` (underscores become dashes; booleans get
``--name``/``--no-name``). Unknown keys and options are errors that name the valid ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

__all__ = ["CHOICES", "ConfigError", "TrainConfig", "build_parser", "load_yaml", "resolve_config"]


class ConfigError(ValueError):
    """An unknown key or option, or a value of the wrong type or outside its choices."""


#: fields with a fixed set of values
CHOICES: dict[str, tuple[str, ...]] = {
    "data": ("digits", "cifar10", "cifar100", "tiny-imagenet", "imagenet", "imagefolder"),
    "loader": ("auto", "memory", "workers"),
    "stem": ("auto", "cifar", "imagenet"),
    "optimizer": ("sgd", "adamw"),
    "schedule": ("cosine", "onecycle", "linear", "constant"),
    "tau_schedule": ("exp", "linear", "cosine"),
    "amp": ("none", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"),
    "eval_weights": ("auto", "model", "ema"),
    "auto_augment": ("none", "randaugment", "trivialaugment"),
}


@dataclass
class TrainConfig:
    """Everything that defines a training run (the defaults train the embedded digits set).

    Data:
        data: data set name. data_dir: its folder (or an image-folder archive).
        download: fetch CIFAR with torchvision when missing. cache_dir: decoded arrays and
        extracted archives (default ``~/.cache/dyshuffle``). train_split/val_split/val_fraction:
        image-folder splits. image_size: decode or crop size (image folders, ImageNet).
        loader: ``memory`` (device-resident, on-device augmentation), ``workers``
        (multi-worker DataLoader) or ``auto``. workers: loader processes / decode threads.
        train_subset/val_subset: use only the first N samples of a fixed random order (0: all);
        subset_per_class: each class keeps its share of those N (the first of its samples in
        the same order), so a small subset has every class in its proportion.
        crop_padding/hflip: augmentation (``None``: the data set's default).
        auto_augment: ``randaugment`` (torchvision's RandAugment, 2 operations at magnitude
        bin ``ra_magnitude``, 0-30) or ``trivialaugment`` (TrivialAugmentWide), per image after
        the crop and flip; random_erasing: chance that an image gets one rectangle set to the
        mean colour (0 after normalization; torchvision's RandomErasing). See
        :mod:`dyshuffle.data.augment`.
    Model:
        model, stem (``auto``: ``cifar`` up to 64 pixels), mixer, pointwise, mixer_kwargs
        (extra :func:`~dyshuffle.models.create_model` keywords, e.g. ``{mode: soft}``),
        init_checkpoint (fine-tuning: a new run starts from the weights of a ``dyshuffle
        train`` checkpoint or run folder, those its run evaluated; same architecture, but
        for the number of classes: another one gets a new classifier; not with ``--resume``).
    Optimization:
        epochs, batch_size (global, over all processes; one optimizer step), grad_accum_steps
        (micro-batches a batch is split into, one backward pass each: less memory, BatchNorm
        statistics of the micro-batches), eval_batch_size (per process), optimizer, lr
        (peak), momentum, nesterov, betas, weight_decay (not on norm and bias parameters),
        dynamic_lr_scale and dynamic_weight_decay (the learning rate of the dynamic layers'
        parameters, their generators, as a multiple of ``lr``, and their weight decay;
        ``None``: ``weight_decay``),
        schedule, warmup_epochs, onecycle_pct (rise fraction of ``onecycle``), min_lr_ratio,
        label_smoothing, mixup/cutmix (``alpha`` of their ``Beta(alpha, alpha)``; 0: off) and
        mix_prob (chance that a batch is mixed; see :mod:`dyshuffle.data.mixing`), grad_clip
        (0: off), ortho_weight (lambda of the orthogonal loss), tau_start/tau_end/tau_schedule
        (temperature of the dynamic layers, per step; ``None`` keeps the layers' own).
    Runtime:
        amp, channels_last, compile, grad_checkpointing (recompute activations in the backward
        pass: less memory, the same training), ema, ema_decay, eval_weights, device, seed,
        deterministic, threads (intra-op CPU threads; 1 by default, as small models gain little
        from more and slow down badly on a shared machine; 0: PyTorch's default), output (run
        folder), save_every_steps (0: once per epoch), eval_every (epochs), log_every (steps),
        progress, tensorboard.
    """

    # data
    data: str = "digits"
    data_dir: str | None = None
    download: bool = False
    cache_dir: str | None = None
    train_split: str = "auto"
    val_split: str = "auto"
    val_fraction: float = 0.1
    image_size: int | None = None
    loader: str = "auto"
    workers: int = 4
    train_subset: int = 0
    val_subset: int = 0
    subset_per_class: bool = False
    crop_padding: int | None = None
    hflip: bool | None = None
    auto_augment: str = "none"
    ra_magnitude: int = 9
    random_erasing: float = 0.0
    # model
    model: str = "shufflenet_v2_x0_5"
    stem: str = "auto"
    mixer: str = "dynamic"
    pointwise: str = "conv"
    mixer_kwargs: dict = field(default_factory=dict)
    init_checkpoint: str | None = None
    # optimization
    epochs: int = 6
    batch_size: int = 64
    grad_accum_steps: int = 1
    eval_batch_size: int = 500
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 5e-4
    dynamic_lr_scale: float = 1.0
    dynamic_weight_decay: float | None = None
    schedule: str = "onecycle"
    warmup_epochs: float = 0.0
    onecycle_pct: float = 0.25
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    grad_clip: float = 0.0
    ortho_weight: float = 0.1
    tau_start: float | None = None
    tau_end: float | None = None
    tau_schedule: str = "exp"
    # runtime
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    grad_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = 0.999
    eval_weights: str = "auto"
    device: str = "auto"
    seed: int = 0
    deterministic: bool = False
    threads: int = 1
    output: str | None = None
    save_every_steps: int = 0
    eval_every: int = 1
    log_every: int = 20
    progress: bool = True
    tensorboard: bool = True
    #: test hook: sleep this many seconds after every training step (hidden option)
    debug_step_delay: float = 0.0

    def validate(self) -> TrainConfig:
        """Check choices and ranges; raise :class:`ConfigError` naming the bad value."""
        for name, valid in CHOICES.items():
            value = getattr(self, name)
            if value not in valid:
                raise ConfigError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        positive = (
            "epochs", "batch_size", "grad_accum_steps", "eval_batch_size", "eval_every",
            "log_every",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        nonneg = (
            "lr",
            "weight_decay",
            "dynamic_lr_scale",
            "warmup_epochs",
            "grad_clip",
            "mixup",
            "cutmix",
            "ortho_weight",
            "workers",
            "train_subset",
            "val_subset",
            "save_every_steps",
            "threads",
            "debug_step_delay",
        )
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be non-negative, got {getattr(self, name)!r}")
        if self.crop_padding is not None and self.crop_padding < 0:
            raise ConfigError(
                f"crop_padding must be non-negative (or null: the data set's), "
                f"got {self.crop_padding!r}"
            )
        if self.dynamic_weight_decay is not None and self.dynamic_weight_decay < 0:
            raise ConfigError(
                f"dynamic_weight_decay must be non-negative (or null: weight_decay), "
                f"got {self.dynamic_weight_decay!r}"
            )
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(
                f"image_size must be at least 1 (or null: the data set's), got {self.image_size!r}"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not 0.0 <= self.mix_prob <= 1.0:
            raise ConfigError(f"mix_prob must be in [0, 1], got {self.mix_prob!r}")
        if not 0.0 <= self.random_erasing <= 1.0:
            raise ConfigError(f"random_erasing must be in [0, 1], got {self.random_erasing!r}")
        if not 0 <= self.ra_magnitude <= 30:
            raise ConfigError(
                f"ra_magnitude must be in [0, 30] (torchvision's 31 magnitude bins), "
                f"got {self.ra_magnitude!r}"
            )
        if self.grad_accum_steps > self.batch_size:
            raise ConfigError(
                f"grad_accum_steps ({self.grad_accum_steps}) cannot exceed batch_size "
                f"({self.batch_size}): each micro-batch needs a sample"
            )
        if not 0.0 < self.onecycle_pct < 1.0:
            raise ConfigError(f"onecycle_pct must be in (0, 1), got {self.onecycle_pct!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1), got {self.ema_decay!r}")
        if len(self.betas) != 2:
            raise ConfigError(f"betas must be two numbers, got {self.betas!r}")
        for name in ("tau_start", "tau_end"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"{name} must be positive, got {v!r}")
        if (self.tau_start is None) != (self.tau_end is None):
            raise ConfigError("give both tau_start and tau_end (or neither)")
        if self.data != "digits" and not self.data_dir:
            raise ConfigError(f"data set {self.data!r} needs data_dir (--data-dir PATH)")
        if self.eval_weights == "ema" and not self.ema:
            raise ConfigError("eval_weights='ema' needs ema: true (--ema)")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (test hooks left out, so a resumed run drops them)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _HIDDEN}


_FIELDS = {f.name: f for f in fields(TrainConfig)}
_HIDDEN = {"debug_step_delay"}
#: paths, stored absolute (a run resumed or evaluated from elsewhere reads the same ones, and
#: its configuration names the checkpoint it started from)
PATH_FIELDS = ("data_dir", "cache_dir", "init_checkpoint")
_TYPES = typing.get_type_hints(TrainConfig)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """``(inner type, optional)`` of a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _check_value(name: str, value: Any, where: str) -> Any:
    tp, optional = _base_type(_TYPES[name])
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {name} cannot be null")
    origin = typing.get_origin(tp) or tp
    if origin in (int, float) and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads 1e-3 as a string; take it as the command line does (--lr 1e-3)
        value = _number(value, origin)
    elif origin is list and isinstance(value, (list, tuple)):
        value = [_number(x, float) if isinstance(x, str) else x for x in value]
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        dict: lambda v: isinstance(v, dict),
        list: lambda v: (
            isinstance(v, (list, tuple))
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        ),
    }[origin](value)
    if not ok:
        raise ConfigError(
            f"{where}: {name} must be {getattr(origin, '__name__', origin)}, got {value!r}"
        )
    if origin is float:
        value = float(value)
        numbers = [value]
    elif origin is list:
        value = numbers = [float(x) for x in value]
    else:
        numbers = []
    if not all(map(math.isfinite, numbers)):
        raise ConfigError(f"{where}: {name} must be finite, got {value!r}")
    return value


def _number(text: str, tp: type) -> Any:
    """``text`` as an ``int``/``float`` when it spells one (``"1e-3"``), else unchanged."""
    try:
        return tp(text.strip())
    except ValueError:
        return text


def _unknown(name: str, valid: list[str], what: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    prefix = f"{where}: " if where else ""
    return ConfigError(f"{prefix}unknown {what} {name!r}{hint}; valid: {', '.join(valid)}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe into checked ``{field: value}`` (unknown keys are errors)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of options, got {type(raw).__name__}")
    valid = [n for n in _FIELDS if n not in _HIDDEN]
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            raise _unknown(str(key), valid, "key", str(path))
        out[name] = _check_value(name, value, str(path))
    return out


def _mapping(text: str) -> dict:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not a YAML/JSON mapping: {text!r} ({e})") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping like '{{mode: soft}}', got {text!r}")
    return value


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per :class:`TrainConfig` field; unset options stay absent."""
    group = parser.add_argument_group("run options (also YAML keys; see docs/TRAINING.md)")
    for name, f in _FIELDS.items():
        tp, _ = _base_type(_TYPES[name])
        origin = typing.get_origin(tp) or tp
        flag = "--" + name.replace("_", "-")
        help_ = argparse.SUPPRESS if name in _HIDDEN else _help(name, f)
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_}
        if origin is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif origin is dict:
            group.add_argument(flag, type=_mapping, metavar="MAPPING", **kw)
        elif origin is list:
            group.add_argument(flag, type=float, nargs="+", metavar="X", **kw)
        else:
            choices = CHOICES.get(name)
            group.add_argument(
                flag, type=origin, choices=choices, metavar=_metavar(name, origin), **kw
            )


def _metavar(name: str, tp: Any) -> str:
    if name in CHOICES:
        return "{" + ",".join(CHOICES[name]) + "}"
    if name in PATH_FIELDS:
        return "PATH"
    return {int: "N", float: "X", str: "STR"}.get(tp, "V")


HELP: dict[str, str] = {
    "data": "data set",
    "data_dir": "its folder (imagefolder: a folder or a .tar/.tgz of one)",
    "download": "fetch CIFAR-10/100 with torchvision when missing",
    "cache_dir": "decoded arrays and extracted archives (null: ~/.cache/dyshuffle)",
    "train_split": "image folders: training sub-folder ('auto': train/)",
    "val_split": "image folders: validation sub-folder ('auto': val/ or test/; 'none': hold out)",
    "val_fraction": "image folders without a validation folder: fraction held out per class",
    "image_size": "decode / crop size (image folders, ImageNet)",
    "loader": "memory: device-resident data, on-device augmentation; workers: DataLoader",
    "workers": "DataLoader processes / decoding threads",
    "train_subset": "use N training images of a fixed random order (0: all)",
    "val_subset": "use N validation images of a fixed random order (0: all)",
    "subset_per_class": "train/val subsets keep each class's share of the images (stratified)",
    "crop_padding": "random-crop zero padding in pixels (default: the data set's)",
    "hflip": "random horizontal flips (default: the data set's; off for digits)",
    "auto_augment": "per-image RandAugment (2 ops) or TrivialAugmentWide after crop and flip "
    "(torchvision's)",
    "ra_magnitude": "RandAugment magnitude bin, 0-30",
    "random_erasing": "chance that an image gets one rectangle erased to the mean colour "
    "(torchvision's RandomErasing after normalization; 0: off)",
    "model": "model name (dyshuffle.models.list_models())",
    "stem": "auto: cifar up to 64 pixels, else imagenet",
    "mixer": "channel mixer: shuffle, none, learned, dynamic, static_dynamic",
    "pointwise": "conv or sds (static-dynamic shuffle in place of 1x1 convolutions)",
    "mixer_kwargs": "extra create_model keywords, e.g. '{mode: soft, shared: false}'",
    "init_checkpoint": "fine-tune: start a new run from the weights of a checkpoint or run "
    "folder of dyshuffle train (the weights it evaluated; same model, another number of "
    "classes gets a new classifier)",
    "epochs": "training epochs",
    "batch_size": "global batch size (all processes together)",
    "grad_accum_steps": "split each process's batch into N micro-batches, one backward pass each, "
    "one optimizer step (less memory; BatchNorm sees the micro-batches)",
    "eval_batch_size": "evaluation batch size per process",
    "optimizer": "sgd (Nesterov) or adamw",
    "lr": "peak learning rate",
    "momentum": "SGD momentum",
    "nesterov": "Nesterov momentum",
    "betas": "AdamW betas",
    "weight_decay": "weight decay (not on norm and bias parameters)",
    "dynamic_lr_scale": "learning rate of the dynamic layers' parameters (their generators) "
    "as a multiple of --lr",
    "dynamic_weight_decay": "weight decay of the dynamic layers' parameters (null: "
    "--weight-decay; not on biases)",
    "schedule": "learning-rate schedule, stepped every batch",
    "warmup_epochs": "linear warm-up (cosine, linear, constant)",
    "onecycle_pct": "onecycle: fraction of the steps spent rising",
    "min_lr_ratio": "final learning rate as a fraction of --lr",
    "label_smoothing": "label smoothing of the cross-entropy",
    "mixup": "mixup alpha of Beta(alpha, alpha) (0: off)",
    "cutmix": "CutMix alpha of Beta(alpha, alpha) (0: off; with mixup: either, equal chance)",
    "mix_prob": "chance that a training batch is mixed (mixup/CutMix)",
    "grad_clip": "clip the gradient norm (0: off)",
    "ortho_weight": "weight of dyshuffle.orthogonal_loss in the loss",
    "tau_start": "temperature of the dynamic layers at the first step",
    "tau_end": "temperature at the last step",
    "tau_schedule": "temperature interpolation",
    "amp": "autocast precision",
    "channels_last": "channels-last memory format",
    "compile": "torch.compile the model",
    "grad_checkpointing": "recompute each unit's activations in the backward pass (less memory, "
    "more time; the same training: model.set_grad_checkpointing)",
    "ema": "keep an exponential moving average of the weights",
    "ema_decay": "EMA decay",
    "eval_weights": "weights to evaluate (auto: EMA when kept)",
    "device": "auto: CUDA when available",
    "seed": "seed of initialization, data order and augmentation",
    "deterministic": "torch.use_deterministic_algorithms",
    "threads": "CPU threads (0: PyTorch's default)",
    "output": "run folder (null: runs/<data>-<model>-<mixer>-<time>)",
    "save_every_steps": "also save last.pt every N steps (0: once per epoch)",
    "eval_every": "evaluate every N epochs",
    "log_every": "log (and check the loss) every N steps",
    "progress": "progress bar (on a terminal)",
    "tensorboard": "TensorBoard logs in <output>/tb",
}


def _help(name: str, f: dataclasses.Field) -> str:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    text = HELP.get(name, "")
    return f"{text} (default: {json.dumps(default)})".replace("%", "%%").strip()


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The ``dyshuffle train`` parser (abbreviations off, so a typo is never taken for another)."""
    return argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)


def resolve_config(
    cli: dict[str, Any], yaml_path: str | None = None, base: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults < ``base`` (a saved config) < YAML recipe < command line; validated.

    ``data_dir``, ``cache_dir`` and ``init_checkpoint`` are made absolute (against the current
    directory), so that a saved configuration names the same paths from any working directory.
    """
    values: dict[str, Any] = {}
    if base:
        for k, v in base.items():
            if k in _FIELDS:
                values[k] = v
    if yaml_path:
        values.update(load_yaml(yaml_path))
    for k, v in cli.items():
        if k not in _FIELDS:  # (dyshuffle sweep --set KEY=VALUE, or a caller's dict)
            raise _unknown(k, [n for n in _FIELDS if n not in _HIDDEN], "option", "command line")
        values[k] = _check_value(k, v, "command line")
    for k in PATH_FIELDS:
        if values.get(k):
            values[k] = os.path.abspath(os.path.expanduser(values[k]))
    return TrainConfig(**values).validate()


def unknown_options(extra: list[str], parser: argparse.ArgumentParser) -> ConfigError:
    """An error for options argparse did not recognize, with close matches and the valid ones."""
    valid = sorted(
        s for a in parser._actions for s in a.option_strings if a.help is not argparse.SUPPRESS
    )
    bad = [e.split("=", 1)[0] for e in extra if e.startswith("-")] or extra
    return _unknown(bad[0], valid, "option", "")  # the caller names the command
