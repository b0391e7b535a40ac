"""Data sets and batch iterators for training and evaluation.

``load_data(name, root, ...)`` reads one of ``digits`` (embedded), ``cifar10``, ``cifar100``,
``tiny-imagenet``, ``imagenet`` or ``imagefolder`` in its official layout;
:class:`InMemoryLoader` serves small data sets from device memory with on-device augmentation and
:class:`FileLoader` large ones through a multi-worker ``DataLoader``; :func:`mix_batch` mixes a
training batch (mixup, CutMix).
"""

from .common import ArrayData, DatasetError, FileData, default_cache_dir, subset_indices
from .datasets import DATASETS, LOADERS, channel_stats, list_datasets, load_data, resolve_loader
from .folder import extract_once, parse_layout
from .loaders import (
    EVAL_CROP_FRACTION,
    EpochPlan,
    FileLoader,
    InMemoryLoader,
    mix_seed,
    normalize,
    random_crop,
)
from .mixing import BatchMix, mix_batch

__all__ = [
    "DATASETS",
    "EVAL_CROP_FRACTION",
    "LOADERS",
    "ArrayData",
    "BatchMix",
    "DatasetError",
    "EpochPlan",
    "FileData",
    "FileLoader",
    "InMemoryLoader",
    "channel_stats",
    "default_cache_dir",
    "extract_once",
    "list_datasets",
    "load_data",
    "mix_batch",
    "mix_seed",
    "normalize",
    "parse_layout",
    "random_crop",
    "resolve_loader",
    "subset_indices",
]
