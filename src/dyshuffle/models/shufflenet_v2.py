"""ShuffleNetV2 (Ma et al., ECCV 2018) with a pluggable channel mixer and pointwise layer.

The channel mixer replaces the ``channel_shuffle(x, 2)`` after the concatenation of each unit
(Gong et al., "Dynamic Shuffle", arXiv 2310.02776); ``pointwise="sds"`` replaces the 1x1
convolutions of the branches by static-dynamic shuffles. With ``mixer="shuffle"``,
``pointwise="conv"`` and the ImageNet stem the model is torchvision's ``shufflenet_v2_x*``: the
same modules under the same names (its ``state_dict`` loads as is) and the same parameter count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from ..layers import create_mixer, mix_concat
from ._blocks import ClassifierModel, pointwise_conv
from ._registry import (
    check_model_args,
    finalize,
    reads_unit_input,
    register_model,
    stage_mixers,
    unit_mixer_kwargs,
)

__all__ = ["SHUFFLENET_V2_WIDTHS", "InvertedResidual", "ShuffleNetV2"]

#: width multiplier -> output channels of (stem, stage2, stage3, stage4, conv5) (paper, Table 5)
SHUFFLENET_V2_WIDTHS: dict[float, tuple[int, int, int, int, int]] = {
    0.5: (24, 48, 96, 192, 1024),
    1.0: (24, 116, 232, 464, 1024),
    1.5: (24, 176, 352, 704, 1024),
    2.0: (24, 244, 488, 976, 2048),
}
#: units per stage (the first of each has stride 2)
SHUFFLENET_V2_REPEATS = (4, 8, 4)


def _depthwise(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)


class InvertedResidual(nn.Module):
    """ShuffleNetV2 unit: channel split (or two stride-2 branches), concatenation, channel mixer.

    Args:
        in_channels: input channels.
        out_channels: output channels (each branch gives half).
        stride: 1 (basic unit) or 2 (down-sampling unit).
        mixer: channel mixer name or callable, built with ``shuffle_groups=2``.
        pointwise: ``"conv"`` or ``"sds"`` for the 1x1 convolutions of the branches.
        mixer_kwargs: keywords of the mixer.
        pointwise_kwargs: keywords of the static-dynamic shuffles (``pointwise="sds"``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        mixer: str | Callable[..., nn.Module] = "shuffle",
        pointwise: str = "conv",
        mixer_kwargs: dict[str, Any] | None = None,
        pointwise_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        if out_channels % 2:
            raise ValueError(f"out_channels must be even, got {out_channels}")
        if stride == 1 and in_channels != out_channels:
            raise ValueError(
                f"a stride-1 unit keeps the width, got {in_channels} -> {out_channels} channels"
            )
        self.stride = stride
        branch = out_channels // 2

        def pw(cin: int, cout: int) -> nn.Module:
            return pointwise_conv(pointwise, cin, cout, pointwise_kwargs)

        if stride > 1:
            self.branch1 = nn.Sequential(
                _depthwise(in_channels, stride),
                nn.BatchNorm2d(in_channels),
                pw(in_channels, branch),
                nn.BatchNorm2d(branch),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            pw(in_channels if stride > 1 else branch, branch),
            nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True),
            _depthwise(branch, stride),
            nn.BatchNorm2d(branch),
            pw(branch, branch),
            nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True),
        )
        self.mixer = create_mixer(mixer, out_channels, shuffle_groups=2, **(mixer_kwargs or {}))

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)  # two (N, C/2, H, W) halves
            parts = (x1, self.branch2(x2))
        else:
            parts = (self.branch1(x), self.branch2(x))
        # the mixer of the concatenation (a dynamic shuffle takes the halves: no copy for it);
        # a mixer built with context_channels reads the unit's input
        return mix_concat(self.mixer, parts, context=x)


class ShuffleNetV2(ClassifierModel):
    """ShuffleNetV2 with the channel mixer and the pointwise layer as arguments.

    Args:
        stage_repeats: units per stage (three stages).
        stage_channels: output channels of the stem, of each stage and of ``conv5``.
        num_classes: classifier outputs (0: none).
        stem: ``"imagenet"`` (3x3 stride-2 conv and 3x3 stride-2 max-pool) or ``"cifar"``
            (3x3 stride-1 conv, no max-pool).
        mixer: channel mixer after each unit's concatenation (name or callable).
        pointwise: ``"conv"`` or ``"sds"`` for the 1x1 convolutions inside the units.
        in_chans: input channels.
        pointwise_kwargs: keywords of the static-dynamic shuffles.
        mixer_stages: the stages (of 2, 3, 4) whose units get ``mixer``; the others keep the fixed
            shuffle. ``None``: all.
        mixer_descriptor: what the generator of a dynamic mixer reads (METHOD.md's open choice):
            ``"mixer_input"`` (the default), the pooled concatenation it permutes, or
            ``"unit_input"``, the pooled input of its unit (each mixer is then built with
            ``context_channels`` equal to its unit's input channels).
        **mixer_kwargs: keywords of the mixer.
    """

    def __init__(
        self,
        stage_repeats: Sequence[int] = SHUFFLENET_V2_REPEATS,
        stage_channels: Sequence[int] = SHUFFLENET_V2_WIDTHS[1.0],
        num_classes: int = 1000,
        stem: str = "imagenet",
        mixer: str | Callable[..., nn.Module] = "shuffle",
        pointwise: str = "conv",
        in_chans: int = 3,
        pointwise_kwargs: dict[str, Any] | None = None,
        mixer_stages: Sequence[int] | None = None,
        mixer_descriptor: str = "mixer_input",
        **mixer_kwargs: Any,
    ) -> None:
        super().__init__()
        check_model_args(stem, mixer, pointwise, num_classes, in_chans)
        unit_input = reads_unit_input(mixer, mixer_descriptor)
        mixers = stage_mixers(mixer, mixer_kwargs, mixer_stages)
        if len(stage_repeats) != 3 or len(stage_channels) != 5:
            raise ValueError(
                f"need 3 stage repeats and 5 stage channels, got {tuple(stage_repeats)} and "
                f"{tuple(stage_channels)}"
            )
        self.stage_repeats, self.stage_channels = tuple(stage_repeats), tuple(stage_channels)
        stem_channels = stage_channels[0]
        stride = 2 if stem == "imagenet" else 1
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_chans, stem_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(stem_channels),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        reduction = stride
        self.feature_info = [dict(num_chs=stem_channels, reduction=reduction, module="conv1")]
        reduction *= 2 if stem == "imagenet" else 1  # the max-pool
        cin = stem_channels
        for i, (repeats, cout) in enumerate(zip(stage_repeats, stage_channels[1:4]), start=2):
            units = [
                InvertedResidual(
                    cin if j == 0 else cout,
                    cout,
                    2 if j == 0 else 1,
                    mixer=mixers[i][0],
                    pointwise=pointwise,
                    mixer_kwargs=unit_mixer_kwargs(
                        mixers[i], mixer, unit_input, cin if j == 0 else cout
                    ),
                    pointwise_kwargs=pointwise_kwargs,
                )
                for j in range(repeats)
            ]
            setattr(self, f"stage{i}", nn.Sequential(*units))
            reduction *= 2
            self.feature_info.append(dict(num_chs=cout, reduction=reduction, module=f"stage{i}"))
            cin = cout
        self.conv5 = nn.Sequential(
            nn.Conv2d(cin, stage_channels[-1], 1, 1, 0, bias=False),
            nn.BatchNorm2d(stage_channels[-1]),
            nn.ReLU(inplace=True),
        )
        self.feature_info.append(
            dict(num_chs=stage_channels[-1], reduction=reduction, module="conv5")
        )
        self._init_head(stage_channels[-1], num_classes)

    def _body(self) -> list[tuple[str, nn.Module]]:
        names = ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5")
        return [(name, getattr(self, name)) for name in names]


def _create_shufflenet_v2(width: float, **kwargs: Any) -> ShuffleNetV2:
    """ShuffleNetV2 at width multiplier ``width`` (0.5, 1.0, 1.5 or 2.0)."""
    if width not in SHUFFLENET_V2_WIDTHS:
        valid = ", ".join(map(str, SHUFFLENET_V2_WIDTHS))
        raise ValueError(f"unknown ShuffleNetV2 width {width!r}; valid: {valid}")
    name = f"shufflenet_v2_x{width:.1f}".replace(".", "_")
    args = dict(num_classes=1000, stem="imagenet", mixer="shuffle", pointwise="conv", in_chans=3)
    args.update(kwargs)
    model = ShuffleNetV2(SHUFFLENET_V2_REPEATS, SHUFFLENET_V2_WIDTHS[width], **args)
    return finalize(model, name, args)


@register_model
def shufflenet_v2_x0_5(**kwargs: Any) -> ShuffleNetV2:
    """ShuffleNetV2 0.5x (1.37 M parameters with the ImageNet stem and 1000 classes)."""
    return _create_shufflenet_v2(0.5, **kwargs)


@register_model
def shufflenet_v2_x1_0(**kwargs: Any) -> ShuffleNetV2:
    """ShuffleNetV2 1.0x (2.28 M parameters with the ImageNet stem and 1000 classes)."""
    return _create_shufflenet_v2(1.0, **kwargs)


@register_model
def shufflenet_v2_x1_5(**kwargs: Any) -> ShuffleNetV2:
    """ShuffleNetV2 1.5x (3.50 M parameters with the ImageNet stem and 1000 classes)."""
    return _create_shufflenet_v2(1.5, **kwargs)


@register_model
def shufflenet_v2_x2_0(**kwargs: Any) -> ShuffleNetV2:
    """ShuffleNetV2 2.0x (7.39 M parameters with the ImageNet stem and 1000 classes)."""
    return _create_shufflenet_v2(2.0, **kwargs)
