"""``dyshuffle train --init-checkpoint``: a new run (epoch 0, fresh optimizer, the EMA a copy)
starts from the weights a trained run evaluated: all of them, or all but the classifier when the
number of classes differs; another architecture, a missing path and ``--resume`` with it are
errors; a fine-tuned run resumes from its own last.pt, never from the checkpoint it started from."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import dyshuffle.train.engine as engine
from dyshuffle.train import cli
from dyshuffle.train.checkpoint import load_checkpoint, load_model
from test_data import make_cifar
from test_resume import TINY, tensors_equal


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A digits run of one epoch that kept (and evaluated) EMA weights."""
    run = tmp_path_factory.mktemp("source") / "run"
    assert cli.main([*TINY, "--epochs", "1", "--ema", "--output", str(run)]) == 0
    return run


def _snapshot(run: engine._Run) -> dict[str, Any]:
    def copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    return {
        "model": copy(run.model),
        "ema": None if run.ema is None else copy(run.ema.module),
        "steps": (run.epoch, run.step_in_epoch, run.global_step, run.scheduler.last_epoch),
        "optimizer_state": dict(run.optimizer.state),
        "history": list(run.history),
        "rng": torch.get_rng_state(),
    }


def start(argv: list[str], monkeypatch, capsys, train: bool = False) -> tuple[dict, str]:
    """``dyshuffle train argv``: the run as it stands before its first step, and what it printed
    (``train``: then the run goes on)."""
    taken, original = [], engine._Run.run

    def run(self: engine._Run) -> Any:
        taken.append(_snapshot(self))
        if train:
            return original(self)
        self._print_header()

    with monkeypatch.context() as m:
        m.setattr(engine._Run, "run", run)
        code = cli.main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    return taken[0], out.out


def test_same_classes_start_from_the_whole_state_dict_the_run_evaluated(
    source, tmp_path, monkeypatch, capsys
):
    """The weights the deploy loader takes (the EMA ones here), parameters and buffers; a fresh
    run at epoch 0 whose EMA is a copy; the checkpoint recorded in the configuration."""
    saved = load_checkpoint(source / "last.pt")
    assert not tensors_equal(saved["ema"], saved["model"])  # which weights is a choice
    out = tmp_path / "ft"
    argv = [*TINY, "--ema", "--init-checkpoint", str(source), "--output", str(out)]
    got, printed = start(argv, monkeypatch, capsys)
    assert tensors_equal(got["model"], saved["ema"])
    assert tensors_equal(got["model"], load_model(source)[0].state_dict())
    assert tensors_equal(got["ema"], saved["ema"])
    assert got["steps"] == (0, 0, 0, 0) and got["history"] == [] and got["optimizer_state"] == {}
    assert f"fine-tuning from {source}: its EMA weights after epoch 1" in printed
    assert "classifier" not in printed
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["init_checkpoint"] == str(source) and config["epochs"] == 6


def test_other_classes_load_all_but_a_freshly_initialized_classifier(
    source, tmp_path, monkeypatch, capsys
):
    """CIFAR-100 -> digits: every tensor but the classifier's is the checkpoint's; the classifier
    (10 outputs, not 100) is the one a run without --init-checkpoint starts from, and so is the
    random state: loading the checkpoint draws nothing from the run's generator."""
    make_cifar(tmp_path / "data", "cifar100", per_file=32, test=8)
    c100 = tmp_path / "c100"
    argv = ["--data", "cifar100", "--data-dir", str(tmp_path / "data"), "--epochs", "1",
            "--batch-size", "16", "--ema", "--eval-weights", "model", "--output", str(c100),
            "--threads", "1", "--no-progress", "--no-tensorboard"]  # fmt: skip
    assert cli.main(argv) == 0
    saved = load_checkpoint(c100 / "best.pt")
    base = [*TINY, "--seed", "3"]
    got, printed = start(
        [*base, "--init-checkpoint", str(c100 / "best.pt"), "--output", str(tmp_path / "ft")],
        monkeypatch,
        capsys,
    )
    fresh, _ = start([*base, "--output", str(tmp_path / "fresh")], monkeypatch, capsys)
    head = {"fc.weight", "fc.bias"}
    assert set(got["model"]) == set(saved["model"])
    for key, value in got["model"].items():
        if key in head:
            assert torch.equal(value, fresh["model"][key]), key
            assert value.shape[0] == 10 and saved["model"][key].shape[0] == 100, key
        else:  # the run evaluated its model weights: those, not the EMA's
            assert torch.equal(value, saved["model"][key]), key
    body = [k for k in got["model"] if k not in head and k.endswith(".weight")]
    assert any(not torch.equal(got["model"][k], fresh["model"][k]) for k in body)
    assert any(not torch.equal(saved["ema"][k], saved["model"][k]) for k in body)
    assert torch.equal(got["rng"], fresh["rng"])
    assert got["steps"] == (0, 0, 0, 0) and got["optimizer_state"] == {}
    line = [s for s in printed.splitlines() if s.startswith("fine-tuning from")]
    assert line == [
        f"fine-tuning from {c100 / 'best.pt'}: its model weights after epoch 1, all but its "
        "100-class classifier (fc): this run's 10-class one starts freshly initialized"
    ]


def test_another_architecture_is_refused_naming_each_argument_and_both_values(
    source, tmp_path, capsys
):
    out = tmp_path / "ft"
    argv = [*TINY, "--init-checkpoint", str(source), "--output", str(out)]
    code = cli.main([*argv, "--model", "shufflenet_v2_x1_0", "--mixer", "shuffle"])
    err = capsys.readouterr().err
    assert code == 2 and f"--init-checkpoint {source} was trained with " in err
    assert "name='shufflenet_v2_x0_5', mixer='dynamic', the configured model has " in err
    assert "name='shufflenet_v2_x1_0', mixer='shuffle'" in err
    code = cli.main([*argv, "--mixer-kwargs", "{reduction: 2}"])
    err = capsys.readouterr().err
    assert code == 2 and "with reduction unset, the configured model has reduction=2" in err
    assert not out.exists()


def test_init_checkpoint_with_resume_is_refused(source, tmp_path, capsys):
    """--resume continues a run and --init-checkpoint starts one: on the command line or in a
    --config recipe, together they are an error, and the run is left as it was."""
    before = (source / "last.pt").read_bytes()
    code = cli.main(["--resume", str(source), "--init-checkpoint", str(source), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "--init-checkpoint starts a new run" in err and "--resume" in err
    recipe = tmp_path / "ft.yaml"
    recipe.write_text(f"init_checkpoint: {source}\n")
    code = cli.main(["--resume", str(source), "--config", str(recipe), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "--init-checkpoint starts a new run" in err
    assert (source / "last.pt").read_bytes() == before


def test_a_missing_checkpoint_is_named_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "ft"
    (tmp_path / "empty").mkdir()
    for path, what in ((tmp_path / "nope.pt", "does not exist"), (tmp_path / "empty", "last.pt")):
        code = cli.main([*TINY, "--init-checkpoint", str(path), "--output", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and f"--init-checkpoint: checkpoint '{path}'" in err and what in err
    assert not out.exists()


def test_a_fine_tuned_run_resumes_from_its_last_pt(source, tmp_path, monkeypatch, capsys):
    """The saved configuration names the checkpoint (absolute, given relative); resuming keeps the
    run's own weights, EMA and steps, and works when that checkpoint is gone."""
    shutil.copy(source / "last.pt", tmp_path / "init.pt")
    monkeypatch.chdir(tmp_path)
    ft = tmp_path / "ft"
    argv = [*TINY, "--epochs", "1", "--ema", "--init-checkpoint", "init.pt", "--output", str(ft)]
    assert cli.main(argv) == 0
    assert "fine-tuning from" in capsys.readouterr().out
    init = load_checkpoint(tmp_path / "init.pt")
    saved = load_checkpoint(ft / "last.pt")
    assert saved["config"]["init_checkpoint"] == str(tmp_path / "init.pt")
    assert (saved["epoch"], saved["global_step"]) == (1, 2)
    assert not tensors_equal(saved["model"], init["ema"])  # the fine-tuning epoch moved them
    (tmp_path / "init.pt").unlink()
    got, printed = start(
        ["--resume", str(ft), "--epochs", "2", "--threads", "1", "--no-progress"],
        monkeypatch,
        capsys,
        train=True,
    )
    assert tensors_equal(got["model"], saved["model"]) and tensors_equal(got["ema"], saved["ema"])
    assert got["steps"] == (1, 0, 2, 2)
    assert "resuming at epoch 2, step 0" in printed and "fine-tuning from" not in printed
    final = load_checkpoint(ft / "last.pt")
    assert (final["epoch"], final["global_step"]) == (2, 4)
    assert final["config"]["init_checkpoint"] == str(tmp_path / "init.pt")
