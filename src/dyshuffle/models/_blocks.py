"""Building blocks shared by the backbones: the model interface and small conv helpers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ..layers import StaticDynamicShuffle
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
    """

    num_features: int
    num_classes: int
    model_args: dict[str, Any]
    feature_info: list[dict[str, Any]]

    def _init_head(self, num_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        self.num_features = num_features
        self.drop_rate = drop_rate
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes)

    def _body(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` pairs that :meth:`forward_features` applies in this order."""
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> Tensor:
        """``(N, in_chans, H, W)`` -> ``(N, num_features, H', W')``."""
        for _, module in self._body():
            x = module(x)
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
            x = module(x)
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

    def _init_classifier(self, fc: nn.Linear) -> None:
        """Initialization of a new classifier (PyTorch's default unless overridden)."""
