"""Types, errors and constants shared by the data readers and loaders."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .._constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ArrayData",
    "DatasetError",
    "FileData",
    "default_cache_dir",
    "is_image_file",
    "subset_indices",
]

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".ppm",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
)


class DatasetError(ValueError):
    """A data set is missing, malformed or unreadable; the message names the path and the layout."""


def is_image_file(name: str) -> bool:
    """True for a visible file name with an image extension (``._x.jpg`` macOS forks excluded)."""
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def default_cache_dir() -> Path:
    """``$DYSHUFFLE_CACHE``, else ``$XDG_CACHE_HOME/dyshuffle``, else ``~/.cache/dyshuffle``."""
    if os.environ.get("DYSHUFFLE_CACHE"):
        return Path(os.environ["DYSHUFFLE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dyshuffle"


@dataclass
class ArrayData:
    """A data set decoded into memory: uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)``.

    Attributes:
        name: data set name (``"cifar10"``, ...).
        class_names: one name per label.
        train_images, train_labels, val_images, val_labels: the two splits.
        mean, std: per-channel normalization (fractions of 255).
        hflip: whether horizontal flips are a valid augmentation (not for digits).
        crop_padding: padding of the random-crop augmentation, in pixels.
        source: where the data came from (shown in logs and results).
    """

    name: str
    class_names: list[str]
    train_images: Tensor
    train_labels: Tensor
    val_images: Tensor
    val_labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = True
    crop_padding: int = 4
    source: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("train", "val"):
            x, y = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(
                    f"{split}_images must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}"
                )
            if y.shape != (x.shape[0],):
                raise ValueError(f"{split}_labels shape {tuple(y.shape)} != ({x.shape[0]},)")

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class FileData:
    """A data set kept on disk as image files, read by a multi-worker loader.

    ``train_samples`` and ``val_samples`` are lists of ``(path, label)``.
    """

    name: str
    class_names: list[str]
    train_samples: list[tuple[str, int]]
    val_samples: list[tuple[str, int]]
    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    hflip: bool = True
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def subset_indices(
    n: int, keep: int, labels: Callable[[], Tensor] | None = None, seed: int = 0
) -> Tensor | None:
    """Sorted indices of ``keep`` of ``n`` samples of a fixed random order (``None``: all), the
    subsets of ``dyshuffle train --train-subset/--val-subset`` and ``dyshuffle inspect
    --max-samples`` (the same images for the same N).

    With ``labels`` (a function that gives the ``(n,)`` labels, called only when a subset is
    drawn) each class keeps its share of ``keep`` (``keep * n_c / n`` rounded by the largest
    remainder, ties to the lower class index): its first samples of the same order.
    """
    if keep <= 0 or keep >= n:
        return None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if labels is None:
        return order[:keep].sort().values
    _, cls, counts = torch.unique(labels()[order], return_inverse=True, return_counts=True)
    share = counts.double() * keep / n
    quota = share.floor().long()
    rest = (share - quota).tolist()
    by_remainder = sorted(range(len(counts)), key=lambda i: (-rest[i], i))
    quota[by_remainder[: keep - int(quota.sum())]] += 1
    # rank of each sample among its class's samples in the order; keep the first quota of each
    grouped = torch.argsort(cls, stable=True)
    rank = torch.empty_like(grouped)
    rank[grouped] = torch.arange(n) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    return order[rank < quota[cls]].sort().values
