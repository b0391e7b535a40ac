"""Test helper: a checkpoint of a model as ``dyshuffle train`` would write it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dyshuffle.train.checkpoint import save_checkpoint


def checkpoint_of(model: torch.nn.Module, path: str | Path, **extra: Any) -> Path:
    """Save ``model`` with the keys every checkpoint has (ten classes ``"0"`` .. ``"9"``, 3 x 32 x
    32 inputs, mean 0.5, std 0.25, epoch 1, unless ``extra`` says otherwise); returns the path."""
    state = {
        "model": model.state_dict(),
        "model_args": dict(model.model_args),
        "class_names": [str(i) for i in range(10)],
        "input_size": [3, 32, 32],
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "epoch": 1,
        "config": {},
        **extra,
    }
    return save_checkpoint(path, state)
