"""Building blocks shared by the backbones: the model interface and small conv helpers."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .._constants import IMAGENET_MEAN, IMAGENET_STD
from ..layers import DynamicShuffle, StaticDynamicShuffle
from ._features import Indices, feature_take_indices

__all__ = ["ClassifierModel", "ConvBNAct", "make_divisible", "pointwise_conv"]


def make_divisible(value: float, divisor: int) -> int:
    """``value`` rounded to the nearest positive multiple of ``divisor`` (halves round up)."""
    return max(divisor, int(value / divisor + 0.5) * divisor)


class ConvBNAct(nn.Sequential):
    """``Conv2d`` (no bias), ``BatchNorm2d`` and an optional activation, as one ``Sequential``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size; padding keeps the size at stride 1.
        stride: convolution stride.
        groups: convolution groups.
        act: activation class (``None``: no activation).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: Callable[..., nn.Module] | None = nn.ReLU,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                (kernel_size - 1) // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
        ]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


def pointwise_conv(
    kind: str, in_channels: int, out_channels: int, sds_kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """A bias-free 1x1 convolution (``"conv"``) or a static-dynamic shuffle (``"sds"``).

    The static-dynamic shuffle is square when ``in_channels == out_channels`` and rectangular
    otherwise (:class:`~dyshuffle.layers.StaticDynamicShuffle`).
    """
    if kind == "conv":
        if sds_kwargs:
            raise ValueError(
                f"pointwise_kwargs {sorted(sds_kwargs)} need pointwise='sds', got pointwise='conv'"
            )
        return nn.Conv2d(in_channels, out_channels, 1, bias=False)
    if kind == "sds":
        return StaticDynamicShuffle(in_channels, out_channels, **(sds_kwargs or {}))
    raise ValueError(f"unknown pointwise {kind!r}; valid: 'conv', 'sds'")


_MISSING = object()


class _RecomputeGuard:
    """The recomputation context of a checkpointed ``module``: it leaves the module as it was.

    The backward pass of ``torch.utils.checkpoint`` runs the module's forward again. That is
    exact for the outputs (batch statistics in training, the same random numbers: the RNG state
    is restored), but the forward's side effects happen a second time: a ``BatchNorm`` in
    training updates its running statistics and ``num_batches_tracked`` again, and a dynamic
    shuffle rebinds ``last_orthogonal_loss`` (to the recomputation's tensor). On entry this
    records, for the module and each submodule, its persistent buffers (a copy: they are its
    state), which tensor each buffer is, and its attributes (``__dict__``); on exit (also when
    checkpoint stops the recomputation early) it writes the copies back in place
    (``DistributedDataParallel`` holds on to the buffer tensors themselves), puts back
    rebound buffers and attributes and removes new ones. Every copy is written back: BatchNorm
    updates its statistics without bumping their version counter, so which ones changed is not
    known for free. Non-persistent buffers are constants (the dynamic shuffle's index tables)
    and are not copied. Re-entrant: one instance serves every recomputation of a call.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._saved: list[list[tuple[nn.Module, dict[str, Any], dict[str, Any]]]] = []

    def __enter__(self) -> None:
        snapshot = []
        for m in self.module.modules():
            buffers = {
                name: (b, None if name in m._non_persistent_buffers_set else b.clone())
                for name, b in m._buffers.items()
                if b is not None
            }
            snapshot.append((m, buffers, dict(m.__dict__)))
        self._saved.append(snapshot)

    def __exit__(self, *exc: Any) -> None:
        for m, buffers, attrs in self._saved.pop():
            for name, (b, copy) in buffers.items():
                if m._buffers.get(name) is not b:
                    m._buffers[name] = b
                if copy is not None:
                    with torch.no_grad():
                        b.copy_(copy)
            for name in [k for k in m.__dict__ if k not in attrs]:
                del m.__dict__[name]
            for name, value in attrs.items():
                if m.__dict__.get(name, _MISSING) is not value:
                    m.__dict__[name] = value


def _checkpointed(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` under non-reentrant activation checkpointing, its side effects done once.

    Eagerly the recomputation runs in a :class:`_RecomputeGuard`. Under ``torch.compile`` the
    unit is traced into the graph with checkpoint's default contexts (a ``context_fn`` there must
    be ``TorchDispatchMode`` s): the compiled backward recomputes activations from the traced
    graph, whose buffer updates happen once, in the forward. A unit with a dynamic shuffle
    cannot be traced so (Dynamo refuses the attribute it sets, ``last_orthogonal_loss``, inside
    a checkpoint) and runs eagerly with the guard: a graph break around each such unit.
    """
    if torch.compiler.is_compiling():
        if any(isinstance(m, DynamicShuffle) for m in module.modules()):
            return _guarded_checkpoint_eagerly(module, x)
        return checkpoint(module, x, use_reentrant=False)
    return _guarded_checkpoint(module, x)


def _guarded_checkpoint(module: nn.Module, x: Tensor) -> Tensor:
    contexts = functools.partial(_recompute_contexts, module)
    return checkpoint(module, x, use_reentrant=False, context_fn=contexts)


#: :func:`_guarded_checkpoint` outside the compiled graph
_guarded_checkpoint_eagerly = torch.compiler.disable(_guarded_checkpoint)


def _recompute_contexts(module: nn.Module) -> tuple[Any, _RecomputeGuard]:
    """checkpoint's ``context_fn``: nothing around the forward, the guard around the recompute."""
    return contextlib.nullcontext(), _RecomputeGuard(module)


def _is_stage(module: nn.Module) -> bool:
    """A stage: a plain ``nn.Sequential`` of blocks (modules with children of their own), whose
    blocks are checkpointed one by one; a ``Sequential`` of layers (conv, norm, activation) is
    one block."""
    return type(module) is nn.Sequential and all(
        next(unit.children(), None) is not None for unit in module
    )


class ClassifierModel(nn.Module):
    """The interface every model of the zoo shares (after timm).

    A subclass builds its body, lists it in :meth:`_body` (the modules that
    :meth:`forward_features` applies in order), sets ``feature_info`` and calls
    :meth:`_init_head`. ``forward(x) == forward_head(forward_features(x))``.

    Attributes:
        num_features: channels of the feature map that :meth:`forward_features` returns.
        num_classes: classifier outputs (0: no classifier).
        model_args: the :func:`~dyshuffle.models.create_model` keywords that rebuild the model.
        feature_info: the feature maps a detection or segmentation neck can take, in timm's
            form: one ``dict(num_chs=..., reduction=..., module=...)`` per feature (channels,
            input size / feature size, and the name in :meth:`_body` of the module whose output
            it is), stem first, the output of :meth:`forward_features` last.
        pretrained_cfg: timm's data configuration of the model (also ``default_cfg``), what
            ``timm.data.resolve_data_config(model=model)`` reads: ``input_size``, ``mean``,
            ``std``, ``interpolation``, ``crop_pct``, ``num_classes``, ``first_conv``,
            ``classifier``, ... (see :meth:`_default_pretrained_cfg`). No weights: ``url`` is
            empty.
        grad_checkpointing: whether training recomputes activations in the backward pass
            (:meth:`set_grad_checkpointing`).
    """

    num_features: int
    num_classes: int
    model_args: dict[str, Any]
    feature_info: list[dict[str, Any]]
    pretrained_cfg: dict[str, Any]
    grad_checkpointing: bool = False

    def _init_head(self, num_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        self.num_features = num_features
        self.drop_rate = drop_rate
        self.head_drop = nn.Dropout(drop_rate)
        self.pretrained_cfg = self._default_pretrained_cfg(num_classes)
        self.reset_classifier(num_classes)

    def _body(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` pairs that :meth:`forward_features` applies in this order."""
        raise NotImplementedError

    def _default_pretrained_cfg(self, num_classes: int) -> dict[str, Any]:
        """timm's ``pretrained_cfg`` of this architecture (called once the body is built).

        The CIFAR stem (a stride-1 stem: ``feature_info[0]`` at reduction 1) takes ``32 x 32``
        images evaluated as they are (``crop_pct`` 1), the ImageNet stem ``224 x 224`` center
        crops of the image resized to ``224 / 0.875`` (``dyshuffle train``'s evaluation of image
        files and timm's default), both resized bilinearly (torchvision's ``Resize``).
        ``mean`` and ``std`` are ImageNet's for both stems: ``dyshuffle train`` normalizes
        CIFAR by the channel statistics of the training set it reads, no fixed constants; with
        ``in_chans != 3`` each channel gets the mean of the three.
        """
        first_conv = None
        for name, module in self._body():
            for sub, m in module.named_modules():
                if isinstance(m, nn.Conv2d):
                    first_conv = f"{name}.{sub}" if sub else name
                    in_chans = m.in_channels
                    break
            if first_conv is not None:
                break
        if first_conv is None:
            raise ValueError(f"{type(self).__name__} has no convolution in its body")
        cifar = self.feature_info[0]["reduction"] == 1
        size = 32 if cifar else 224
        final = size // self.feature_info[-1]["reduction"]
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if in_chans != 3:
            mean = (sum(mean) / 3,) * in_chans
            std = (sum(std) / 3,) * in_chans
        return {
            "url": "",
            "num_classes": num_classes,
            "input_size": (in_chans, size, size),
            "pool_size": (final, final),
            "crop_pct": 1.0 if cifar else 0.875,
            "interpolation": "bilinear",
            "fixed_input_size": False,
            "mean": mean,
            "std": std,
            "first_conv": first_conv,
            "classifier": "fc",
        }

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of :attr:`pretrained_cfg` (the same dict)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict[str, Any]) -> None:
        self.pretrained_cfg = cfg

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass instead of keeping them (timm's contract).

        When enabled, in training with autograd on, :meth:`forward_features` and
        :meth:`forward_intermediates` run each unit of each stage (and every other module of the
        body whole) under ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the
        forward keeps each unit's input only, and the backward runs the unit again. The
        training step is the same as without: the same random numbers are drawn again
        (checkpoint restores the RNG state) and the recomputation leaves the buffers (BatchNorm
        statistics) and attributes (a dynamic shuffle's ``last_orthogonal_loss``) as the forward
        left them. Evaluation and ``torch.no_grad`` are unaffected. Not part of the
        ``state_dict``.

        Args:
            enable: turn checkpointing on (``True``) or off.
        """
        if not isinstance(enable, bool):
            raise ValueError(f"enable must be a bool, got {enable!r}")
        self.grad_checkpointing = enable

    def _run_body_module(self, module: nn.Module, x: Tensor) -> Tensor:
        """``module(x)``, checkpointed unit by unit when :meth:`set_grad_checkpointing` asks."""
        if not (self.grad_checkpointing and self.training and torch.is_grad_enabled()):
            return module(x)
        if isinstance(module, nn.Identity):
            return x
        if _is_stage(module):
            for unit in module:
                x = _checkpointed(unit, x)
            return x
        return _checkpointed(module, x)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(N, in_chans, H, W)`` -> ``(N, num_features, H', W')``."""
        for _, module in self._body():
            x = self._run_body_module(module, x)
        return x

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Indices = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """:meth:`forward_features` that also returns the feature maps of ``feature_info``.

        timm's contract for convolutional networks.

        Args:
            x: ``(N, in_chans, H, W)``.
            indices: the features to return: ``None`` (all), an int ``n`` (the last ``n``) or a
                sequence of indices into ``feature_info`` (negative ones count from the end).
            norm: accepted for timm; there is no final norm layer to apply.
            stop_early: stop after the deepest feature asked for (the final output is then that
                feature).
            output_fmt: ``"NCHW"``, the only layout.
            intermediates_only: return only the list of features.

        Returns:
            ``(forward_features(x), features)`` or ``features``: the chosen feature maps, in
            network order, ``features[i]`` of shape ``(N, num_chs, H / reduction, W / reduction)``.

        Raises:
            ValueError: for bad ``indices`` or another ``output_fmt``, naming the value.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        taps = {f["module"]: i for i, f in enumerate(self.feature_info)}
        intermediates = []
        for name, module in self._body():
            x = self._run_body_module(module, x)
            i = taps.get(name)
            if i is None:
                continue
            if i in take:
                intermediates.append(x)
            if i == max_index and (stop_early or intermediates_only):
                break
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: Indices = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Remove the layers after the deepest feature of ``indices`` (timm's contract).

        The modules of :meth:`_body` after that feature become ``nn.Identity``, so
        :meth:`forward_features` ends there and ``num_features`` is its channel count.

        Args:
            indices: the features to keep (as in :meth:`forward_intermediates`).
            prune_norm: accepted for timm; there is no final norm layer.
            prune_head: remove the classifier (``reset_classifier(0)``); done anyway when the
                body is cut, since the classifier no longer fits its input.

        Returns:
            The absolute indices of the kept features, sorted.

        Raises:
            ValueError: for bad ``indices``, naming the value.
        """
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        names = [name for name, _ in self._body()]
        cut = names.index(self.feature_info[max_index]["module"]) + 1
        for name in names[cut:]:
            parent, _, child = name.rpartition(".")
            setattr(self.get_submodule(parent), child, nn.Identity())
        pruned_end = cut < len(names)
        if pruned_end:
            self.num_features = self.feature_info[max_index]["num_chs"]
            final = (
                self.pretrained_cfg["input_size"][-1] // self.feature_info[max_index]["reduction"]
            )
            self.pretrained_cfg["pool_size"] = (final, final)
        if prune_head or pruned_end:
            self.reset_classifier(0)
        return take

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pooling, dropout and the classifier.

        Args:
            x: ``(N, num_features, H, W)`` from :meth:`forward_features`.
            pre_logits: return the pooled ``(N, num_features)`` features, skip the classifier.
        """
        x = self.head_drop(x.mean(dim=(2, 3)))  # (N, num_features)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final classifier module (``nn.Identity`` when ``num_classes == 0``)."""
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a freshly initialized one with ``num_classes`` outputs.

        ``num_classes == 0`` leaves ``nn.Identity``, so the model returns pooled features.
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
        self.num_classes = num_classes
        ref = next(self.parameters(), None)
        factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        self.fc = (
            nn.Linear(self.num_features, num_classes, **factory)
            if num_classes > 0
            else nn.Identity()
        )
        if num_classes > 0:
            self._init_classifier(self.fc)
        if getattr(self, "model_args", None) is not None:
            self.model_args["num_classes"] = num_classes
        if isinstance(getattr(self, "pretrained_cfg", None), dict):
            self.pretrained_cfg["num_classes"] = num_classes

    def _init_classifier(self, fc: nn.Linear) -> None:
        """Initialization of a new classifier (PyTorch's default unless overridden)."""
