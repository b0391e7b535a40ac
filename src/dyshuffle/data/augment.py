"""RandAugment, TrivialAugment and random erasing, drawn per sample, applied to a batch at once.

RandAugment (Cubuk et al., 2020, "RandAugment: Practical automated data augmentation with a
reduced search space") applies ``num_ops`` operations drawn uniformly from 14, all at one
magnitude; TrivialAugment (Muller and Hutter, 2021, "TrivialAugment: Tuning-free Yet
State-of-the-Art Data Augmentation", the "wide" space) applies one operation at a magnitude bin
drawn uniformly from 31. Random erasing (Zhong et al., 2020, "Random Erasing Data Augmentation")
sets one rectangle of an image to a constant. The operations, their order, magnitudes and signs
are torchvision's (``torchvision.transforms.v2.RandAugment``, ``TrivialAugmentWide``,
``RandomErasing``), as in its classification recipe (``--auto-augment ra|ta_wide
--ra-magnitude M --random-erase P``, bilinear interpolation, black fill).

torchvision draws one choice per call, for one image. Here the choices of a whole batch are drawn
at once from a generator the caller seeds (:func:`draw_auto_augment`, :func:`draw_erase_boxes`),
and :func:`auto_augment` sorts the batch by ``(operation, magnitude bin, sign)`` and calls the
``torchvision.transforms.v2.functional`` operation once per group on the batched uint8 tensor:
each image ends as torchvision's operation with that choice would leave it on its own
(``tests/test_augment.py``). :func:`erase` writes the rectangles of a batch with one mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AUTO_AUGMENT",
    "ERASE_RATIO",
    "ERASE_SCALE",
    "NUM_MAGNITUDE_BINS",
    "OPS",
    "RA_NUM_OPS",
    "AugmentChoice",
    "apply_op",
    "auto_augment",
    "draw_auto_augment",
    "draw_erase_boxes",
    "erase",
    "magnitude_table",
    "torchvision_erase_box",
]

#: ``auto_augment`` policies
AUTO_AUGMENT = ("none", "randaugment", "trivialaugment")
#: the operations, in the order of torchvision's augmentation spaces (an op index is a position)
OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
    "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)  # fmt: skip
#: operations that take a magnitude; those with a sign (50% negative)
_HAS_MAGNITUDE = torch.tensor([op not in ("Identity", "AutoContrast", "Equalize") for op in OPS])
_SIGNED = torch.tensor([op in OPS[1:10] for op in OPS])
#: magnitude bins of both policies (torchvision's default ``num_magnitude_bins``)
NUM_MAGNITUDE_BINS = 31
#: operations per image of RandAugment (torchvision's default ``num_ops``)
RA_NUM_OPS = 2
#: torchvision's ``RandomErasing`` defaults: erased fraction of the area, aspect ratio range
ERASE_SCALE = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)


def check_policy(policy: str) -> None:
    """Raise ``ValueError`` unless ``policy`` is one of :data:`AUTO_AUGMENT`."""
    if policy not in AUTO_AUGMENT:
        raise ValueError(f"unknown auto_augment {policy!r}; valid: {', '.join(AUTO_AUGMENT)}")


def check_magnitude(magnitude: int, name: str = "magnitude") -> None:
    """Raise ``ValueError`` unless ``magnitude`` is one of torchvision's magnitude bins."""
    if not 0 <= magnitude < NUM_MAGNITUDE_BINS:
        raise ValueError(
            f"{name} must be in [0, {NUM_MAGNITUDE_BINS - 1}] (torchvision's bins), "
            f"got {magnitude!r}"
        )


def check_prob(prob: float, name: str = "prob") -> None:
    """Raise ``ValueError`` unless ``prob`` is a chance in [0, 1]."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {prob!r}")


def magnitude_table(policy: str, height: int, width: int) -> Tensor:
    """Magnitudes of every operation and bin, ``(len(OPS), NUM_MAGNITUDE_BINS)`` float32.

    torchvision's ``_AUGMENTATION_SPACE`` of ``policy`` (``randaugment`` or ``trivialaugment``),
    computed as it does (float32 ``linspace``), so that ``float(table[op, bin])`` is the value
    torchvision passes to the operation. Rows of operations without a magnitude are 0;
    ``Solarize`` is a fraction of 255 and ``Posterize`` a number of bits.
    """
    check_policy(policy)
    n = NUM_MAGNITUDE_BINS
    if policy == "randaugment":
        shear, color, rotate, posterize_span = 0.3, 0.9, 30.0, 4
        translate = (150.0 / 331.0 * width, 150.0 / 331.0 * height)
    else:
        shear, color, rotate, posterize_span = 0.99, 0.99, 135.0, 6
        translate = (32.0, 32.0)
    rows = {
        "ShearX": torch.linspace(0.0, shear, n),
        "ShearY": torch.linspace(0.0, shear, n),
        "TranslateX": torch.linspace(0.0, translate[0], n),
        "TranslateY": torch.linspace(0.0, translate[1], n),
        "Rotate": torch.linspace(0.0, rotate, n),
        "Posterize": (8 - (torch.arange(n) / ((n - 1) / posterize_span))).round().int().float(),
        "Solarize": torch.linspace(1.0, 0.0, n),
    }
    for op in ("Brightness", "Color", "Contrast", "Sharpness"):
        rows[op] = torch.linspace(0.0, color, n)
    return torch.stack([rows.get(op, torch.zeros(n)) for op in OPS])


@dataclass(frozen=True)
class AugmentChoice:
    """Per-sample draws of :func:`draw_auto_augment`, ``(N, K)`` each: the ``K`` operations of
    each image, applied in order (2 for RandAugment, 1 for TrivialAugment).

    Attributes:
        ops: int64 indices into :data:`OPS`.
        bins: int64 magnitude bins (0 for operations without a magnitude).
        negative: bool, the magnitude's sign (``False`` for unsigned operations).
    """

    ops: Tensor
    bins: Tensor
    negative: Tensor

    def __getitem__(self, rows) -> AugmentChoice:
        return AugmentChoice(self.ops[rows], self.bins[rows], self.negative[rows])

    def __len__(self) -> int:
        return len(self.ops)

    def magnitudes(self, table: Tensor) -> list[list[float]]:
        """The signed magnitude of each operation, as torchvision passes it (``table`` from
        :func:`magnitude_table`)."""
        rows = zip(self.ops.tolist(), self.bins.tolist(), self.negative.tolist())
        return [
            [float(table[o, b]) * (-1.0 if s else 1.0) for o, b, s in zip(ops, bins, neg)]
            for ops, bins, neg in rows
        ]


def draw_auto_augment(
    policy: str, n: int, generator: torch.Generator, *, magnitude: int = 9
) -> AugmentChoice | None:
    """Draw the operations of ``n`` images (``None`` for policy ``"none"``, which draws nothing).

    Operations are uniform over :data:`OPS`, TrivialAugment's magnitude bins uniform over
    ``NUM_MAGNITUDE_BINS``, signs of signed operations negative with chance 1/2: the
    distribution of torchvision's per-image draws. The draws from ``generator`` (operations,
    TrivialAugment's bins, signs) do not depend on the operations drawn.

    Args:
        policy: one of :data:`AUTO_AUGMENT`.
        n: images.
        generator: a CPU generator.
        magnitude: RandAugment's magnitude bin, ``0 .. NUM_MAGNITUDE_BINS - 1``.
    """
    check_policy(policy)
    check_magnitude(magnitude)
    if policy == "none":
        return None
    k = RA_NUM_OPS if policy == "randaugment" else 1
    ops = torch.randint(len(OPS), (n, k), generator=generator)
    if policy == "randaugment":
        bins = torch.full((n, k), magnitude)
    else:
        bins = torch.randint(NUM_MAGNITUDE_BINS, (n, k), generator=generator)
    negative = torch.randint(2, (n, k), generator=generator).bool()
    bins = torch.where(_HAS_MAGNITUDE[ops], bins, 0)
    return AugmentChoice(ops, bins, negative & _SIGNED[ops])


def apply_op(x: Tensor, op: str, magnitude: float, interpolation="bilinear") -> Tensor:
    """torchvision's operation ``op`` at ``magnitude`` on uint8 images ``(..., C, H, W)``.

    The calls of ``torchvision.transforms.v2``'s auto-augment ``_apply_image_or_video_transform``
    (black fill).
    """
    from torchvision.transforms.v2 import functional as TF

    if op == "Identity":
        return x
    if op in ("ShearX", "ShearY"):
        degrees = math.degrees(math.atan(magnitude))
        shear = [degrees, 0.0] if op == "ShearX" else [0.0, degrees]
        return TF.affine(
            x, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
            interpolation=interpolation, fill=None, center=[0, 0],
        )  # fmt: skip
    if op in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if op == "TranslateX" else [0, int(magnitude)]
        return TF.affine(
            x, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0],
            interpolation=interpolation, fill=None,
        )  # fmt: skip
    if op == "Rotate":
        return TF.rotate(x, angle=magnitude, interpolation=interpolation, fill=None)
    if op == "Brightness":
        return TF.adjust_brightness(x, brightness_factor=1.0 + magnitude)
    if op == "Color":
        return TF.adjust_saturation(x, saturation_factor=1.0 + magnitude)
    if op == "Contrast":
        return TF.adjust_contrast(x, contrast_factor=1.0 + magnitude)
    if op == "Sharpness":
        return TF.adjust_sharpness(x, sharpness_factor=1.0 + magnitude)
    if op == "Posterize":
        return TF.posterize(x, bits=int(magnitude))
    if op == "Solarize":
        return TF.solarize(x, threshold=255.0 * magnitude)
    if op == "AutoContrast":
        return TF.autocontrast(x)
    if op == "Equalize":
        return TF.equalize(x)
    raise ValueError(f"unknown operation {op!r}; valid: {', '.join(OPS)}")


def auto_augment(
    x: Tensor, choice: AugmentChoice, policy: str, *, interpolation="bilinear"
) -> Tensor:
    """Apply each image's operations of ``choice`` to a uint8 batch, one call per group.

    For each of the ``K`` rounds the batch is sorted by ``(op, bin, sign)`` (on the CPU, where
    ``choice`` lives: no device synchronization), every run of equal keys goes through
    :func:`apply_op` once as a contiguous slice, and the batch is put back in its order.

    Args:
        x: uint8 ``(N, C, H, W)`` on any device.
        choice: :func:`draw_auto_augment` for these ``N`` images (CPU tensors).
        policy: the policy that drew ``choice`` (it sets the magnitudes).
        interpolation: of the geometric operations.
    """
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    if len(choice) != len(x):
        raise ValueError(f"{len(choice)} choices for {len(x)} images")
    table = magnitude_table(policy, x.shape[-2], x.shape[-1])
    for k in range(choice.ops.shape[1]):
        ops, bins, neg = choice.ops[:, k], choice.bins[:, k], choice.negative[:, k]
        key = (ops * NUM_MAGNITUDE_BINS + bins) * 2 + neg.long()  # (N,)
        key, perm = key.sort(stable=True)
        codes, counts = torch.unique_consecutive(key, return_counts=True)
        if codes.tolist() == [0]:  # all Identity
            continue
        inverse = perm.argsort()
        grouped = x.index_select(0, perm.to(x.device))  # (N, C, H, W), equal keys contiguous
        parts, start = [], 0
        for code, count in zip(codes.tolist(), counts.tolist()):
            rest, sign = divmod(code, 2)
            op, b = divmod(rest, NUM_MAGNITUDE_BINS)
            magnitude = float(table[op, b]) * (-1.0 if sign else 1.0)
            group = grouped[start : start + count]
            parts.append(apply_op(group, OPS[op], magnitude, interpolation))
            start += count
        x = torch.cat(parts).index_select(0, inverse.to(x.device))  # back in batch order
    return x


def draw_erase_boxes(
    n: int,
    height: int,
    width: int,
    prob: float,
    generator: torch.Generator,
    *,
    scale: tuple[float, float] = ERASE_SCALE,
    ratio: tuple[float, float] = ERASE_RATIO,
    attempts: int = 10,
) -> Tensor:
    """Random-erasing rectangles of ``n`` images of ``height x width``, drawn as torchvision does.

    Per image, as ``torchvision.transforms.RandomErasing``: erased with chance ``prob``; up to
    ``attempts`` tries of an area ``uniform(scale) * H * W`` and an aspect ratio
    ``exp(uniform(log ratio))``, sides ``round(sqrt(area * ratio))`` x ``round(sqrt(area /
    ratio))``; the first that fits strictly inside the image is placed at a uniform position;
    none fitting erases nothing. All images' draws at once: a fixed number of draws from
    ``generator`` whatever they give.

    Returns:
        int64 ``(n, 4)``: ``(top, left, box height, box width)``; all zero where nothing is erased.
    """
    check_prob(prob)
    f64 = torch.float64
    erased = torch.rand(n, generator=generator, dtype=f64) < prob
    u_area = torch.rand(n, attempts, generator=generator, dtype=f64)
    u_ratio = torch.rand(n, attempts, generator=generator, dtype=f64)
    u_pos = torch.rand(n, 2, generator=generator, dtype=f64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u_area)  # (n, attempts)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u_ratio)
    bh = torch.sqrt(area * aspect).round().long()
    bw = torch.sqrt(area / aspect).round().long()
    fits = (bh < height) & (bw < width)
    first = fits.long().argmax(1, keepdim=True)  # the first attempt that fits (n, 1)
    bh, bw = bh.gather(1, first)[:, 0], bw.gather(1, first)[:, 0]
    erased &= fits.any(1)
    top = (u_pos[:, 0] * (height - bh + 1)).floor().long()  # uniform in [0, height - bh]
    left = (u_pos[:, 1] * (width - bw + 1)).floor().long()
    boxes = torch.stack([top, left, bh, bw], 1)
    return torch.where(erased[:, None], boxes, 0)


def erase(x: Tensor, boxes: Tensor, value: float = 0.0) -> Tensor:
    """Set the rectangle ``boxes[i]`` of every image ``x[i]`` (all channels) to ``value``.

    Args:
        x: ``(N, C, H, W)``.
        boxes: ``(N, 4)`` ``(top, left, height, width)`` (:func:`draw_erase_boxes`); an empty
            box leaves its image alone.
        value: the erased pixels' value.
    """
    n, _, h, w = x.shape
    top, left, bh, bw = boxes.to(x.device).unbind(1)  # (N,) each
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + bh)[:, None])  # (N, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + bw)[:, None])  # (N, W)
    mask = in_rows[:, :, None] & in_cols[:, None, :]  # (N, H, W)
    return x.masked_fill(mask[:, None], value)


def torchvision_erase_box(img: Tensor, prob: float) -> Tensor:
    """The rectangle torchvision's ``RandomErasing(p=prob)`` would erase in ``img``.

    Draws from torch's global generator exactly as ``RandomErasing.forward`` does (its
    ``get_params``), so that in a pipeline seeded per sample it is the recipe's draw; the
    rectangle is then erased later, on the device, after normalization (:func:`erase`).

    Returns:
        int64 ``(4,)``: ``(top, left, height, width)``; zeros when nothing is erased.
    """
    from torchvision import transforms as T

    if torch.rand(1) < prob:
        h_img, w_img = img.shape[-2:]
        i, j, h, w, _ = T.RandomErasing.get_params(
            img, scale=ERASE_SCALE, ratio=ERASE_RATIO, value=[0.0]
        )
        if (h, w) != (h_img, w_img):  # (0, 0, H, W, img) is its "nothing fits": no change
            return torch.tensor([i, j, h, w], dtype=torch.long)
    return torch.zeros(4, dtype=torch.long)
