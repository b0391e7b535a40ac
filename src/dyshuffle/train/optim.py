"""Optimizers, per-step learning-rate schedules and the temperature schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["create_optimizer", "lr_factor", "param_groups", "tau_at"]


def param_groups(
    model: nn.Module,
    weight_decay: float,
    dynamic_lr_scale: float = 1.0,
    dynamic_weight_decay: float | None = None,
) -> list[dict]:
    """Weights with ``weight_decay``; norm weights, biases and other 1-d params without.

    Like timm's ``param_groups_weight_decay``: every parameter with fewer than two dimensions
    (BatchNorm/LayerNorm scales and shifts, biases) and every ``.bias`` skips weight decay.

    With ``dynamic_lr_scale != 1`` or a ``dynamic_weight_decay``, the parameters of the dynamic
    layers (:class:`~dyshuffle.layers.DynamicShuffle` and its subclasses: their generators, a
    learned permutation's logits) come in groups of their own, with ``lr_scale`` (times the
    optimizer's learning rate) and that weight decay (``None``: ``weight_decay``) on their
    matrices; otherwise, and for a model without dynamic layers, the two groups above. Each
    group has an ``lr_scale`` (1 for the rest).
    """
    from dyshuffle.layers import DynamicShuffle

    apart = dynamic_lr_scale != 1.0 or dynamic_weight_decay is not None
    dynamic = set()
    if apart:
        layers = (m for m in model.modules() if isinstance(m, DynamicShuffle))
        dynamic = {id(p) for m in layers for p in m.parameters()}
    own = weight_decay if dynamic_weight_decay is None else dynamic_weight_decay
    groups = {  # (dynamic, decayed) -> group
        (False, True): {"params": [], "weight_decay": weight_decay, "lr_scale": 1.0},
        (False, False): {"params": [], "weight_decay": 0.0, "lr_scale": 1.0},
        (True, True): {"params": [], "weight_decay": own, "lr_scale": dynamic_lr_scale},
        (True, False): {"params": [], "weight_decay": 0.0, "lr_scale": dynamic_lr_scale},
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decayed = not (p.ndim <= 1 or name.endswith(".bias"))
        groups[id(p) in dynamic, decayed]["params"].append(p)
    rest = [groups[False, True], groups[False, False]]
    return rest + [g for g in (groups[True, True], groups[True, False]) if g["params"]]


def create_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = True,
    betas: tuple[float, float] = (0.9, 0.999),
    dynamic_lr_scale: float = 1.0,
    dynamic_weight_decay: float | None = None,
) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum by default) or AdamW over :func:`param_groups`, each group's
    learning rate ``lr`` times its ``lr_scale``."""
    groups = param_groups(model, weight_decay, dynamic_lr_scale, dynamic_weight_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    raise ValueError(f"unknown optimizer {name!r}; valid: 'sgd', 'adamw'")


def lr_factor(
    step: int,
    total: int,
    schedule: str,
    warmup: int = 0,
    onecycle_pct: float = 0.25,
    min_ratio: float = 0.0,
) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total`` steps.

    * ``cosine``: linear warm-up over ``warmup`` steps, then half a cosine down to ``min_ratio``.
    * ``linear``: linear warm-up, then a straight line down to ``min_ratio``.
    * ``constant``: linear warm-up, then 1.
    * ``onecycle``: the triangular one-cycle of fast CIFAR training (airbench): a straight rise
      from ``min_ratio`` (at least 0.05) to 1 over the first ``onecycle_pct`` of the steps
      (or ``warmup`` steps when that is longer), then a straight fall to ``min_ratio``.
    """
    if total <= 0:
        return 1.0
    t = min(max(step, 0), total)
    if schedule == "onecycle":
        rise = max(warmup, round(onecycle_pct * total), 1)
        low = max(min_ratio, 0.05)
        if t < rise:
            return low + (1.0 - low) * t / rise
        return min_ratio + (1.0 - min_ratio) * max(total - t, 0) / max(total - rise, 1)
    if warmup > 0 and t < warmup:
        return (t + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    p = (t - warmup) / max(total - warmup, 1)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - p)
    raise ValueError(
        f"unknown schedule {schedule!r}; valid: 'cosine', 'onecycle', 'linear', 'constant'"
    )


def tau_at(step: int, total: int, start: float, end: float, schedule: str = "exp") -> float:
    """Temperature at ``step`` of ``total``: ``start`` -> ``end`` geometrically (``exp``),
    linearly, or along half a cosine."""
    p = min(max(step / max(total - 1, 1), 0.0), 1.0)
    if schedule == "exp":
        return start * (end / start) ** p
    if schedule == "linear":
        return start + (end - start) * p
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown tau_schedule {schedule!r}; valid: 'exp', 'linear', 'cosine'")
