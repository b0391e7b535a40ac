"""Exact resume: a run killed with SIGKILL mid-epoch and resumed ends bitwise equal to an
uninterrupted run (model, EMA and optimizer state, and the metrics)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from dyshuffle.train.checkpoint import load_checkpoint

ARGS = ["--train-subset", "128", "--val-subset", "40", "--batch-size", "16", "--epochs", "2",
        "--save-every-steps", "3", "--ema", "--threads", "1", "--no-progress",
        "--no-tensorboard"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMING = {"epoch_seconds", "images_per_s"}


def train(*extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dyshuffle.cli", "train", *ARGS, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        **kw,
    )


def tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_sigkill_mid_epoch_then_resume_is_bitwise_exact(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = train("--output", str(straight))
    victim = train("--output", str(killed), "--debug-step-delay", "0.2")
    deadline, state = time.time() + 180, None
    while time.time() < deadline:  # wait for a mid-epoch checkpoint in the second epoch
        try:
            state = load_checkpoint(killed / "last.pt")
        except (FileNotFoundError, ValueError, EOFError, RuntimeError):
            state = None
        if state is not None and state["epoch"] == 1 and state["step_in_epoch"] >= 1:
            break
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out
    state = load_checkpoint(killed / "last.pt")
    assert state["epoch"] == 1 and 0 < state["step_in_epoch"] < 8, "not killed mid-epoch"

    cmd = [sys.executable, "-m", "dyshuffle.cli", "train", "--resume", str(killed), "--no-progress"]
    resumed = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming at epoch 2, step {state['step_in_epoch']}" in resumed.stdout

    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(killed / "last.pt")
    assert a["global_step"] == b["global_step"] == 16
    for key in ("model", "ema", "optimizer", "scheduler", "rng"):
        assert tensors_equal(a[key], b[key]), key
    strip = [
        [{k: v for k, v in row.items() if k not in TIMING} for row in s["metrics"]] for s in (a, b)
    ]
    assert strip[0] == strip[1]
