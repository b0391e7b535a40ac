"""Building blocks shared by the backbones: the classifier interface and small conv helpers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ..layers import StaticDynamicShuffle

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

    Subclasses build their body, call :meth:`_init_head` and implement :meth:`forward_features`.
    ``forward(x) == forward_head(forward_features(x))``.

    Attributes:
        num_features: channels of the feature map that :meth:`forward_features` returns.
        num_classes: classifier outputs (0: no classifier).
        model_args: the :func:`~dyshuffle.models.create_model` keywords that rebuild the model.
    """

    num_features: int
    num_classes: int
    model_args: dict[str, Any]

    def _init_head(self, num_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        self.num_features = num_features
        self.drop_rate = drop_rate
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(N, in_chans, H, W)`` -> ``(N, num_features, H', W')``."""
        raise NotImplementedError

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
