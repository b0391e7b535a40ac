"""The hard dynamic shuffle of inference on the CPU, in one compiled call (issue 5).

The CPU counterpart of the Triton kernel in :mod:`~dyshuffle.layers.fused`, the same algorithm
in C (``hard_shuffle_cpu.c`` beside this file): per sample it pools the channels of one or two
channels_last parts, runs the generator, the softmax and the choice of each factor in float32,
looks up the composed index and copies the channels to their places, where the PyTorch path runs
a dozen operators per layer and a scatter per part. The samples and then the pixels are split
between ``torch.get_num_threads()`` threads of the OpenMP runtime that PyTorch has loaded.

The source is compiled once per machine with the system's C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``) into ``$DYSHUFFLE_CACHE_DIR`` (default ``~/.cache/dyshuffle``; the file
name holds a hash of the source, the flags and the compiler) and loaded with :mod:`ctypes`.
Without a compiler, or when compiling fails, :func:`available` is ``False`` (with one warning
that says why) and the layers keep the PyTorch operators. ``torch.compile`` keeps the kernel as
the custom operator ``dyshuffle::hard_shuffle`` (:mod:`~dyshuffle.layers.fused`, whose CPU
implementation it is); exported graphs (``torch.export``, ONNX, TorchScript) hold the PyTorch
operators, which other runtimes have.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["DTYPES", "available", "build", "launch"]

SOURCE = Path(__file__).with_name("hard_shuffle_cpu.c")

#: compiler flags; no ``-ffast-math`` (the softmax and the argmax must keep IEEE semantics)
FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC", "-fopenmp")

#: input dtypes and their codes in the C source
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = (
    [_PTR, _PTR, _PTR, ctypes.c_int, _I64, _I64, _I64, _I64, _I64]  # x0 x1 out dtype N c0 C H W
    + [_I64] * 6  # strides of the parts (n, h, w)
    + [_PTR] * 4  # w1 b1 w2 b2
    + [_I64, _I64, _PTR, _PTR, _I64, _I64, _PTR]  # hidden logits table segment Na Nb index
    + [ctypes.c_float, ctypes.c_int, _PTR]  # 1/tau threads rows_out
)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name.split()[0]):
            return name
    return None


def _cache_dir() -> Path:
    root = os.environ.get("DYSHUFFLE_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dyshuffle"


def build() -> Path:
    """Compile the C source unless this machine has it already; returns the shared library.

    The library is written under a temporary name and renamed into place, so processes that
    build at the same time (pytest-xdist, torchrun) never load a half-written file.

    Raises:
        RuntimeError: no C compiler, or the compiler failed (its message included).
    """
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc or clang)")
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run(
            [*cc.split(), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"the C compiler {cc!r} does not run: {err}") from err
    key = hashlib.sha256(
        b"\0".join(
            [source, " ".join(FLAGS).encode(), version.encode(), platform.machine().encode()]
        )
    ).hexdigest()[:16]
    target = _cache_dir() / f"hard_shuffle_cpu-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [*cc.split(), *FLAGS, str(SOURCE), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}:\n{proc.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> ctypes.CDLL | None:
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    with _lock:
        if _library is None and _failure is None:
            try:
                lib = ctypes.CDLL(str(build()))
                lib.dys_hard_shuffle.argtypes = _ARGTYPES
                lib.dys_hard_shuffle.restype = ctypes.c_int
                _library = lib
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                _failure = str(err)
                warnings.warn(
                    f"dyshuffle: the CPU kernel of the dynamic shuffle is not available, the "
                    f"layers use PyTorch operators ({_failure})",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _library


@torch.compiler.assume_constant_result
def available() -> bool:
    """The compiled CPU kernel can run here (it is built on the first call; under
    ``torch.compile`` the answer is a constant of the graph)."""
    if sys.platform == "win32":  # not built there: the flags and the loader are POSIX ones
        return False
    return _load() is not None


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


def launch(
    x0: Tensor,
    x1: Tensor | None,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    table: Tensor,
    segment: Tensor,
    index: Tensor,
    num_a: int,
    tau: float,
    rows: Tensor | None = None,
) -> Tensor:
    """:func:`dyshuffle.layers.fused.hard_shuffle` on CPU tensors already checked there.

    Weights and tables must be contiguous (``float32`` weights and table, ``int32`` segment,
    ``int64`` index), the parts channels_last of one dtype of :data:`DTYPES`. ``rows``, an
    ``(N,)`` int64 tensor, receives each sample's row of ``index`` (for the tests).
    """
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the CPU kernel of the dynamic shuffle is not available: {_failure}")
    n, c0, h, w = x0.shape
    channels = index.shape[1]
    out = torch.empty((n, h, w, channels), dtype=x0.dtype).permute(0, 3, 1, 2)
    second = x1 if x1 is not None else x0
    status = lib.dys_hard_shuffle(
        _ptr(x0),
        _ptr(second),
        _ptr(out),
        DTYPES[x0.dtype],
        n,
        c0,
        channels,
        h,
        w,
        x0.stride(0),
        x0.stride(2),
        x0.stride(3),
        second.stride(0),
        second.stride(2),
        second.stride(3),
        _ptr(w1),
        _ptr(b1),
        _ptr(w2),
        _ptr(b2),
        w1.shape[0],
        w2.shape[0],
        _ptr(table),
        _ptr(segment),
        num_a,
        table.shape[0] - num_a,
        _ptr(index),
        1.0 / tau,
        torch.get_num_threads(),
        None if rows is None else _ptr(rows),
    )
    if status != 0:
        raise MemoryError(f"the CPU kernel could not allocate its scratch memory for {n} samples")
    return out
