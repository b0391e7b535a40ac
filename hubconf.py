"""``torch.hub`` entry points of dyshuffle (the models of :func:`dyshuffle.models.list_models`,
and ``checkpoint`` for a model trained with ``dyshuffle train``).

    model = torch.hub.load("OWNER/dyshuffle", "shufflenet_v2_x1_0", mixer="dynamic",
                           num_classes=10, stem="cifar")
    model = torch.hub.load("OWNER/dyshuffle", "checkpoint", path="runs/NAME/best.pt")

``torch.hub.load(FOLDER, ..., source="local")`` takes a checkout. The package is imported from
this checkout's ``src`` unless the process has already imported ``dyshuffle``.
"""

from __future__ import annotations

import os as _os
import sys as _sys
from typing import Any as _Any

dependencies = ["torch"]

_SRC = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "src")
if _SRC not in _sys.path:
    _sys.path.insert(0, _SRC)

from dyshuffle.models import create_model as _create_model  # noqa: E402
from dyshuffle.models import list_models as _list_models  # noqa: E402


def _entrypoint(name: str):
    def build(pretrained: bool = False, **kwargs: _Any):
        if pretrained:
            raise ValueError(
                f"dyshuffle has no published weights for {name!r}; pass pretrained=False, or load "
                "a model you trained with the 'checkpoint' entry point"
            )
        return _create_model(name, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"{name}, randomly initialized: ``create_model({name!r}, **kwargs)`` (``num_classes``, "
        "``stem``, ``mixer``, ``pointwise``, ``in_chans``, ``features_only``, ... as there)."
    )
    return build


for _name in _list_models():
    globals()[_name] = _entrypoint(_name)


def checkpoint(path: str, weights: str = "auto", **kwargs: _Any):
    """The model of a ``dyshuffle train`` checkpoint, in ``eval()`` mode.

    Args:
        path: a checkpoint file, a run folder (its ``last.pt``), or a URL, downloaded once into
            ``torch.hub.get_dir()/checkpoints`` (``kwargs`` go to
            :func:`torch.hub.download_url_to_file`, e.g. ``hash_prefix``).
        weights: ``"auto"`` (the weights the run evaluated), ``"model"`` or ``"ema"``.
    """
    import torch

    from dyshuffle.train.checkpoint import load_model

    if "://" in path:
        folder = _os.path.join(torch.hub.get_dir(), "checkpoints")
        _os.makedirs(folder, exist_ok=True)
        local = _os.path.join(folder, _os.path.basename(path.split("?")[0]) or "checkpoint.pt")
        if not _os.path.isfile(local):
            torch.hub.download_url_to_file(path, local, **kwargs)
        path = local
    elif kwargs:
        raise TypeError(f"unexpected arguments {sorted(kwargs)} for a local checkpoint {path!r}")
    return load_model(path, weights)[0]
