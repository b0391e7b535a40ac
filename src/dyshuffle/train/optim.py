"""Optimizers, per-step learning-rate schedules and the temperature schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["create_optimizer", "lr_factor", "param_groups", "tau_at"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with ``weight_decay``; norm weights, biases and other 1-d params without.

    Like timm's ``param_groups_weight_decay``: every parameter with fewer than two dimensions
    (BatchNorm/LayerNorm scales and shifts, biases) and every ``.bias`` skips weight decay.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def create_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = True,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum by default) or AdamW over :func:`param_groups`."""
    groups = param_groups(model, weight_decay)
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
