"""Argument and input checks shared by the layers."""

from __future__ import annotations

import math
import numbers
import operator

from torch import Tensor

MODES = ("soft", "ste")
INITS = ("identity", "random")
#: how the STE backward contracts the factor gradients (see ``DynamicShuffle``)
FACTOR_GRADS = ("auto", "pixels", "channels")


def check_input(x: Tensor, channels: int, name: str) -> None:
    """Raise ``ValueError`` unless ``x`` is ``(N, channels, H, W)``."""
    if x.dim() != 4:
        raise ValueError(f"{name} expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(
            f"{name} was built for {channels} channels, got input with {x.shape[1]} "
            f"(shape {tuple(x.shape)})"
        )


def check_choice(value: str, valid: tuple[str, ...], what: str) -> str:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(map(repr, valid))}")
    return value


def check_positive(value: float, what: str) -> float:
    """``value`` when it is a positive finite number; else raise naming it."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (real and value > 0 and math.isfinite(value)):
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    return value


def integer(value: object) -> int | None:
    """``value`` as a Python ``int`` when it is an integer (NumPy's too; not a ``bool``), else
    ``None``."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_positive_int(value: object, what: str) -> int:
    """``value`` as an ``int`` when it is a positive integer; else raise naming it."""
    n = integer(value)
    if n is None or n < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return n


def check_flag(value: object, what: str) -> bool:
    """``value`` as a ``bool``; anything but ``True``/``False`` (or 1/0) raises naming it (the
    string ``"false"`` is no flag: ``bool("false")`` would be ``True``)."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"{what} must be True or False, got {value!r}")
