"""Run outputs: metrics.csv, curves.png, results.json, and the run's provenance."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_write, atomic_write_text

__all__ = ["environment", "git_commit", "plot_curves", "write_json", "write_metrics", "write_text"]


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically (temporary file in the same folder, then ``os.replace``)."""
    atomic_write_text(path, text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_metrics(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.csv`` from the full history (so a resumed run never duplicates rows)."""
    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    write_text(path, buf.getvalue())


def plot_curves(path: str | os.PathLike, rows: list[dict[str, Any]], title: str = "") -> None:
    """Loss, top-1 and learning rate per epoch as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if not rows:
        return
    ep = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(ep, [r["train_loss"] for r in rows], "o-", label="train")
    val = [(r["epoch"], r["val_loss"]) for r in rows if r.get("val_loss") not in (None, "")]
    if val:
        axes[0].plot(*zip(*val), "o-", label="validation")
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
    axes[1].plot(ep, [r["train_top1"] for r in rows], "o-", label="train (augmented)")
    val = [(r["epoch"], r["val_top1"]) for r in rows if r.get("val_top1") not in (None, "")]
    if val:
        axes[1].plot(*zip(*val), "o-", label="validation")
    axes[1].set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
    axes[2].plot(ep, [r["lr"] for r in rows], "o-")
    axes[2].set(xlabel="epoch", ylabel="learning rate (end of epoch)", title="schedule")
    for ax in axes[:2]:
        ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    finally:
        plt.close(fig)


#: tracked paths whose changes leave what the code computes as it was (the run records and
#: reports a sweep rewrites as it goes, the prose): they do not make the tree ``-dirty``
UNTRACKED_BY_COMMIT = ("results", "RESULTS.md", "docs", "README.md")


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The commit of the source tree (``git rev-parse HEAD``, ``-dirty`` when modified).

    Changes in :data:`UNTRACKED_BY_COMMIT` do not count: a sweep appends its records and
    rewrites ``RESULTS.md`` after every run, and the runs after the first would otherwise all
    name a dirty tree of the commit they ran. ``DYSHUFFLE_COMMIT``, when set, names it instead:
    the copy of the tree sent to a device machine travels without ``.git``, so the GPU scripts
    set it from the commit scripts/gpu_prepare.sh wrote (scripts/gpu_commit.sh).
    """
    if os.environ.get("DYSHUFFLE_COMMIT"):
        return os.environ["DYSHUFFLE_COMMIT"]
    cwd = cwd or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ":/",
                *(f":(top,exclude){p}" for p in UNTRACKED_BY_COMMIT),
            ],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Device, library versions and machine of a run."""
    name = str(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "host_cpus": os.cpu_count(),
    }
