"""DistributedDataParallel under torchrun: two CPU processes (gloo) keep identical weights, each
evaluates its own shard, and the reduced metrics are those of the whole validation split."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from dyshuffle.data import InMemoryLoader, load_data
from dyshuffle.train.checkpoint import load_checkpoint, model_from_checkpoint
from dyshuffle.train.engine import evaluate

WORKER = textwrap.dedent(
    """
    import json, os, sys, torch
    from dyshuffle.train.config import resolve_config
    from dyshuffle.train.engine import train

    out = sys.argv[1]
    cfg = resolve_config({"train_subset": 128, "val_subset": 51, "batch_size": 32, "epochs": 2,
                          "threads": 1, "progress": False, "tensorboard": False,
                          "output": os.path.join(out, "run"), "device": "cpu"})
    res = train(cfg, command="test")
    rank = int(os.environ["RANK"])
    torch.save({"state": res.model.state_dict(), "results": res.results},
               os.path.join(out, f"rank{rank}.pt"))
    """
)


def run_two_processes(worker: str, folder) -> None:
    """``torchrun --standalone --nproc_per_node=2`` of the script ``worker`` with ``folder`` as
    its argument (one thread per process)."""
    script = folder / "worker.py"
    script.write_text(worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(folder)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_two_processes_keep_identical_weights_and_reduce_metrics(tmp_path):
    run_two_processes(WORKER, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    # identical parameters and (after averaging) BatchNorm statistics on both ranks
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(torch.equal(saved["model"][k], v) for k, v in r0["state"].items())
    assert saved["global_step"] == 2 * 4  # 128 images / global batch 32, two epochs

    # each rank evaluated its own share; the sums are the whole split
    a, b = r0["results"], r1["results"]
    assert a["world_size"] == 2 and (a["local"]["count"], b["local"]["count"]) == (26, 25)
    assert a["val_count"] == b["val_count"] == 51
    assert a["val_correct1"] == b["val_correct1"] == a["local"]["correct1"] + b["local"]["correct1"]
    assert a["top1"] == pytest.approx(100 * a["val_correct1"] / 51)

    # ... and equal what one process measures with the saved weights on the full split
    model, state = model_from_checkpoint(tmp_path / "run" / "last.pt")
    data = load_data("digits")
    idx = torch.randperm(360, generator=torch.Generator().manual_seed(0))[:51].sort().values
    loader = InMemoryLoader(data.val_images[idx], data.val_labels[idx], batch_size=500,
                            train=False, mean=state["mean"], std=state["std"])  # fmt: skip
    single = evaluate(model, loader, torch.device("cpu"))
    assert single["count"] == 51 and single["correct1"] == a["val_correct1"]
    assert single["top5"] == pytest.approx(a["top5"])


RESUME_WORKER = textwrap.dedent(
    """
    import os, shutil, sys
    import dyshuffle.train.engine as engine
    from dyshuffle.train.checkpoint import load_checkpoint
    from dyshuffle.train.config import resolve_config
    from dyshuffle.train.distributed import cleanup, setup

    out = sys.argv[1]
    info = setup("cpu")  # one process group for the three runs (train() would end it)

    def run(name, resume=None):
        cfg = resolve_config({"train_subset": 128, "val_subset": 51, "batch_size": 32,
                              "epochs": 2, "log_every": 1, "threads": 1, "progress": False,
                              "tensorboard": False, "output": os.path.join(out, name),
                              "device": "cpu"})
        return engine._Run(cfg, info, resume, "test").run()

    run("straight")

    check = engine._Run._check

    def sigterm_in_epoch_2(self, bad, stop):  # every rank, after step 6 (2 of the 4 of epoch 2)
        if self.global_step == 6:
            stop.requested, stop.signal_name = True, "SIGTERM"
        return check(self, bad, stop)

    engine._Run._check = sigterm_in_epoch_2
    try:
        run("resumed")
        raise SystemExit("not interrupted")
    except engine.TrainingInterrupted as e:
        message = str(e)
    engine._Run._check = check
    last = os.path.join(out, "resumed", "last.pt")
    if info.rank == 0:
        shutil.copy(last, os.path.join(out, "interrupted.pt"))
        with open(os.path.join(out, "interrupted.txt"), "w") as f:
            f.write(message)
    run("resumed", load_checkpoint(last))
    cleanup()
    """
)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_resume_mid_epoch_counts_the_samples_of_every_rank_once(tmp_path):
    """Two processes stopped in the middle of epoch 2 and resumed: the training metrics of that
    epoch are those of the uninterrupted run (the checkpoint holds the sums of both ranks)."""
    run_two_processes(RESUME_WORKER, tmp_path)
    hint = "torchrun --nproc_per_node=2 -m dyshuffle.cli train --resume "
    assert hint + str(tmp_path / "resumed") in (tmp_path / "interrupted.txt").read_text()
    stopped = load_checkpoint(tmp_path / "interrupted.pt")
    assert (stopped["epoch"], stopped["step_in_epoch"]) == (1, 2)
    assert stopped["partial"]["sums"][2] == 2 * 32  # images of both ranks in the two steps

    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for want, got in zip(a["metrics"], b["metrics"], strict=True):
        assert got["train_top1"] == want["train_top1"]  # counts: exact
        for key in ("train_loss", "ortho_loss", "val_loss", "val_top1"):
            assert got[key] == pytest.approx(want[key], rel=1e-12), key  # sums in another order
        assert got["images_per_s"] > 0 and got["step"] == want["step"]


OPTIONS_WORKER = textwrap.dedent(
    """
    import os, sys, torch
    import dyshuffle.train.engine as engine
    from dyshuffle.train.config import resolve_config
    from dyshuffle.train.distributed import cleanup, setup

    out = sys.argv[1]
    info = setup("cpu")  # one process group for every run (train() would end it)
    runs = {"plain": {}, "checkpointing": {"grad_checkpointing": True},
            "accumulated": {"grad_accum_steps": 2, "mixup": 0.4, "cutmix": 1.0}}
    for name, options in runs.items():
        cfg = resolve_config({"train_subset": 128, "val_subset": 51, "batch_size": 32,
                              "epochs": 1, "threads": 1, "progress": False, "tensorboard": False,
                              "output": os.path.join(out, name), "device": "cpu", **options})
        res = engine._Run(cfg, info, None, "test").run()
        torch.save(res.model.state_dict(), os.path.join(out, f"{name}-rank{info.rank}.pt"))
    cleanup()
    """
)


@pytest.fixture(scope="module")
def option_runs(tmp_path_factory):
    """One torchrun of two processes training with each option set in turn (weights per rank)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("no gloo")
    folder = tmp_path_factory.mktemp("options")
    run_two_processes(OPTIONS_WORKER, folder)
    return lambda name, rank: torch.load(folder / f"{name}-rank{rank}.pt")


def test_gradient_checkpointing_under_ddp_trains_the_same_weights(option_runs):
    """DistributedDataParallel with ``--grad-checkpointing``: the recomputation in the backward
    pass (BatchNorm buffers restored in place, as DDP broadcasts them) gives the same weights
    and statistics on both ranks as the run without it."""
    plain = option_runs("plain", 0)
    for rank in (0, 1):
        state = option_runs("checkpointing", rank)
        assert state.keys() == plain.keys()
        for k, v in plain.items():
            assert torch.equal(state[k], v), (rank, k)


def test_accumulated_mixed_batches_under_ddp_keep_the_ranks_identical(option_runs):
    """``--grad-accum-steps 2`` with mixup/CutMix under DDP: the gradients are reduced in the
    last micro-batch's backward pass only (``no_sync`` before), and every rank applies the same
    step (each mixes its own share of the batch with draws of its own)."""
    a, b, plain = (
        option_runs("accumulated", 0),
        option_runs("accumulated", 1),
        option_runs("plain", 0),
    )
    assert a.keys() == b.keys() == plain.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], plain[k]) for k in a)  # and the options took effect
