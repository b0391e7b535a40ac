"""One entry point for every data set: :func:`load_data` returns arrays or file lists."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from .._progress import progress_bar
from .common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ArrayData,
    DatasetError,
    FileData,
    default_cache_dir,
)
from .decode import cache_key, decode_images, load_array_cache, save_array_cache
from .folder import archive_key, extract_once, is_archive, list_folder, parse_layout, read_archive
from .formats import imagenet_samples, read_cifar, read_digits, tiny_imagenet_samples

__all__ = ["DATASETS", "LOADERS", "channel_stats", "list_datasets", "load_data", "resolve_loader"]

#: name -> (needs a --data-dir, default loader)
DATASETS: dict[str, tuple[bool, str]] = {
    "digits": (False, "memory"),
    "cifar10": (True, "memory"),
    "cifar100": (True, "memory"),
    "tiny-imagenet": (True, "memory"),
    "imagenet": (True, "workers"),
    "imagefolder": (True, "auto"),
}
LOADERS = ("auto", "memory", "workers")
#: image folders above this size (bytes of image files) use the multi-worker loader under "auto"
MEMORY_LIMIT_BYTES = 2 << 30


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_data`."""
    return list(DATASETS)


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``(N, C, H, W)`` images, as fractions of 255."""
    c = images.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, images.shape[0], chunk):
        x = images[i : i + chunk].to(torch.float64).div_(255.0).transpose(0, 1).reshape(c, -1)
        s += x.sum(1)
        s2 += x.square().sum(1)
    n = images.numel() / c
    mean = s / n
    std = (s2 / n - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def _source_bytes(root: Path) -> int:
    if root.is_file():
        return root.stat().st_size
    return list_folder(root)[1][1]


def resolve_loader(name: str, root: str | os.PathLike | None, loader: str = "auto") -> str:
    """``"memory"`` or ``"workers"`` for data set ``name`` under the requested ``loader``."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; valid: {', '.join(LOADERS)}")
    default = DATASETS[name][1]
    if name in ("digits", "cifar10", "cifar100") and loader == "workers":
        raise ValueError(
            f"loader='workers' reads image files; {name} is served from memory (use 'memory')"
        )
    if loader != "auto":
        return loader
    if default != "auto":
        return default
    return "memory" if _source_bytes(Path(root)) <= MEMORY_LIMIT_BYTES else "workers"


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(msg, file=sys.stderr, flush=True)


def _cached_decode(
    key: str,
    cache_dir: Path,
    make: callable,  # () -> (train_sources, train_names, train_labels, val_..., classes, extra)
    image_size: int | None,
    workers: int,
    verbose: bool,
    progress: bool,
) -> tuple[dict[str, Tensor], dict]:
    folder = cache_dir / "arrays" / key
    hit = load_array_cache(folder)
    if hit is not None:
        _log(f"data: decoded arrays from cache {folder}", verbose)
        return hit
    tr_src, tr_names, tr_y, va_src, va_names, va_y, classes, extra = make()
    _log(f"data: decoding {len(tr_src) + len(va_src)} images once (cache: {folder})", verbose)
    total = len(tr_src) + len(va_src)
    with progress_bar(total, "decode images", enabled=progress, unit="img") as bar:
        xtr = decode_images(tr_src, tr_names, image_size, workers, progress=bar.update)
        xva = decode_images(va_src, va_names, xtr.shape[-1], workers, progress=bar.update)
    arrays = {
        "train_images": xtr,
        "train_labels": torch.tensor(tr_y, dtype=torch.int64),
        "val_images": xva,
        "val_labels": torch.tensor(va_y, dtype=torch.int64),
    }
    meta = {"class_names": classes, **extra}
    save_array_cache(folder, arrays, meta)
    return arrays, meta


def load_data(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    loader: str = "auto",
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    train_split: str = "auto",
    val_split: str = "auto",
    val_fraction: float = 0.1,
    image_size: int | None = None,
    workers: int = 4,
    verbose: bool = False,
    progress: bool | None = None,
) -> ArrayData | FileData:
    """Load a data set by name.

    Args:
        name: one of :func:`list_datasets`.
        root: its folder (or, for ``imagefolder``, a folder or a tar archive); unused by
            ``digits``.
        loader: ``"memory"`` decodes everything once into uint8 arrays (cached under
            ``cache_dir``), ``"workers"`` keeps image files for a multi-worker loader, ``"auto"``
            picks ``memory`` for small data sets.
        download: fetch CIFAR-10/100 with torchvision when missing.
        cache_dir: where decoded arrays and extracted archives go
            (default :func:`~dyshuffle.data.common.default_cache_dir`).
        train_split, val_split, val_fraction: image-folder split folders (see
            :func:`~dyshuffle.data.folder.parse_layout`).
        image_size: decode/resize images to this side (image folders and ImageNet; default: the
            first image's size for folders, 224 for ImageNet).
        workers: decoding threads.
        verbose: log what is read and cached to stderr.
        progress: progress bars of a first decode or extraction, on a terminal (default:
            ``verbose``).

    Returns:
        :class:`ArrayData` (memory) or :class:`FileData` (workers).

    Raises:
        DatasetError: missing or malformed data, naming the path and the expected layout.
        ValueError: an unknown name or loader, naming the valid ones.
    """
    progress = verbose if progress is None else progress
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be at least 1 (None: the default), got {image_size!r}")
    if name in DATASETS and DATASETS[name][0] and root is None:
        raise DatasetError(f"data set {name!r} needs --data-dir (its folder)")
    mode = resolve_loader(name, root, loader)
    root_path = Path(root).expanduser() if root is not None else None
    if (
        root_path is not None
        and not root_path.exists()
        and not (download and name.startswith("cifar"))
    ):
        raise DatasetError(f"{name}: data path {root_path} does not exist")
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()

    if name in ("digits", "cifar10", "cifar100"):  # small sets read whole into arrays
        if name == "digits":
            xtr, ytr, xva, yva, classes = read_digits()
            augment = dict(hflip=False, crop_padding=2)
            source = "sklearn.datasets.load_digits (8x8 -> 32x32)"
        else:
            xtr, ytr, xva, yva, classes = read_cifar(name, root_path, download)
            augment, source = dict(hflip=True, crop_padding=4), str(root_path)
        mean, std = channel_stats(xtr)
        return ArrayData(name, classes, xtr, ytr, xva, yva, mean, std, **augment, source=source)

    if name in ("tiny-imagenet", "imagenet"):
        reader = tiny_imagenet_samples if name == "tiny-imagenet" else imagenet_samples
        train, val, classes, wnids = reader(root_path)
        size = image_size or (64 if name == "tiny-imagenet" else 224)
        if mode == "workers":
            return FileData(
                name,
                classes,
                train,
                val,
                size,
                IMAGENET_MEAN,
                IMAGENET_STD,
                source=str(root_path),
                extra={"wnids": wnids},
            )
        # the labels and names come from text files (val_annotations.txt, words.txt, ...):
        # the key covers them as well as the image files
        _, fingerprint, _ = list_folder(root_path)
        labels = cache_key(train, val, classes)
        key = f"{name}-{cache_key(str(root_path.resolve()), fingerprint, labels, size)}"

        def make():
            return (
                [p for p, _ in train],
                [p for p, _ in train],
                [y for _, y in train],
                [p for p, _ in val],
                [p for p, _ in val],
                [y for _, y in val],
                classes,
                {"wnids": wnids},
            )

        arrays, meta = _cached_decode(key, cache, make, size, workers, verbose, progress)
        return _decoded_data(name, arrays, meta, root_path, {"wnids": meta.get("wnids", [])})

    # imagefolder: a folder or an archive of one
    split_args = (train_split, val_split, val_fraction)
    if is_archive(root_path):
        if mode == "workers":
            folder = extract_once(root_path, cache, progress=progress)
            _log(f"data: {root_path} extracted in {folder}", verbose)
            return _folder_files(name, folder, split_args, image_size, str(root_path))
        # "archive-2": hidden folders are skipped since version 2 of the archive reader
        src = ("archive-2", str(root_path.resolve()), archive_key(root_path))
        key = f"imagefolder-{cache_key(*src, image_size, split_args)}"

        def make():
            blobs, folders = read_archive(root_path)
            layout = parse_layout(sorted(blobs), str(root_path), *split_args, folders=folders)
            tr = [p for p, _ in layout.train]
            va = [p for p, _ in layout.val]
            return (
                [blobs[p] for p in tr],
                [f"{root_path}:{p}" for p in tr],
                [y for _, y in layout.train],
                [blobs[p] for p in va],
                [f"{root_path}:{p}" for p in va],
                [y for _, y in layout.val],
                layout.classes,
                {"train_dir": layout.train_dir, "val_dir": layout.val_dir},
            )
    else:
        if not root_path.is_dir():
            raise DatasetError(
                f"imagefolder: {root_path} is neither a folder nor a .tar/.tgz archive"
            )
        if mode == "workers":
            return _folder_files(name, root_path, split_args, image_size, str(root_path))
        paths, fingerprint, folders = list_folder(root_path)
        src = ("folder", str(root_path.resolve()), fingerprint)
        key = f"imagefolder-{cache_key(*src, image_size, split_args)}"

        def make():
            layout = parse_layout(paths, str(root_path), *split_args, folders=folders)
            tr = [str(root_path / p) for p, _ in layout.train]
            va = [str(root_path / p) for p, _ in layout.val]
            return (
                tr,
                tr,
                [y for _, y in layout.train],
                va,
                va,
                [y for _, y in layout.val],
                layout.classes,
                {"train_dir": layout.train_dir, "val_dir": layout.val_dir},
            )

    arrays, meta = _cached_decode(key, cache, make, image_size, workers, verbose, progress)
    extra = {k: meta.get(k) for k in ("train_dir", "val_dir")}
    return _decoded_data(name, arrays, meta, root_path, extra)


def _decoded_data(
    name: str, arrays: dict[str, Tensor], meta: dict, root: Path, extra: dict
) -> ArrayData:
    """Decoded images as :class:`ArrayData`: normalized by the training set's channel statistics,
    flipped and padded-cropped by an eighth of their size (at least one pixel) in training."""
    mean, std = channel_stats(arrays["train_images"])
    size = arrays["train_images"].shape[-1]
    return ArrayData(
        name,
        meta["class_names"],
        **arrays,
        mean=mean,
        std=std,
        hflip=True,
        crop_padding=max(1, size // 8),
        source=str(root),
        extra=extra,
    )


def _folder_files(
    name: str, folder: Path, split_args: tuple, image_size: int | None, source: str
) -> FileData:
    from .decode import open_image

    paths, _, folders = list_folder(folder)
    layout = parse_layout(paths, source, *split_args, folders=folders)
    train = [(str(folder / p), y) for p, y in layout.train]
    val = [(str(folder / p), y) for p, y in layout.val]
    size = image_size or min(open_image(train[0][0], train[0][0]).size)
    return FileData(
        name,
        layout.classes,
        train,
        val,
        size,
        IMAGENET_MEAN,
        IMAGENET_STD,
        source=source,
        extra={"train_dir": layout.train_dir, "val_dir": layout.val_dir},
    )
