"""Class-folder image trees, as a folder or as a ``.tar``/``.tgz``/``.tar.gz`` archive of one.

Layouts understood (any number of wrapper folders above them is skipped)::

    ROOT/train/<class>/**/<image>     ROOT/val/<class>/**/<image>   (or test/, validation/)
    ROOT/<class>/**/<image>           (no split folders: a validation part is held out)
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .._progress import progress_bar
from .common import DatasetError, is_image_file
from .decode import remove_stale_temp

__all__ = [
    "ARCHIVE_SUFFIXES",
    "IMAGEFOLDER_LAYOUT",
    "FolderLayout",
    "archive_key",
    "extract_once",
    "is_archive",
    "list_folder",
    "parse_layout",
    "read_archive",
]

ARCHIVE_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz")
TRAIN_NAMES = ("train", "training")
VAL_NAMES = ("val", "validation", "valid", "test")
IMAGEFOLDER_LAYOUT = (
    "expected a class-folder tree (a folder, or a .tar/.tgz/.tar.gz of one):\n"
    "  ROOT/train/<class>/<image>.jpg and ROOT/val/<class>/<image>.jpg (or test/), or\n"
    "  ROOT/<class>/<image>.jpg (then a validation part is held out)"
)


def is_archive(path: str | os.PathLike) -> bool:
    """True when ``path`` names a tar archive (by its suffix)."""
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def archive_key(path: str | os.PathLike) -> str:
    """A short key that changes when the archive's path, size or modification time changes."""
    p = Path(path).resolve()
    st = p.stat()
    return hashlib.sha1(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _archive_stem(path: str | os.PathLike) -> str:
    name = Path(path).name
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _open_tar(path: Path, stream: bool) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r|*" if stream else "r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetError(f"cannot read archive {path}: {e}\n{IMAGEFOLDER_LAYOUT}") from e


def _member_path(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def read_archive(path: str | os.PathLike) -> tuple[dict[str, bytes], list[str]]:
    """Bytes of every image file in a tar archive, keyed by member name, in one streaming pass.

    Returns:
        ``(images, folders)``: the bytes by member path (a hard link, which a tar stores for the
        second name of a file, gets its target's bytes) and the folder members' paths.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"archive {path} does not exist\n{IMAGEFOLDER_LAYOUT}")
    out: dict[str, bytes] = {}
    folders: list[str] = []
    tf = _open_tar(path, stream=True)
    try:
        for member in tf:
            name = _member_path(member.name)
            # hidden files and anything under a hidden folder (.ipynb_checkpoints/, .git/) are
            # skipped, as list_folder skips them in a folder
            if not name or any(p.startswith(".") for p in name.split("/")):
                continue
            if member.isdir():
                folders.append(name)
            elif is_image_file(name):
                if member.islnk():  # a stream cannot seek back: the target was read before
                    target = out.get(_member_path(member.linkname))
                    if target is not None:
                        out[name] = target
                elif member.isfile():
                    f = tf.extractfile(member)
                    if f is not None:
                        out[name] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetError(f"archive {path} is truncated or corrupt: {e}") from e
    finally:
        tf.close()
    return out, folders


def extract_once(
    path: str | os.PathLike, cache_dir: str | os.PathLike, progress: bool = False
) -> Path:
    """Extract an archive into ``cache_dir/extracted/<stem>-<key>`` unless already there.

    The key depends on the archive's path, size and modification time; extraction goes to a
    temporary folder renamed into place at the end, so an interrupted extraction is redone (its
    folder is removed once stale, see :func:`~dyshuffle.data.decode.remove_stale_temp`), and of
    two processes extracting at once the second keeps the first one's folder. ``progress``: a
    bar of the bytes extracted, on a terminal.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"archive {path} does not exist\n{IMAGEFOLDER_LAYOUT}")
    target = Path(cache_dir) / "extracted" / f"{_archive_stem(path)}-{archive_key(path)}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(target.parent, ".extract-")
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    try:
        tf = _open_tar(path, stream=False)
        bar = progress_bar(
            None, f"extract {path.name}", enabled=progress, unit="B", unit_scale=True
        )

        def members():  # read as extraction goes (no second pass over the archive for a total)
            for member in tf:
                yield member
                bar.update(member.size)

        with tf, bar:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, members=members(), filter="data")
            else:  # pragma: no cover - Python without extraction filters
                tf.extractall(tmp, members=members())  # noqa: S202
        os.replace(tmp, target)
    except (tarfile.TarError, OSError, EOFError) as e:
        if isinstance(e, OSError) and target.is_dir():  # another process renamed first
            return target
        raise DatasetError(f"cannot extract archive {path}: {e}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def list_folder(root: str | os.PathLike) -> tuple[list[str], tuple, list[str]]:
    """The image files and folders under ``root``, and a fingerprint of them.

    Returns:
        ``(paths, fingerprint, folders)``: relative POSIX paths of the image files, sorted as
        strings (the order :func:`read_archive`'s names sort in, so a folder and its archive
        split alike), ``(count, total bytes, newest mtime in ns, digest)`` where the digest
        covers every path, size and mtime (a moved or renamed image changes it), and the visible
        folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist\n{IMAGEFOLDER_LAYOUT}")
    files, folders = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else f"{Path(rel).as_posix()}/"
        folders += [prefix + d for d in dirnames]
        for name in filenames:
            if is_image_file(name):
                st = os.stat(os.path.join(dirpath, name))
                files.append((prefix + name, st.st_size, st.st_mtime_ns))
    files.sort()
    folders.sort()
    digest = hashlib.sha1(repr((files, folders)).encode()).hexdigest()[:16]
    total = sum(f[1] for f in files)
    newest = max((f[2] for f in files), default=0)
    return [f[0] for f in files], (len(files), total, newest, digest), folders


@dataclass
class FolderLayout:
    """Where the splits and classes of an image tree are.

    Attributes:
        classes: sorted class folder names; the label of a class is its index.
        train: ``(relative path, label)`` of the training images.
        val: ``(relative path, label)`` of the validation images.
        train_dir, val_dir: the split folders found (``None`` when held out).
    """

    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    train_dir: str | None
    val_dir: str | None


def _tree(paths: list[str]) -> tuple[dict[str, set[str]], dict[str, int]]:
    children: dict[str, set[str]] = {}
    files: dict[str, int] = {}
    for p in paths:
        parts = p.split("/")
        for i in range(len(parts) - 1):
            parent = "/".join(parts[:i])
            children.setdefault(parent, set()).add(parts[i])
        parent = "/".join(parts[:-1])
        files[parent] = files.get(parent, 0) + 1
    return children, files


def _join(a: str, b: str) -> str:
    if not b:
        return a
    return f"{a}/{b}" if a else b


def _class_items(
    paths: list[str], split_dir: str, root: str
) -> tuple[list[str], list[tuple[str, str]]]:
    prefix = f"{split_dir}/" if split_dir else ""
    items, names = [], set()
    for p in paths:
        if not p.startswith(prefix):
            continue
        rest = p[len(prefix) :]
        if "/" not in rest:
            where = _join(root, split_dir) if split_dir else root
            raise DatasetError(
                f"image {_join(root, p)} lies directly in {where}, not in a class folder\n"
                f"{IMAGEFOLDER_LAYOUT}"
            )
        cls = rest.split("/", 1)[0]
        names.add(cls)
        items.append((p, cls))
    return sorted(names), items


def parse_layout(
    paths: list[str],
    root: str,
    train_split: str = "auto",
    val_split: str = "auto",
    val_fraction: float = 0.1,
    seed: int = 0,
    folders: Sequence[str] = (),
) -> FolderLayout:
    """Find the splits and classes of an image tree from its file paths.

    Args:
        paths: relative POSIX paths of the image files.
        root: the folder or archive, for messages.
        train_split: training folder name, or ``"auto"`` (``train``/``training``).
        val_split: validation folder name, ``"auto"`` (``val``/``validation``/``valid``/``test``),
            or ``"none"`` to hold out ``val_fraction`` of every training class.
        val_fraction: fraction of each class held out when there is no validation folder.
        seed: seed of the held-out choice.
        folders: relative POSIX paths of the tree's folders: a class folder among them without
            images is an error (it would shift the labels of the classes after it).

    Raises:
        DatasetError: no images, images outside class folders, a named split folder missing, a
            training class folder without images, or validation classes that the training split
            lacks.
    """
    if not paths:
        raise DatasetError(f"no image files found in {root}\n{IMAGEFOLDER_LAYOUT}")
    children, files = _tree(paths)
    train_names = TRAIN_NAMES if train_split == "auto" else (train_split,)
    val_names = VAL_NAMES if val_split in ("auto", "none") else (val_split,)

    prefix = ""
    while True:  # skip wrapper folders: one sub-folder, no images, sub-folders below it
        kids = children.get(prefix, set())
        if kids & set(train_names):
            break
        if len(kids) == 1 and not files.get(prefix):
            only = _join(prefix, next(iter(kids)))
            if children.get(only) and not files.get(only):
                prefix = only
                continue
        break
    kids = children.get(prefix, set())
    train_dir = next((_join(prefix, n) for n in train_names if n in kids), None)
    val_dir = None
    if train_dir is None:
        if train_split != "auto" or val_split not in ("auto", "none"):
            raise DatasetError(
                f"no training folder {train_split!r} in {_join(root, prefix)} "
                f"(found: {', '.join(sorted(kids)) or 'nothing'})\n{IMAGEFOLDER_LAYOUT}"
            )
    elif val_split != "none":
        val_dir = next((_join(prefix, n) for n in val_names if n in kids), None)
        if val_dir is None and val_split != "auto":
            raise DatasetError(
                f"no validation folder {val_split!r} in {_join(root, prefix)} "
                f"(found: {', '.join(sorted(kids))})\n{IMAGEFOLDER_LAYOUT}"
            )

    classes, train_items = _class_items(paths, train_dir or prefix, root)
    if not train_items:
        raise DatasetError(
            f"no training images in {_join(root, train_dir or prefix)}\n{IMAGEFOLDER_LAYOUT}"
        )
    class_dir = train_dir or prefix
    empty = sorted(
        f
        for f in folders
        if f.rpartition("/")[0] == class_dir and f.rpartition("/")[2] not in classes
    )
    if empty:
        raise DatasetError(
            f"class folder {_join(root, empty[0])} holds no images"
            + (f" (nor {len(empty) - 1} more)" if len(empty) > 1 else "")
            + "; remove it or add its images"
        )
    label = {c: i for i, c in enumerate(classes)}
    if val_dir is not None:
        val_classes, val_items = _class_items(paths, val_dir, root)
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise DatasetError(
                f"validation classes {unknown} of {_join(root, val_dir)} have no training folder "
                f"in {_join(root, train_dir or prefix)}"
            )
        train = [(p, label[c]) for p, c in train_items]
        val = [(p, label[c]) for p, c in val_items]
        return FolderLayout(classes, train, val, train_dir, val_dir)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    # hold out ceil(fraction * n) images of every class with at least two images
    by_class: dict[int, list[str]] = {}
    for p, c in train_items:
        by_class.setdefault(label[c], []).append(p)
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for y in sorted(by_class):
        items = by_class[y]
        n_val = math.ceil(val_fraction * len(items)) if len(items) > 1 else 0
        held = set(torch.randperm(len(items), generator=g)[:n_val].tolist())
        for i, p in enumerate(items):
            (val if i in held else train).append((p, y))
    return FolderLayout(classes, train, val, train_dir, None)
