"""ShuffleNetV1 (Zhang et al., CVPR 2018) with a pluggable channel mixer.

The channel mixer replaces the channel shuffle after the first grouped 1x1 convolution of each
unit (Gong et al., "Dynamic Shuffle", arXiv 2310.02776). Widths follow Table 1 of the ShuffleNet
paper: stage-2 outputs of 144/200/240/272/384 channels for g = 1/2/3/4/8 at 1.0x, doubled at each
stage, a 24-channel stem, bottleneck width a quarter of the unit output, no grouped convolution
in the first 1x1 convolution of stage 2. A width multiplier ``s`` scales every layer; channel
counts are rounded to the nearest multiple of ``4 g`` (stages) and ``g`` (stem) so every grouped
convolution divides (only g=2 and g=4 at 0.5x and 1.5x, and the g=8 stem at 0.5x and 1.5x, move).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import create_mixer, mix_concat
from ._blocks import ClassifierModel, ConvBNAct, make_divisible
from ._registry import (
    check_model_args,
    finalize,
    reads_unit_input,
    register_model,
    stage_mixers,
    unit_mixer_kwargs,
)

__all__ = [
    "SHUFFLENET_V1_CHANNELS",
    "SHUFFLENET_V1_WIDTHS",
    "ShuffleNetV1",
    "ShuffleV1Unit",
    "shufflenet_v1_channels",
]

#: groups -> stage-2 output channels at 1.0x (ShuffleNet paper, Table 1)
SHUFFLENET_V1_CHANNELS: dict[int, int] = {1: 144, 2: 200, 3: 240, 4: 272, 8: 384}
#: width multipliers of the registered variants
SHUFFLENET_V1_WIDTHS: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
#: units per stage (the first of each has stride 2)
SHUFFLENET_V1_REPEATS = (4, 8, 4)


def shufflenet_v1_channels(groups: int, width: float) -> tuple[int, int, int, int]:
    """Output channels of (stem, stage2, stage3, stage4) for ``groups`` at ``width``.

    Raises:
        ValueError: unknown ``groups`` or non-positive ``width``, naming the valid groups.
    """
    if groups not in SHUFFLENET_V1_CHANNELS:
        valid = ", ".join(map(str, SHUFFLENET_V1_CHANNELS))
        raise ValueError(f"unknown ShuffleNetV1 groups {groups!r}; valid: {valid}")
    if not width > 0:
        raise ValueError(f"width must be positive, got {width!r}")
    stage2 = make_divisible(SHUFFLENET_V1_CHANNELS[groups] * width, 4 * groups)
    return make_divisible(24 * width, groups), stage2, 2 * stage2, 4 * stage2


class ShuffleV1Unit(nn.Module):
    """ShuffleNetV1 unit: grouped 1x1 conv, channel mixer, 3x3 depthwise conv, grouped 1x1 conv.

    Stride 1 adds the input (residual); stride 2 concatenates a 3x3 average-pooled input.

    Args:
        in_channels: input channels.
        out_channels: output channels (stride 2: including the ``in_channels`` of the shortcut).
        stride: 1 or 2.
        groups: groups of the 1x1 convolutions and of the fixed shuffle.
        grouped_first: group the first 1x1 convolution (``False`` in the first unit of stage 2).
        mixer: channel mixer name or callable, built with ``shuffle_groups=groups``.
        mixer_kwargs: keywords of the mixer.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        groups: int,
        grouped_first: bool = True,
        mixer: str | Callable[..., nn.Module] = "shuffle",
        mixer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        if stride == 1 and in_channels != out_channels:
            raise ValueError(
                f"a stride-1 unit keeps the width, got {in_channels} -> {out_channels} channels"
            )
        mid = out_channels // 4
        branch = out_channels - in_channels if stride == 2 else out_channels
        first_groups = groups if grouped_first else 1
        for what, count, g in (
            ("input", in_channels, first_groups),
            ("bottleneck", mid, groups),
            ("branch output", branch, groups),
        ):
            if count < 1 or count % g:
                raise ValueError(
                    f"groups={g} does not divide the {count} {what} channels of a ShuffleNetV1 "
                    f"unit ({in_channels} -> {out_channels}, stride {stride})"
                )
        self.stride, self.groups = stride, groups
        self.conv1 = ConvBNAct(in_channels, mid, 1, groups=first_groups)
        self.mixer = create_mixer(mixer, mid, shuffle_groups=groups, **(mixer_kwargs or {}))
        self.conv2 = ConvBNAct(mid, mid, 3, stride, groups=mid, act=None)
        self.conv3 = ConvBNAct(mid, branch, 1, groups=groups, act=None)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # a mixer built with context_channels reads the unit's input
        y = self.conv3(self.conv2(mix_concat(self.mixer, (self.conv1(x),), context=x)))
        if self.stride == 1:
            return F.relu(x + y)
        return torch.cat((self.shortcut(x), F.relu(y)), dim=1)


class ShuffleNetV1(ClassifierModel):
    """ShuffleNetV1 with the channel mixer as an argument.

    Args:
        conv_groups: groups of the grouped 1x1 convolutions (1, 2, 3, 4 or 8 in the paper);
            not called ``groups``, which is the mixer's keyword (in ``**mixer_kwargs``).
        stage_channels: output channels of the stem and of the three stages.
        stage_repeats: units per stage.
        num_classes: classifier outputs (0: none).
        stem: ``"imagenet"`` (3x3 stride-2 conv and 3x3 stride-2 max-pool) or ``"cifar"``
            (3x3 stride-1 conv, no max-pool).
        mixer: channel mixer after the first 1x1 convolution of each unit (name or callable).
        pointwise: only ``"conv"`` (the grouped 1x1 convolutions stay).
        in_chans: input channels.
        pointwise_kwargs: must be empty (no static-dynamic shuffles here).
        mixer_stages: the stages (of 2, 3, 4) whose units get ``mixer``; the others keep the fixed
            shuffle. ``None``: all.
        mixer_descriptor: what the generator of a dynamic mixer reads: ``"mixer_input"`` (the
            default), the pooled output of the first 1x1 convolution it permutes, or
            ``"unit_input"``, the pooled input of its unit (each mixer is then built with
            ``context_channels`` equal to its unit's input channels).
        **mixer_kwargs: keywords of the mixer.
    """

    def __init__(
        self,
        conv_groups: int = 3,
        stage_channels: Sequence[int] | None = None,
        stage_repeats: Sequence[int] = SHUFFLENET_V1_REPEATS,
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
        if pointwise != "conv" or pointwise_kwargs:
            raise ValueError(
                f"ShuffleNetV1 supports pointwise='conv' only (its 1x1 convolutions are grouped), "
                f"got pointwise={pointwise!r}, pointwise_kwargs={pointwise_kwargs!r}"
            )
        if not isinstance(conv_groups, int) or conv_groups < 1:
            raise ValueError(f"conv_groups must be a positive integer, got {conv_groups!r}")
        if stage_channels is None:
            stage_channels = shufflenet_v1_channels(conv_groups, 1.0)
        if len(stage_repeats) != 3 or len(stage_channels) != 4:
            raise ValueError(
                f"need 3 stage repeats and 4 stage channels, got {tuple(stage_repeats)} and "
                f"{tuple(stage_channels)}"
            )
        self.conv_groups = conv_groups
        self.stage_repeats, self.stage_channels = tuple(stage_repeats), tuple(stage_channels)
        self.conv1 = ConvBNAct(in_chans, stage_channels[0], 3, 2 if stem == "imagenet" else 1)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        reduction = 2 if stem == "imagenet" else 1
        self.feature_info = [dict(num_chs=stage_channels[0], reduction=reduction, module="conv1")]
        reduction *= 2 if stem == "imagenet" else 1  # the max-pool
        cin = stage_channels[0]
        for i, (repeats, cout) in enumerate(zip(stage_repeats, stage_channels[1:]), start=2):
            units = [
                ShuffleV1Unit(
                    cin if j == 0 else cout,
                    cout,
                    2 if j == 0 else 1,
                    conv_groups,
                    grouped_first=not (i == 2 and j == 0),
                    mixer=mixers[i][0],
                    mixer_kwargs=unit_mixer_kwargs(
                        mixers[i], mixer, unit_input, cin if j == 0 else cout
                    ),
                )
                for j in range(repeats)
            ]
            setattr(self, f"stage{i}", nn.Sequential(*units))
            reduction *= 2
            self.feature_info.append(dict(num_chs=cout, reduction=reduction, module=f"stage{i}"))
            cin = cout
        self._init_head(cin, num_classes)

    def _body(self) -> list[tuple[str, nn.Module]]:
        names = ("conv1", "maxpool", "stage2", "stage3", "stage4")
        return [(name, getattr(self, name)) for name in names]


def _create_shufflenet_v1(conv_groups: int, width: float, **kwargs: Any) -> ShuffleNetV1:
    """ShuffleNetV1 with ``conv_groups`` in (1, 2, 3, 4, 8) at ``width`` in (0.5, 1.0, 1.5, 2.0).

    ``kwargs`` may hold the mixer's own ``groups`` (e.g. ``mixer="dynamic", groups=3``)."""
    if width not in SHUFFLENET_V1_WIDTHS:
        valid = ", ".join(map(str, SHUFFLENET_V1_WIDTHS))
        raise ValueError(f"unknown ShuffleNetV1 width {width!r}; valid: {valid}")
    channels = shufflenet_v1_channels(conv_groups, width)
    name = f"shufflenet_v1_g{conv_groups}_x{width:.1f}".replace(".", "_")
    args = dict(num_classes=1000, stem="imagenet", mixer="shuffle", pointwise="conv", in_chans=3)
    args.update(kwargs)
    model = ShuffleNetV1(conv_groups, channels, SHUFFLENET_V1_REPEATS, **args)
    return finalize(model, name, args)


# one builder per (groups, width); the name is shufflenet_v1_g{groups}_x{width}
@register_model
def shufflenet_v1_g1_x0_5(**kwargs: Any) -> ShuffleNetV1:
    return _create_shufflenet_v1(1, 0.5, **kwargs)


@register_model
def shufflenet_v1_g1_x1_0(**kwargs: Any) -> ShuffleNetV1:
    return _create_shufflenet_v1(1, 1.0, **kwargs)


@register_model
def shufflenet_v1_g1_x1_5(**kwargs: Any) -> ShuffleNetV1:
    return _create_shufflenet_v1(1, 1.5, **kwargs)


@register_model
def shufflenet_v1_g1_x2_0(**kwargs: Any) -> ShuffleNetV1:
    return _create_shufflenet_v1(1, 2.0, **kwargs)


@register_model
def shufflenet_v1_g2_x0_5(**kwargs: Any) -> ShuffleNetV1:
    return _create_shufflenet_v1(2, 0.5, **kwargs)


@register_model
def shufflenet_v1_g2_x1_0(**kwargs: Any) -> ShuffleNetV1:
    return _create_shufflenet_v1(2, 1.0, **kwargs)


@register_model
def shufflenet_v1_g2_x1_5(**kwargs: Any) -> ShuffleNetV1:
    return _create_shufflenet_v1(2, 1.5, **kwargs)


@register_model
def shufflenet_v1_g2_x2_0(**kwargs: Any) -> ShuffleNetV1:
    return _create_shufflenet_v1(2, 2.0, **kwargs)


@register_model
def shufflenet_v1_g3_x0_5(**kwargs: Any) -> ShuffleNetV1:
    return _create_shufflenet_v1(3, 0.5, **kwargs)


@register_model
def shufflenet_v1_g3_x1_0(**kwargs: Any) -> ShuffleNetV1:
    return _create_shufflenet_v1(3, 1.0, **kwargs)


@register_model
def shufflenet_v1_g3_x1_5(**kwargs: Any) -> ShuffleNetV1:
    return _create_shufflenet_v1(3, 1.5, **kwargs)


@register_model
def shufflenet_v1_g3_x2_0(**kwargs: Any) -> ShuffleNetV1:
    return _create_shufflenet_v1(3, 2.0, **kwargs)


@register_model
def shufflenet_v1_g4_x0_5(**kwargs: Any) -> ShuffleNetV1:
    return _create_shufflenet_v1(4, 0.5, **kwargs)


@register_model
def shufflenet_v1_g4_x1_0(**kwargs: Any) -> ShuffleNetV1:
    return _create_shufflenet_v1(4, 1.0, **kwargs)


@register_model
def shufflenet_v1_g4_x1_5(**kwargs: Any) -> ShuffleNetV1:
    return _create_shufflenet_v1(4, 1.5, **kwargs)


@register_model
def shufflenet_v1_g4_x2_0(**kwargs: Any) -> ShuffleNetV1:
    return _create_shufflenet_v1(4, 2.0, **kwargs)


@register_model
def shufflenet_v1_g8_x0_5(**kwargs: Any) -> ShuffleNetV1:
    return _create_shufflenet_v1(8, 0.5, **kwargs)


@register_model
def shufflenet_v1_g8_x1_0(**kwargs: Any) -> ShuffleNetV1:
    return _create_shufflenet_v1(8, 1.0, **kwargs)


@register_model
def shufflenet_v1_g8_x1_5(**kwargs: Any) -> ShuffleNetV1:
    return _create_shufflenet_v1(8, 1.5, **kwargs)


@register_model
def shufflenet_v1_g8_x2_0(**kwargs: Any) -> ShuffleNetV1:
    return _create_shufflenet_v1(8, 2.0, **kwargs)
