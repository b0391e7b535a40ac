"""Training and evaluation: ``dyshuffle train`` / ``dyshuffle evaluate`` and their building blocks.

:mod:`.checkpoint` (atomic saves, ``model_from_checkpoint``) is imported lazily by the other tools;
this package never imports anything heavy at import time.
"""

from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

__all__ = ["load_checkpoint", "model_from_checkpoint", "save_checkpoint"]
