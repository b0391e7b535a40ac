"""MobileNetV2 (Sandler et al., CVPR 2018) with static-dynamic shuffles as pointwise layers.

``pointwise="sds"`` replaces the expansion and projection 1x1 convolutions of every inverted
residual block by rectangular static-dynamic shuffles (Gong et al., "Dynamic Shuffle",
arXiv 2310.02776), keeping their BatchNorm and ReLU6; the stem and the final 1x1 convolution
stay convolutions. MobileNetV2 has no channel shuffle, so ``mixer`` can only be ``"shuffle"``
(the default) or ``"none"``, which both mean "nothing to mix". With ``pointwise="conv"`` and the
ImageNet stem the model is torchvision's ``mobilenet_v2`` (same module names under
``features``, same parameter count and initialization; torchvision's ``classifier.1`` is ``fc``).

The CIFAR stem removes the first 4x of down-sampling, as it does for the ShuffleNets: the stem
convolution and the first 24-channel block get stride 1 (32x32 inputs end at 4x4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from ._blocks import ClassifierModel, ConvBNAct, pointwise_conv
from ._registry import check_model_args, finalize, register_model

__all__ = ["MOBILENET_V2_SETTINGS", "MobileInvertedResidual", "MobileNetV2"]

#: (expansion t, output channels c, repeats n, first stride s) per stage (paper, Table 2)
MOBILENET_V2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
#: mixers MobileNetV2 accepts: it has no shuffle to replace
MOBILENET_V2_MIXERS = ("shuffle", "none")


class MobileInvertedResidual(nn.Module):
    """Inverted residual block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: depthwise stride (the residual is used at stride 1 when the width is kept).
        expand_ratio: hidden width ``in_channels * expand_ratio`` (1: no expansion layer).
        pointwise: ``"conv"`` or ``"sds"`` for the two 1x1 layers.
        pointwise_kwargs: keywords of the static-dynamic shuffles.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        expand_ratio: int,
        pointwise: str = "conv",
        pointwise_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        hidden = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(
                nn.Sequential(
                    pointwise_conv(pointwise, in_channels, hidden, pointwise_kwargs),
                    nn.BatchNorm2d(hidden),
                    nn.ReLU6(inplace=True),
                )
            )
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            pointwise_conv(pointwise, hidden, out_channels, pointwise_kwargs),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(ClassifierModel):
    """MobileNetV2 1.0x with the pointwise layer of its blocks as an argument.

    Args:
        settings: ``(t, c, n, s)`` rows, see :data:`MOBILENET_V2_SETTINGS`.
        num_classes: classifier outputs (0: none).
        stem: ``"imagenet"`` or ``"cifar"`` (stride 1 in the stem and the first 24-channel block).
        mixer: ``"shuffle"`` or ``"none"`` (MobileNetV2 has no shuffle; both leave it as it is).
        pointwise: ``"conv"`` or ``"sds"`` for the 1x1 layers of the blocks.
        in_chans: input channels.
        stem_channels: stem output channels.
        last_channels: output channels of the final 1x1 convolution (``num_features``).
        drop_rate: dropout before the classifier.
        pointwise_kwargs: keywords of the static-dynamic shuffles.
        **mixer_kwargs: must be empty (there is no mixer to receive them).
    """

    def __init__(
        self,
        settings: Sequence[tuple[int, int, int, int]] = MOBILENET_V2_SETTINGS,
        num_classes: int = 1000,
        stem: str = "imagenet",
        mixer: str | Callable[..., nn.Module] = "shuffle",
        pointwise: str = "conv",
        in_chans: int = 3,
        stem_channels: int = 32,
        last_channels: int = 1280,
        drop_rate: float = 0.2,
        pointwise_kwargs: dict[str, Any] | None = None,
        **mixer_kwargs: Any,
    ) -> None:
        super().__init__()
        check_model_args(stem, mixer, pointwise, num_classes, in_chans)
        if mixer not in MOBILENET_V2_MIXERS:
            raise ValueError(
                f"MobileNetV2 has no channel shuffle to replace, so mixer {mixer!r} has no place; "
                f"valid: {', '.join(map(repr, MOBILENET_V2_MIXERS))} (use pointwise='sds' for "
                f"static-dynamic shuffles)"
            )
        if mixer_kwargs:
            raise ValueError(
                f"MobileNetV2 has no mixer to take the options {sorted(mixer_kwargs)}; "
                f"static-dynamic shuffle options go in pointwise_kwargs"
            )
        cifar = stem == "cifar"
        reduction = 1 if cifar else 2
        features: list[nn.Module] = [ConvBNAct(in_chans, stem_channels, 3, reduction, act=nn.ReLU6)]
        # the features (timm's MobileNetV2): the last block of each reduction, then the last conv
        ends = [dict(num_chs=stem_channels, reduction=reduction, module="features.0")]
        cin = stem_channels
        for t, c, n, s in settings:
            if cifar and c == 24:
                s = 1  # CIFAR: the 24-channel stage keeps the resolution
            for j in range(n):
                features.append(
                    MobileInvertedResidual(
                        cin, c, s if j == 0 else 1, t, pointwise, pointwise_kwargs
                    )
                )
                cin = c
            reduction *= s
            ends.append(
                dict(num_chs=c, reduction=reduction, module=f"features.{len(features) - 1}")
            )
        features.append(ConvBNAct(cin, last_channels, 1, act=nn.ReLU6))
        self.feature_info = [
            *(f for f, after in zip(ends, ends[1:]) if after["reduction"] != f["reduction"]),
            ends[-1],
            dict(
                num_chs=last_channels, reduction=reduction, module=f"features.{len(features) - 1}"
            ),
        ]
        self.features = nn.Sequential(*features)
        for m in self.features.modules():  # torchvision's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self._init_head(last_channels, num_classes, drop_rate)

    def _init_classifier(self, fc: nn.Linear) -> None:
        nn.init.normal_(fc.weight, 0, 0.01)
        nn.init.zeros_(fc.bias)

    def _body(self) -> list[tuple[str, nn.Module]]:
        return [(f"features.{i}", m) for i, m in self.features.named_children()]


def _create_mobilenet_v2(**kwargs: Any) -> MobileNetV2:
    args = dict(num_classes=1000, stem="imagenet", mixer="shuffle", pointwise="conv", in_chans=3)
    args.update(kwargs)
    model = MobileNetV2(MOBILENET_V2_SETTINGS, **args)
    return finalize(model, "mobilenet_v2", args)


@register_model
def mobilenet_v2(**kwargs: Any) -> MobileNetV2:
    """MobileNetV2 1.0x (3.50 M parameters with the ImageNet stem and 1000 classes)."""
    return _create_mobilenet_v2(**kwargs)
