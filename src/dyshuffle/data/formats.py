"""Readers of the supported data sets in their official on-disk formats.

=================  ===============================================================================
``digits``         scikit-learn's handwritten digits (ships with scikit-learn; no download):
                   1,797 8x8 images upsampled to 32x32 RGB, fixed stratified 1,437/360 split.
``cifar10``        ``ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``
``cifar100``       ``ROOT/cifar-100-python/{train,test,meta}`` (the 100 fine labels)
``tiny-imagenet``  ``ROOT/tiny-imagenet-200/{wnids.txt,words.txt,train/<wnid>/images/*.JPEG,
                   val/images/*.JPEG,val/val_annotations.txt}``
``imagenet``       ``ROOT/train/<wnid>/*.JPEG`` and ``ROOT/val/<wnid>/*.JPEG``
``imagefolder``    any class-folder tree or a ``.tar``/``.tgz`` of one (see :mod:`.folder`)
=================  ===============================================================================
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .common import DatasetError, is_image_file
from .folder import IMAGEFOLDER_LAYOUT, parse_layout

__all__ = [
    "CIFAR10_LAYOUT",
    "CIFAR100_LAYOUT",
    "IMAGENET_LAYOUT",
    "TINY_IMAGENET_LAYOUT",
    "imagenet_samples",
    "read_cifar",
    "read_digits",
    "tiny_imagenet_samples",
]

CIFAR10_LAYOUT = (
    "expected the official CIFAR-10 python version (pass --download to fetch it):\n"
    "  ROOT/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta"
)
CIFAR100_LAYOUT = (
    "expected the official CIFAR-100 python version (pass --download to fetch it):\n"
    "  ROOT/cifar-100-python/train, test, meta"
)
TINY_IMAGENET_LAYOUT = (
    "expected the official Tiny ImageNet layout:\n"
    "  ROOT/tiny-imagenet-200/wnids.txt, words.txt,\n"
    "  ROOT/tiny-imagenet-200/train/<wnid>/images/*.JPEG,\n"
    "  ROOT/tiny-imagenet-200/val/images/*.JPEG and val/val_annotations.txt"
)
IMAGENET_LAYOUT = (
    "expected ImageNet in class folders:\n"
    "  ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG\n"
    "  (the official validation images come in one folder: sort them into class folders first,\n"
    "  e.g. with the valprep.sh script of the PyTorch ImageNet example)"
)

_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "names_key": "label_names",
        "labels_key": "labels",
        "classes": 10,
        "layout": CIFAR10_LAYOUT,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "names_key": "fine_label_names",
        "labels_key": "fine_labels",
        "classes": 100,
        "layout": CIFAR100_LAYOUT,
    },
}


def read_digits() -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """scikit-learn's handwritten digits as 32x32 RGB uint8 images and a fixed stratified split.

    The 8x8 images (values 0..16) are scaled to 0..255, upsampled bilinearly to 32x32 and
    replicated to three channels. 360 test images (36 per class), ``random_state=0``.

    Returns:
        ``(train_images, train_labels, test_images, test_labels, class_names)``.
    """
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) * (255.0 / 16.0))[:, None]  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()  # (N, 3, 32, 32)
    y = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=360, stratify=digits.target, random_state=0
    )
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    names = [str(int(n)) for n in digits.target_names]
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx], names


def _find_cifar_dir(name: str, root: Path) -> Path | None:
    """``root/<folder>`` or ``root`` itself, whichever holds the meta file (``None``: neither)."""
    spec = _CIFAR[name]
    for cand in (root / spec["folder"], root):
        if (cand / spec["meta"]).is_file():
            return cand
    return None


def _cifar_dir(name: str, root: Path) -> Path:
    spec = _CIFAR[name]
    folder = _find_cifar_dir(name, root)
    if folder is not None:
        return folder
    raise DatasetError(f"{name}: no {spec['folder']}/{spec['meta']} in {root}\n{spec['layout']}")


def _unpickle(path: Path, layout: str) -> dict:
    if not path.is_file():
        raise DatasetError(f"missing file {path}\n{layout}")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
    except Exception as e:
        raise DatasetError(f"cannot read {path} (not a CIFAR python pickle): {e}\n{layout}") from e
    if not isinstance(d, dict):
        raise DatasetError(f"{path} holds a {type(d).__name__}, expected a dict\n{layout}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def download_cifar(name: str, root: Path) -> None:
    """Fetch the official archive with torchvision (which checks its MD5)."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    root.mkdir(parents=True, exist_ok=True)
    try:
        cls(str(root), train=True, download=True)
    except Exception as e:  # network errors come in many types
        raise DatasetError(f"{name}: download into {root} failed: {e}") from e


def read_cifar(
    name: str, root: str | os.PathLike, download: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """CIFAR-10 or CIFAR-100 from the official python pickles.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        root: the folder that holds ``cifar-10-batches-py`` / ``cifar-100-python`` (or that
            folder itself).
        download: fetch the files with torchvision when they are missing.

    Returns:
        ``(train_images, train_labels, test_images, test_labels, class_names)``, images uint8
        ``(N, 3, 32, 32)``.
    """
    if name not in _CIFAR:
        raise ValueError(f"unknown CIFAR variant {name!r}; valid: {', '.join(_CIFAR)}")
    spec, root = _CIFAR[name], Path(root)
    if download and _find_cifar_dir(name, root) is None:  # root may be the folder itself
        download_cifar(name, root)
    folder = _cifar_dir(name, root)
    meta = _unpickle(folder / spec["meta"], spec["layout"])
    names = meta.get(spec["names_key"])
    if not isinstance(names, list) or len(names) != spec["classes"]:
        raise DatasetError(
            f"{folder / spec['meta']}: expected {spec['classes']} names under "
            f"{spec['names_key']!r}, got {type(names).__name__}\n{spec['layout']}"
        )

    def split(files: list[str]) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for fname in files:
            path = folder / fname
            d = _unpickle(path, spec["layout"])
            data, labels = d.get("data"), d.get(spec["labels_key"])
            if data is None or labels is None:
                raise DatasetError(
                    f"{path}: missing 'data' or {spec['labels_key']!r} (keys: {sorted(d)})\n"
                    f"{spec['layout']}"
                )
            data = np.asarray(data)
            labels = np.asarray(labels, dtype=np.int64)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise DatasetError(
                    f"{path}: 'data' should be uint8 (N, 3072), got {data.dtype} {data.shape}"
                )
            if (
                labels.shape != (data.shape[0],)
                or labels.min() < 0
                or labels.max() >= spec["classes"]
            ):
                raise DatasetError(
                    f"{path}: {len(labels)} labels for {data.shape[0]} images, or labels outside "
                    f"0..{spec['classes'] - 1}"
                )
            xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32)))  # (N, C, H, W) per the format
            ys.append(torch.from_numpy(labels))
        return torch.cat(xs), torch.cat(ys)

    xtr, ytr = split(spec["train"])
    xte, yte = split(spec["test"])
    return xtr, ytr, xte, yte, [str(n) for n in names]


def _tiny_dir(root: Path) -> Path:
    for cand in (root, root / "tiny-imagenet-200"):
        if (cand / "wnids.txt").is_file():
            return cand
    raise DatasetError(
        f"tiny-imagenet: no wnids.txt in {root} or {root / 'tiny-imagenet-200'}\n"
        f"{TINY_IMAGENET_LAYOUT}"
    )


def tiny_imagenet_samples(
    root: str | os.PathLike,
) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str], list[str]]:
    """File lists of Tiny ImageNet's train and val splits.

    Labels index the sorted wnids; class names are the first synonym in ``words.txt`` (the wnid
    when ``words.txt`` is absent).

    Returns:
        ``(train_samples, val_samples, class_names, wnids)``.
    """
    base = _tiny_dir(Path(root))
    wnids = sorted({w.strip() for w in (base / "wnids.txt").read_text().split() if w.strip()})
    if not wnids:
        raise DatasetError(f"{base / 'wnids.txt'} lists no classes\n{TINY_IMAGENET_LAYOUT}")
    label = {w: i for i, w in enumerate(wnids)}
    words = {}
    if (base / "words.txt").is_file():
        for line in (base / "words.txt").read_text().splitlines():
            parts = line.split("\t", 1)
            if len(parts) == 2:
                words[parts[0].strip()] = parts[1].split(",")[0].strip()
    names = [words.get(w, w) for w in wnids]

    train = []
    for w in wnids:
        folder = base / "train" / w / "images"
        if not folder.is_dir():
            raise DatasetError(
                f"missing folder {folder} (class {w} of wnids.txt)\n{TINY_IMAGENET_LAYOUT}"
            )
        files = sorted(f for f in os.listdir(folder) if is_image_file(f))
        if not files:
            raise DatasetError(f"no images in {folder}\n{TINY_IMAGENET_LAYOUT}")
        train += [(str(folder / f), label[w]) for f in files]

    ann = base / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DatasetError(f"missing file {ann}\n{TINY_IMAGENET_LAYOUT}")
    val = []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1].strip() not in label:
            raise DatasetError(
                f"{ann}, line {n}: expected '<file>\\t<wnid>\\t...' with a wnid of wnids.txt, "
                f"got {line!r}"
            )
        path = base / "val" / "images" / parts[0].strip()
        if not path.is_file():
            raise DatasetError(f"{ann}, line {n}: image {path} does not exist")
        val.append((str(path), label[parts[1].strip()]))
    if not val:
        raise DatasetError(f"{ann} lists no images\n{TINY_IMAGENET_LAYOUT}")
    return train, val, names, wnids


def imagenet_samples(
    root: str | os.PathLike,
) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str], list[str]]:
    """File lists of ImageNet's ``train`` and ``val`` class folders.

    Class names come from ``LOC_synset_mapping.txt`` (Kaggle's copy) when present, else the
    folder names (wnids).

    Returns:
        ``(train_samples, val_samples, class_names, wnids)``.
    """
    from .folder import list_folder

    root = Path(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DatasetError(f"imagenet: missing folder {root / split}\n{IMAGENET_LAYOUT}")
    val_dir = root / "val"
    if any(is_image_file(f) for f in os.listdir(val_dir)):
        raise DatasetError(
            f"imagenet: {val_dir} holds images directly, not class folders\n{IMAGENET_LAYOUT}"
        )
    paths, _, folders = list_folder(root)
    paths = [p for p in paths if p.startswith(("train/", "val/"))]
    try:
        layout = parse_layout(paths, str(root), "train", "val", folders=folders)
    except DatasetError as e:
        raise DatasetError(f"{e}\n{IMAGENET_LAYOUT}") from e
    wnids = layout.classes
    names = list(wnids)
    mapping = root / "LOC_synset_mapping.txt"
    if mapping.is_file():
        words = dict(line.split(" ", 1) for line in mapping.read_text().splitlines() if " " in line)
        names = [words.get(w, w).split(",")[0].strip() for w in wnids]
    train = [(str(root / p), y) for p, y in layout.train]
    val = [(str(root / p), y) for p, y in layout.val]
    return train, val, names, wnids


__all__ += ["IMAGEFOLDER_LAYOUT", "download_cifar"]
