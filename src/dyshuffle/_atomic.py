"""Atomic file writes for the tools (run folders, records, reports, figures, benchmark CSVs).

The bytes go to a temporary file ``.NAME.XXXX.tmp`` in the target's folder, which is then renamed
over the target with :func:`os.replace`: a reader, or a process killed at any moment, sees the
old file or the whole new one, never a part; a failed write removes its temporary file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO[bytes]], Any], durable: bool = False
) -> Path:
    """Write ``path`` atomically through ``write(f)``, ``f`` a binary file open for writing.

    Args:
        path: the target (its folder is created).
        write: writes the content to ``f`` (e.g. ``lambda f: torch.save(state, f)``).
        durable: ``fsync`` the content before the rename (checkpoints).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
