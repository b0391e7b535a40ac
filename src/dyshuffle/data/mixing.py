"""Mixup and CutMix of a training batch: one weight per batch (timm's ``Mixup`` in its ``batch``
mode), each image paired with the one before it (torchvision's ``v2.MixUp``/``v2.CutMix``).

Mixup (Zhang et al., 2018) replaces a batch by ``lam * x + (1 - lam) * x'``, CutMix (Yun et al.,
2019) pastes a rectangle of ``x'`` into ``x``; in both, ``x'`` is the batch rolled by one sample
and the loss is ``lam * loss(out, y) + (1 - lam) * loss(out, y')``: with label smoothing the
cross-entropy is linear in its target, so that is the cross-entropy against the mixed soft
labels. One ``lam`` per batch, drawn from ``Beta(alpha, alpha)``; for CutMix it is then set to
the fraction of pixels that stayed ``x`` (the rectangle is clipped at the border).

The draws come from a generator the caller seeds (the training loop seeds it with the run's seed,
the epoch, the step and the rank), so a resumed run mixes its batches as the uninterrupted one.
Mixing normalized images is mixing the images: normalization is affine per channel, and both
mixes are weighted averages or selections of pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .augment import check_prob

__all__ = ["BatchMix", "mix_batch"]


@dataclass(frozen=True)
class BatchMix:
    """What :func:`mix_batch` did: ``kind`` (``"none"``, ``"mixup"``, ``"cutmix"``), the weight
    ``lam`` of the batch's own labels, the partners' labels ``y_b`` (``None`` when not mixed)
    and, for CutMix, the pasted rectangle ``(top, bottom, left, right)``."""

    kind: str
    lam: float
    y_b: Tensor | None
    box: tuple[int, int, int, int] | None = None


def _check_alpha(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0 (0: off), got {value!r}")


def mix_batch(
    x: Tensor,
    y: Tensor,
    generator: torch.Generator,
    *,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    prob: float = 1.0,
) -> tuple[Tensor, BatchMix]:
    """Mixup or CutMix of one batch.

    Args:
        x: images ``(N, C, H, W)`` (any memory format; the result keeps it).
        y: class indices ``(N,)``.
        generator: a CPU generator for the draws (whether to mix, which mix, ``lam``, the box).
        mixup: ``alpha`` of mixup's ``Beta(alpha, alpha)`` (0: no mixup).
        cutmix: ``alpha`` of CutMix's ``Beta(alpha, alpha)`` (0: no CutMix). With both on, each
            mixed batch takes one of them with equal chance.
        prob: chance that a batch is mixed at all.

    Returns:
        ``(mixed images, BatchMix)``; ``x`` itself and ``kind="none"``, ``lam=1`` when the batch
        is left alone (both off, the draw said no, or fewer than two samples).
    """
    _check_alpha("mixup", mixup)
    _check_alpha("cutmix", cutmix)
    check_prob(prob)
    if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"expected images (N, C, H, W) and labels (N,), got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    kinds = [k for k, a in (("mixup", mixup), ("cutmix", cutmix)) if a > 0]
    u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
    if not kinds or x.shape[0] < 2 or u[0] >= prob:
        return x, BatchMix("none", 1.0, None)
    kind = kinds[0] if len(kinds) == 1 else kinds[int(u[1] * 2)]
    alpha = mixup if kind == "mixup" else cutmix
    lam = float(_beta(alpha, generator))
    x_b, y_b = x.roll(1, 0), y.roll(1, 0)
    if kind == "mixup":
        return x.lerp(x_b, 1.0 - lam), BatchMix(kind, lam, y_b)
    h, w = x.shape[-2:]
    top, bottom, left, right = _box(h, w, lam, generator)
    out = x.clone()
    out[..., top:bottom, left:right] = x_b[..., top:bottom, left:right]
    lam = 1.0 - (bottom - top) * (right - left) / (h * w)
    return out, BatchMix(kind, lam, y_b, (top, bottom, left, right))


def _beta(alpha: float, generator: torch.Generator) -> float:
    """A draw of ``Beta(alpha, alpha)`` as ``g1 / (g1 + g2)`` of two Gamma draws."""
    g = torch._standard_gamma(torch.full((2,), alpha, dtype=torch.float64), generator=generator)
    total = float(g.sum())
    return 0.5 if total == 0 else float(g[0]) / total


def _box(h: int, w: int, lam: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """A rectangle of about ``(1 - lam)`` of the image around a uniform center, clipped."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = round(h * ratio), round(w * ratio)
    u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
    cy, cx = int(u[0] * h), int(u[1] * w)
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, w)
    return top, bottom, left, right
