"""Exact resume: a run killed with SIGKILL mid-epoch and resumed ends bitwise equal to an
uninterrupted run (model, EMA and optimizer state, and the metrics); a crash between the writes of
an epoch's end leaves a run folder that the resume repairs; options given with --resume override
the saved ones."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import dyshuffle.train.engine as engine
from dyshuffle.layers import DynamicShuffle
from dyshuffle.models import create_model
from dyshuffle.train import cli
from dyshuffle.train.checkpoint import load_checkpoint, model_from_checkpoint

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


@pytest.mark.parametrize(
    "extra", [(), ("--mixup", "0.4", "--cutmix", "1.0", "--grad-accum-steps", "2")],
    ids=["plain", "mixed-accumulated"],
)  # fmt: skip
def test_sigkill_mid_epoch_then_resume_is_bitwise_exact(tmp_path, extra):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = train("--output", str(straight), *extra)
    victim = train("--output", str(killed), "--debug-step-delay", "0.2", *extra)
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


# -- in-process runs on a few digits (a second or two each)

TINY = ["--train-subset", "64", "--val-subset", "40", "--batch-size", "32", "--threads", "1",
        "--no-progress", "--no-tensorboard"]  # fmt: skip


def test_options_given_with_resume_override_the_saved_ones(tmp_path, capsys):
    """--lr, --weight-decay, --momentum and --schedule given with --resume apply from the first
    resumed step: with --lr 0 no parameter moves any more; stale temporary files go."""
    out = tmp_path / "run"
    assert cli.main([*TINY, "--epochs", "1", "--output", str(out)]) == 0
    before = load_checkpoint(out / "last.pt")
    assert before["optimizer"]["param_groups"][0]["weight_decay"] == 5e-4
    stale = out / ".last.pt.k1ll3d.tmp"  # what a SIGKILL during a save leaves behind
    stale.write_bytes(b"half a checkpoint")
    argv = ["--resume", str(out), "--epochs", "2", "--lr", "0", "--weight-decay", "0",
            "--momentum", "0.5", "--schedule", "constant", "--threads", "1",
            "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert not stale.exists()
    after = load_checkpoint(out / "last.pt")
    assert after["epoch"] == 2 and after["config"]["lr"] == 0.0
    hyper = [(g["lr"], g["initial_lr"], g["weight_decay"], g["momentum"])
             for g in after["optimizer"]["param_groups"]]  # fmt: skip
    assert hyper == [(0.0, 0.0, 0.0, 0.5)] * 2 and after["scheduler"]["base_lrs"] == [0.0, 0.0]
    assert [r["lr"] for r in after["metrics"]] == [before["metrics"][0]["lr"], 0.0]
    model, _ = model_from_checkpoint(out / "last.pt", weights="model")
    names = [n for n, _ in model.named_parameters()]
    assert all(torch.equal(before["model"][n], after["model"][n]) for n in names)
    # (the BatchNorm statistics did move: the epoch was trained)
    assert any(not torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    # an optimizer's state does not fit another optimizer: refused, naming both
    code = cli.main(["--resume", str(out), "--epochs", "3", "--optimizer", "adamw", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "optimizer 'sgd'" in err and "'adamw'" in err


def test_dynamic_lr_scale_reaches_the_generators_and_stays_on_resume(tmp_path, capsys):
    """--dynamic-lr-scale 0 trains everything but the dynamic layers' parameters, which do not
    move, also after a resume (the saved options); a resume that would change the optimizer's
    groups is refused, naming the options."""
    out = tmp_path / "run"
    argv = [*TINY, "--epochs", "1", "--dynamic-lr-scale", "0", "--dynamic-weight-decay", "0",
            "--output", str(out)]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert cli.main(["--resume", str(out), "--epochs", "2", *TINY]) == 0
    torch.manual_seed(0)  # the run's seed, before it builds its model: its initial weights
    init = create_model("shufflenet_v2_x0_5", num_classes=10, stem="cifar", mixer="dynamic")
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 2
    dynamic = {f"{n}.{p}" for n, m in init.named_modules() if isinstance(m, DynamicShuffle)
               for p, _ in m.named_parameters()}  # fmt: skip
    assert dynamic
    for name, p in init.named_parameters():
        assert torch.equal(state["model"][name], p.detach()) == (name in dynamic), name
    hyper = [(g["lr_scale"], g["weight_decay"]) for g in state["optimizer"]["param_groups"]]
    assert hyper == [(1.0, 5e-4), (1.0, 0.0), (0.0, 0.0), (0.0, 0.0)]
    # a new scale given with --resume applies from the first resumed step
    assert cli.main(["--resume", str(out), "--epochs", "3", "--dynamic-lr-scale", "2", *TINY]) == 0
    after = load_checkpoint(out / "last.pt")
    base = after["scheduler"]["base_lrs"]
    assert base[2:] == pytest.approx([2 * base[0]] * 2) and base[1] == base[0] > 0
    assert after["config"]["dynamic_lr_scale"] == 2.0
    # a run with the two groups of the defaults cannot take groups of its own on resume
    plain = tmp_path / "plain"
    assert cli.main([*TINY, "--epochs", "1", "--output", str(plain)]) == 0
    capsys.readouterr()
    code = cli.main(["--resume", str(plain), "--epochs", "2", "--dynamic-lr-scale", "10", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "2 parameter groups" in err and "configuration's 4" in err
    assert "dynamic_lr_scale" in err and load_checkpoint(plain / "last.pt")["epoch"] == 1


class _Crash(BaseException):
    """A crash (power cut, SIGKILL) at one write of the final epoch's end."""


TIMING_RESULTS = {"train_seconds", "wall_seconds", "images_per_s", "command", "run_dir"}


def _crash_at(monkeypatch, target: str) -> None:
    """Crash at the write of the file ``target`` at the end of epoch 2."""

    def wrap(write, final):
        def crashing(path, arg, *rest):
            if Path(path).name == target and final(arg):
                raise _Crash(target)
            return write(path, arg, *rest)

        return crashing

    def epoch_2(rows):
        return len(rows) == 2

    for name, final in (
        ("write_metrics", epoch_2),
        ("plot_curves", epoch_2),
        ("write_json", bool),
        ("save_checkpoint", lambda state: state["epoch"] == 2),
    ):
        monkeypatch.setattr(engine, name, wrap(getattr(engine, name), final))


def test_crash_between_the_writes_of_an_epoch_end_is_repaired_by_resume(tmp_path, monkeypatch):
    """Whichever write of the last epoch's end a crash interrupts (best.pt, metrics.csv, the
    curves, last.pt, results.json), resuming leaves the run folder of the uninterrupted run."""
    # one evaluation: epoch 2 is the best; the fixed shuffle: no soft evaluation, faster
    args = [*TINY, "--epochs", "2", "--eval-every", "2", "--mixer", "shuffle"]
    straight = tmp_path / "straight"
    snapshot = tmp_path / "epoch1"
    save = engine.save_checkpoint

    def keep_epoch_1(path, state):  # the run folder as it stands after epoch 1
        save(path, state)
        if Path(path).name == "last.pt" and state["epoch"] == 1 and not snapshot.exists():
            shutil.copytree(Path(path).parent, snapshot)

    with monkeypatch.context() as m:
        m.setattr(engine, "save_checkpoint", keep_epoch_1)
        assert cli.main([*args, "--output", str(straight)]) == 0
    want_best = load_checkpoint(straight / "best.pt")
    assert want_best["epoch"] == 2

    def metrics(run):
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]

    def results(run):
        res = json.loads((run / "results.json").read_text())
        return {k: v for k, v in res.items() if k not in TIMING_RESULTS}

    for target in ("best.pt", "metrics.csv", "curves.png", "last.pt", "results.json"):
        run = tmp_path / target
        shutil.copytree(snapshot, run)
        with monkeypatch.context() as m:
            _crash_at(m, target)
            with pytest.raises(_Crash):
                cli.main(["--resume", str(run), "--threads", "1", "--no-progress"])
        assert cli.main(["--resume", str(run), "--threads", "1", "--no-progress"]) == 0, target
        best = load_checkpoint(run / "best.pt")
        assert (best["epoch"], best["global_step"]) == (2, want_best["global_step"]), target
        assert tensors_equal(best["model"], want_best["model"]), target
        assert metrics(run) == metrics(straight), target
        assert results(run) == results(straight), target
        assert (run / "curves.png").read_bytes() == (straight / "curves.png").read_bytes(), target
