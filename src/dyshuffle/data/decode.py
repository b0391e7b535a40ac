"""Decode image files into one uint8 tensor, and cache decoded arrays on disk."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .common import DatasetError

__all__ = [
    "cache_key",
    "decode_images",
    "load_array_cache",
    "open_image",
    "remove_stale_temp",
    "save_array_cache",
]

#: 2: 16-bit images scaled to 8 bits (version 1 clipped them at 255); 3: float images with values
#: in [0, 1] scaled by 255 (version 2 clipped them, nearly black)
CACHE_VERSION = 3
#: a temporary folder in which nothing changed for this long was left by a killed run
STALE_TEMP_AGE_S = 3600.0


def open_image(source: str | bytes, name: str, size: int | None = None) -> Image.Image:
    """Open and fully decode an RGB image; ``size`` resizes (shorter side) and center-crops.

    Grey, palette, alpha and CMYK images are converted by PIL (alpha dropped, as torchvision's
    ``ImageFolder`` does); 16-bit grey images (modes ``I;16*`` and ``I``) are scaled by 1/257 to
    8 bits, where PIL's conversion would clip them at 255. Float grey images (mode ``F``, e.g.
    32-bit TIFFs) with every value in [0, 1] (the range torchvision's ``to_tensor`` keeps floats
    in) are scaled by 255 and rounded, where PIL would clip them to black; other float images are
    clipped to 0..255 by PIL (values truncated, NaN as 0).

    Raises:
        DatasetError: naming ``name`` when the file cannot be decoded.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            if im.mode == "I" or im.mode.startswith("I;16"):
                grey = np.rint(np.asarray(im, dtype=np.float64) / 257.0).clip(0, 255)
                im = Image.fromarray(grey.astype(np.uint8))
            elif im.mode == "F":
                grey = np.nan_to_num(np.asarray(im, dtype=np.float64))  # NaN as 0, as PIL does
                if 0.0 <= grey.min() and grey.max() <= 1.0:
                    im = Image.fromarray(np.rint(grey * 255.0).astype(np.uint8))
            im = im.convert("RGB")  # decodes fully: a truncated file raises here
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise DatasetError(f"cannot decode image {name}: {e}") from e
    if size is not None and im.size != (size, size):
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return im


def decode_images(
    sources: Sequence[str | bytes],
    names: Sequence[str],
    size: int | None = None,
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Decode images into a uint8 ``(N, 3, S, S)`` tensor.

    Args:
        sources: file paths or encoded bytes.
        names: what to call each image in error messages (its path).
        size: side ``S``; by default the first image's shorter side (square images keep theirs).
        workers: decoding threads (PIL releases the GIL while decoding).
        progress: called with the number of images decoded after each chunk.
    """
    if not sources:
        raise DatasetError("no images to decode")
    if size is None:
        size = min(open_image(sources[0], names[0]).size)
    out = np.empty((len(sources), size, size, 3), dtype=np.uint8)  # (N, H, W, C)

    def work(start: int) -> int:
        stop = min(start + 512, len(sources))
        for i in range(start, stop):
            out[i] = np.asarray(open_image(sources[i], names[i], size))
        return stop - start

    starts = range(0, len(sources), 512)
    if workers > 1 and len(sources) > 512:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for n in pool.map(work, starts):
                if progress:
                    progress(n)
    else:
        for s in starts:
            n = work(s)
            if progress:
                progress(n)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)


def cache_key(*parts: object) -> str:
    """A short stable hash of ``parts`` (and the cache format version)."""
    return hashlib.sha1(repr((CACHE_VERSION, *parts)).encode()).hexdigest()[:16]


def load_array_cache(folder: Path) -> tuple[dict[str, Tensor], dict] | None:
    """Arrays and metadata saved by :func:`save_array_cache`, or ``None`` when absent or damaged."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        arrays = {k: torch.from_numpy(np.load(folder / f"{k}.npy")) for k in meta["arrays"]}
    except (OSError, ValueError, KeyError):
        return None
    return arrays, meta


def _changed_since(folder: Path, since: float) -> bool:
    for dirpath, _, filenames in os.walk(folder):  # a long extraction adds files deep down
        for p in (dirpath, *(os.path.join(dirpath, f) for f in filenames)):
            if os.lstat(p).st_mtime >= since:
                return True
    return False


def remove_stale_temp(parent: Path, prefix: str) -> None:
    """Remove the ``prefix*`` folders in ``parent`` left by killed runs: those in which no file
    or folder was modified for :data:`STALE_TEMP_AGE_S` (a running one writes into its own)."""
    since = time.time() - STALE_TEMP_AGE_S
    for tmp in parent.glob(f"{prefix}*"):
        try:
            if tmp.is_dir() and not _changed_since(tmp, since):
                shutil.rmtree(tmp)
        except OSError:  # renamed into place meanwhile, or not ours to remove
            pass


def save_array_cache(folder: Path, arrays: dict[str, Tensor], meta: dict) -> None:
    """Write arrays as ``.npy`` and ``meta.json`` into ``folder`` atomically (temp folder, rename).

    A cache that cannot be written (read-only disk, full disk) is skipped with a warning. The
    temporary folders of killed runs are removed (see :func:`remove_stale_temp`).
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(folder.parent, ".tmp-")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        for k, v in arrays.items():
            np.save(tmp / f"{k}.npy", v.numpy())
        (tmp / "meta.json").write_text(json.dumps({**meta, "arrays": list(arrays)}, indent=1))
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError as e:
        print(f"warning: could not write the data cache {folder}: {e}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
