"""``dyshuffle train`` / ``dyshuffle evaluate``: schedules, configuration, run outputs, failures."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from checkpoints import checkpoint_of
from dyshuffle.layers import DynamicShuffle, StaticDynamicShuffle
from dyshuffle.models import create_model
from dyshuffle.train import cli
from dyshuffle.train import evaluate as evaluate_cli
from dyshuffle.train.checkpoint import (
    REQUIRED_KEYS,
    layer_defaults,
    load_checkpoint,
    model_from_checkpoint,
    resolve_weights,
)
from dyshuffle.train.config import ConfigError, TrainConfig, load_yaml, resolve_config
from dyshuffle.train.optim import create_optimizer, lr_factor, param_groups, tau_at
from layer_calls import dynamic_layer_calls
from test_data import CIFAR10_NAMES, make_cifar

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tgz"
FAST = ["--threads", "1", "--no-progress"]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# -- schedules and optimizer ----------------------------------------------------------------------


def test_onecycle_rises_then_falls_linearly():
    total = 100
    f = [lr_factor(s, total, "onecycle", onecycle_pct=0.25) for s in range(total + 1)]
    assert f[0] == pytest.approx(0.05) and f[25] == 1.0 and f[100] == 0.0
    assert all(a < b for a, b in zip(f[:25], f[1:26]))  # straight rise ...
    assert all(a > b for a, b in zip(f[25:100], f[26:101]))  # ... straight fall
    assert f[62] == pytest.approx((100 - 62) / 75)
    assert lr_factor(100, 100, "onecycle", min_ratio=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_warmup_then_decay_to_min(schedule):
    total, warm = 50, 10
    f = [lr_factor(s, total, schedule, warmup=warm, min_ratio=0.2) for s in range(total + 1)]
    assert f[:warm] == pytest.approx([(s + 1) / (warm + 1) for s in range(warm)])
    assert f[warm] == pytest.approx(1.0) and f[total] == pytest.approx(0.2)
    mid = f[warm + (total - warm) // 2]
    assert mid == pytest.approx(0.6)  # cosine and linear meet at the midpoint
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1 :]))


def test_scheduler_steps_per_step_and_tau_schedule():
    model = torch.nn.Linear(3, 2)
    opt = create_optimizer(model, "sgd", 0.4, 5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 20, "onecycle"))
    for step in range(1, 21):
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.4 * lr_factor(step, 20, "onecycle"))
    assert tau_at(0, 11, 2.0, 0.5) == 2.0 and tau_at(10, 11, 2.0, 0.5) == pytest.approx(0.5)
    assert tau_at(5, 11, 2.0, 0.5) == pytest.approx(1.0)  # geometric midpoint sqrt(2 * 0.5)
    assert tau_at(5, 11, 2.0, 0.5, "linear") == pytest.approx(1.25)


def test_weight_decay_skips_norm_and_bias():
    from dyshuffle.models import create_model

    model = create_model("shufflenet_v2_x0_5", num_classes=10, stem="cifar", mixer="dynamic")
    decay, no_decay = param_groups(model, 5e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        n for n, p in model.named_parameters() if p.ndim > 1
    }
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    skip = {id(p) for p in no_decay["params"]}
    assert all(id(m.weight) in skip and id(m.bias) in skip for m in bn)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    sgd = create_optimizer(model, "sgd", 0.1, 5e-4)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    assert isinstance(create_optimizer(model, "adamw", 1e-3, 0.05), torch.optim.AdamW)


@pytest.mark.parametrize("pointwise", ["conv", "sds"])
@pytest.mark.parametrize("mixer", ["dynamic", "learned"])
def test_dynamic_layers_get_a_learning_rate_and_weight_decay_of_their_own(mixer, pointwise):
    model = create_model(
        "shufflenet_v2_x0_5", num_classes=10, stem="cifar", mixer=mixer, pointwise=pointwise
    )
    layers = [m for m in model.modules() if isinstance(m, DynamicShuffle)]
    dynamic = {id(p) for m in layers for p in m.parameters()}
    assert dynamic and len(param_groups(model, 5e-4)) == 2  # the defaults: two groups
    groups = param_groups(model, 5e-4, dynamic_lr_scale=10.0, dynamic_weight_decay=0.0)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each once
    assert {id(p) for g in groups[2:] for p in g["params"]} == dynamic
    hyper = [(g["lr_scale"], g["weight_decay"]) for g in groups]
    if mixer == "learned" and pointwise == "conv":  # logits only, a (1, K) matrix each
        assert hyper == [(1.0, 5e-4), (1.0, 0.0), (10.0, 0.0)]
    else:  # the generators' matrices, then their biases
        assert hyper == [(1.0, 5e-4), (1.0, 0.0), (10.0, 0.0), (10.0, 0.0)]
        assert all(p.ndim == 1 for p in groups[3]["params"])
    assert all(p.ndim == 2 for p in groups[2]["params"])
    opt = create_optimizer(model, "sgd", 0.2, 5e-4, dynamic_lr_scale=10.0)
    assert [g["weight_decay"] for g in opt.param_groups][2] == 5e-4  # None: the weight decay
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 10, "onecycle"))
    for _ in range(3):
        opt.step()
        sched.step()
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[2:] == pytest.approx([10 * lrs[0]] * (len(lrs) - 2)) and lrs[1] == lrs[0]
    # no dynamic layers: the two groups, whatever the options
    fixed = create_model("shufflenet_v2_x0_5", num_classes=10, stem="cifar", mixer="shuffle")
    assert len(param_groups(fixed, 5e-4, dynamic_lr_scale=10.0, dynamic_weight_decay=0.0)) == 2


def test_ema_decay_warms_up_then_holds():
    from torch.optim.swa_utils import AveragedModel

    from dyshuffle.train.engine import _ema_avg_fn

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema = AveragedModel(model, multi_avg_fn=_ema_avg_fn(0.5), use_buffers=True)
    w = model[0].weight.detach().clone()
    ema.update_parameters(model)  # the first update copies
    for n in range(1, 12):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        before = ema.module[0].weight.detach().clone()
        ema.update_parameters(model)
        d = min(0.5, (1 + n) / (10 + n))  # 2/11, 3/12, ... capped at the decay
        assert torch.allclose(ema.module[0].weight, d * before + (1 - d) * (w + n), atol=1e-6)


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [1, 7, 50, 99])
def test_per_class_subset_keeps_each_class_share_in_the_fixed_order(keep):
    from dyshuffle.data import subset_indices as _subset

    labels = torch.tensor([0] * 60 + [1] * 25 + [2] * 10 + [3] * 5)[torch.randperm(100)]
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    assert _subset(100, keep).tolist() == sorted(order[:keep].tolist())  # the random subset
    picked = _subset(100, keep, lambda: labels)
    assert len(picked) == keep == len(set(picked.tolist()))
    assert picked.tolist() == sorted(picked.tolist())
    counts = torch.bincount(labels[picked], minlength=4)
    share = torch.tensor([60, 25, 10, 5]) * keep / 100
    assert ((counts - share).abs() < 1).all(), (counts, share)  # each class its share, rounded
    for c in range(4):  # and within a class, its first samples of the same fixed order
        first = [int(i) for i in order if labels[i] == c][: int(counts[c])]
        assert sorted(first) == [int(i) for i in picked if labels[i] == c]
    assert _subset(100, 0, lambda: labels) is None and _subset(100, 100, lambda: labels) is None


def test_per_class_subsets_reach_both_loaders(tmp_path):
    from dyshuffle.train.distributed import DistInfo
    from dyshuffle.train.engine import build_loaders
    from test_data import make_image_tree

    make_image_tree(tmp_path / "tree", classes=("a", "b", "c", "d"), train=6, val=3, size=8)
    for data, loader in (("digits", "memory"), ("imagefolder", "workers")):
        cfg = TrainConfig(
            data=data, data_dir=str(tmp_path / "tree") if data == "imagefolder" else None,
            loader=loader, workers=0, cache_dir=str(tmp_path / "cache"), train_subset=8,
            val_subset=4, subset_per_class=True, image_size=8 if data == "imagefolder" else None,
        ).validate()  # fmt: skip
        loaded, _, _ = build_loaders(cfg, DistInfo(), verbose=False)
        if loader == "memory":
            train, val = loaded.train_labels.tolist(), loaded.val_labels.tolist()
        else:
            train = [y for _, y in loaded.train_samples]
            val = [y for _, y in loaded.val_samples]
        n = 10 if data == "digits" else 4  # classes, each with (nearly) the same count
        assert len(train) == 8 and len(val) == 4
        assert max(train.count(c) for c in range(n)) - min(train.count(c) for c in range(n)) <= 1
        assert max(val.count(c) for c in range(n)) - min(val.count(c) for c in range(n)) <= 1


def test_yaml_then_command_line_override_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 7\nlr: 0.3\nmixer_kwargs: {mode: soft}\nbetas: [0.8, 0.99]\n")
    cfg = resolve_config({"lr": 0.05}, str(recipe))
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (7, 0.05, TrainConfig().batch_size)
    assert cfg.mixer_kwargs == {"mode": "soft"} and cfg.betas == [0.8, 0.99]


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_is_valid(recipe):
    cfg = resolve_config({"data_dir": "somewhere"}, str(recipe))
    assert cfg.model.startswith(("shufflenet", "mobilenet")) and cfg.epochs >= 1


def test_fast_cifar10_recipe_is_the_reference_setting():
    for name in ("cifar10-fast.yaml", "cifar10-jpeg-fast.yaml"):
        cfg = resolve_config({"data_dir": "x"}, str(REPO / "configs" / name))
        got = (cfg.model, cfg.stem, cfg.epochs, cfg.batch_size, cfg.optimizer, cfg.nesterov,
               cfg.schedule, cfg.lr, cfg.weight_decay, cfg.label_smoothing, cfg.crop_padding,
               cfg.hflip, cfg.amp, cfg.channels_last, cfg.loader)  # fmt: skip
        assert got == ("shufflenet_v2_x1_0", "cifar", 24, 512, "sgd", True, "onecycle", 0.4,
                       5e-4, 0.1, 4, True, "bf16", True, "memory")  # fmt: skip
    # digits.yaml spells out what the defaults resolve to for digits (32 px: CIFAR stem; 2 px
    # crop padding and no flips, the data set's own augmentation)
    digits = resolve_config({}, str(REPO / "configs" / "digits.yaml")).to_dict()
    spelled = {"stem": "cifar", "crop_padding": 2, "hflip": False}
    assert digits == {**TrainConfig().to_dict(), **spelled}


def test_unknown_or_bad_config_values_are_named(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lrr: 0.1\n")
    with pytest.raises(
        ConfigError, match=r"unknown key 'lrr' \(did you mean 'lr'\?\); valid: data, "
    ):
        load_yaml(recipe)
    recipe.write_text("epochs: ten\n")
    with pytest.raises(ConfigError, match="epochs must be int, got 'ten'"):
        load_yaml(recipe)
    recipe.write_text("optimizer: adam\n")
    with pytest.raises(ConfigError, match="unknown optimizer 'adam'; valid: sgd, adamw"):
        resolve_config({}, str(recipe))
    code, _, err = run_cli(["--config", str(recipe)], capsys)
    assert code == 2 and "unknown optimizer 'adam'" in err
    for key in ("dynamic_lr_scale", "dynamic_weight_decay"):
        with pytest.raises(ConfigError, match=f"{key} must be non-negative.*got -1.0"):
            resolve_config({key: -1.0})
    code, _, err = run_cli(["--lrr", "0.1"], capsys)
    assert (
        code == 2 and "unknown option '--lrr' (did you mean '--lr'?)" in err and "--epochs" in err
    )
    assert err.startswith("dyshuffle train: error: unknown option") and err.count("dyshuffle") == 1
    with pytest.raises(SystemExit) as e:
        cli.main(["--data", "cifar"])  # ambiguous names do not exist
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'cifar'" in err and "cifar100" in err


def test_yaml_numbers_in_exponent_notation_are_numbers(tmp_path, capsys):
    """PyYAML reads 1e-3 as a string (YAML 1.1 wants a dot); a recipe takes it as --lr 1e-3."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-3\nweight_decay: 5E-5\nepochs: '3'\nbetas: [0.9, 1e-2]\n")
    cfg = resolve_config({}, str(recipe))
    assert (cfg.lr, cfg.weight_decay, cfg.epochs, cfg.betas) == (1e-3, 5e-5, 3, [0.9, 0.01])
    assert cfg.lr == cli._parser().parse_args(["--lr", "1e-3"]).lr  # what --lr 1e-3 gives
    for text, message in (
        ("lr: 1e-3x", "lr must be float, got '1e-3x'"),
        ("epochs: 1e3", "epochs must be int, got '1e3'"),
        ("lr: .nan", "lr must be finite, got nan"),
        ("betas: [0.9, .inf]", "betas must be finite"),
    ):
        recipe.write_text(text + "\n")
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_yaml(recipe)
    code, _, err = run_cli(["--lr", "nan"], capsys)
    assert code == 2 and "lr must be finite" in err


@pytest.mark.parametrize(
    "option, value, named",
    [
        ("--crop-padding", "-1", "crop_padding must be non-negative"),
        ("--image-size", "0", "image_size must be at least 1"),
        ("--image-size", "-3", "image_size must be at least 1"),
        ("--val-fraction", "1.5", "val_fraction must be in (0, 1)"),
        ("--mixer-kwargs", '{"bogus": 1}', "unexpected keyword argument 'bogus'"),
    ],
)
def test_bad_option_values_are_named_before_the_run_folder_exists(
    tmp_path, capsys, option, value, named
):
    out = tmp_path / "run"
    argv = [option, value, "--epochs", "1", "--train-subset", "64", "--output", str(out), *FAST]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err.startswith("dyshuffle train: error: ") and named in err, err
    assert "Traceback" not in err and not out.exists()
    if option == "--image-size":  # also with the workers loader, where 0 was the default
        argv = ["--data", "imagefolder", "--data-dir", str(tmp_path), "--loader", "workers",
                *argv]  # fmt: skip
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and named in err and not out.exists()


def test_a_run_on_image_files_records_the_file_loaders_evaluation_crop(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from dyshuffle.data import EVAL_CROP_FRACTION

    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for label in ("a", "b"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "data" / split / label / f"{i}.png")
    out = tmp_path / "run"
    argv = ["--data", "imagefolder", "--data-dir", str(tmp_path / "data"), "--loader", "workers",
            "--workers", "0", "--image-size", "16", "--epochs", "1", "--batch-size", "4",
            "--output", str(out), "--no-tensorboard", *FAST]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert load_checkpoint(out / "last.pt")["eval_crop_fraction"] == EVAL_CROP_FRACTION < 1


def test_bad_data_path_is_named_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(
        ["--data", "cifar10", "--data-dir", str(tmp_path / "nope"), "--output", str(out), *FAST],
        capsys,
    )
    assert code == 2 and str(tmp_path / "nope") in err and "does not exist" in err
    assert not out.exists()
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(
        ["--data", "cifar10", "--data-dir", str(tmp_path / "empty"), "--output", str(out), *FAST],
        capsys,
    )
    assert code == 2 and "cifar-10-batches-py/data_batch_1" in err and not out.exists()


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"precious")
    code, _, err = run_cli(["--output", str(out), "--epochs", "1", *FAST], capsys)
    assert code == 2 and "already holds a run" in err and "--resume" in err
    assert (out / "last.pt").read_bytes() == b"precious" and sorted(os.listdir(out)) == ["last.pt"]


# -- a full run on a fake CIFAR-10 -----------------------------------------------------------


def test_results_name_the_commit_of_the_start(tmp_path, capsys, monkeypatch):
    """A checkout that moves on while a run trains must not give the run its new commit."""
    import dyshuffle.train.engine as engine

    out = tmp_path / "run"

    # the checkout's commit is "a..." until the first epoch is written, "b..." after
    def commit(*args, **kwargs):
        return ("b" if (out / "metrics.csv").exists() else "a") * 40

    monkeypatch.setattr(engine, "git_commit", commit)
    make_cifar(tmp_path / "data", "cifar10", per_file=4, test=8)
    argv = ["--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--output", str(out),
            "--epochs", "1", "--batch-size", "8", *FAST]  # fmt: skip
    code, stdout, _ = run_cli(argv, capsys)
    assert code == 0, stdout
    assert json.loads((out / "results.json").read_text())["commit"] == "a" * 40


def test_relative_data_dir_is_stored_absolute_for_resume_and_evaluate(
    tmp_path, capsys, monkeypatch
):
    """A run started with ``--data-dir data`` resumes and evaluates from another directory: the
    checkpoint names the folder the user meant, the recorded command stays as typed."""
    make_cifar(tmp_path / "data", "cifar10", per_file=4, test=8)
    monkeypatch.chdir(tmp_path)
    argv = ["--data", "cifar10", "--data-dir", "data", "--output", "run", "--epochs", "1",
            "--batch-size", "8", "--no-tensorboard", *FAST]  # fmt: skip
    code, stdout, _ = run_cli(argv, capsys)
    assert code == 0, stdout
    run = tmp_path / "run"
    data = str(tmp_path / "data")
    assert yaml.safe_load((run / "config.yaml").read_text())["data_dir"] == data
    assert load_checkpoint(run / "last.pt")["config"]["data_dir"] == data
    assert json.loads((run / "results.json").read_text())["command"].endswith(
        "--data-dir data --output run --epochs 1 --batch-size 8 --no-tensorboard " + " ".join(FAST)
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (elsewhere / "data").mkdir()  # a folder of the same name here must not be read
    code = evaluate_cli.main([str(run), "--json", "ev.json", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    ev = json.loads((elsewhere / "ev.json").read_text())
    assert ev["count"] == 8 and ev["data_dir"] == data
    code, stdout, err = run_cli(["--resume", str(run), "--epochs", "2", *FAST], capsys)
    assert code == 0, err
    assert load_checkpoint(run / "last.pt")["epoch"] == 2


def test_train_writes_every_output_and_evaluate_agrees(tmp_path, capsys):
    make_cifar(tmp_path / "data", "cifar10", per_file=20, test=40)
    out = tmp_path / "run"
    argv = ["--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--output", str(out),
            "--epochs", "3", "--batch-size", "20", "--optimizer", "adamw", "--lr", "0.004",
            "--weight-decay", "0.05", "--schedule", "cosine", "--warmup-epochs", "1",
            "--tau-start", "2", "--tau-end", "0.5", "--ema", "--ema-decay", "0.9",
            *FAST]  # fmt: skip
    code, stdout, _ = run_cli(argv, capsys)
    assert code == 0, stdout
    files = {"config.yaml", "last.pt", "best.pt", "metrics.csv", "curves.png", "results.json", "tb"}
    assert files <= set(os.listdir(out))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tb"))
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved == resolve_config(saved).to_dict()
    assert (saved["lr"], saved["optimizer"], saved["epochs"], saved["ema"]) == (
        0.004,
        "adamw",
        3,
        True,
    )

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and [int(r["step"]) for r in rows] == [
        5,
        10,
        15,
    ]
    for r in rows:  # the learning rate follows the warm-up + cosine schedule, per step
        want = 0.004 * lr_factor(int(r["step"]), 15, "cosine", warmup=5)
        assert float(r["lr"]) == pytest.approx(want, rel=1e-4, abs=1e-12)

    res = json.loads((out / "results.json").read_text())
    for key in (
        "top1",
        "top5",
        "top1_soft",
        "top1_hard",
        "top1_identity",
        "params",
        "macs",
        "train_seconds",
        "device",
        "torch",
        "commit",
        "command",
    ):
        assert key in res
    assert res["top1"] == res["top1_hard"] and res["num_val"] == 40 and res["num_train"] == 100
    assert res["eval_weights"] == "ema" and res["command"].startswith(
        "dyshuffle train --data cifar10"
    )
    # 15 steps: the running BatchNorm statistics lag, so judge learning by the training loss
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])

    state = load_checkpoint(out / "last.pt")
    assert set(REQUIRED_KEYS) <= set(state)
    assert state["class_names"] == CIFAR10_NAMES and state["input_size"] == [3, 32, 32]
    assert state["eval_crop_fraction"] == 1.0  # in-memory evaluation: the images as they are
    assert state["model_args"]["mixer"] == "dynamic" and state["model_args"]["stem"] == "cifar"
    assert state["epoch"] == 3 and state["tau"] == pytest.approx(0.5)
    assert state["layer_defaults"] == layer_defaults()
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    model, _ = model_from_checkpoint(out / "last.pt")
    assert all(torch.equal(v, state["ema"][k]) for k, v in model.state_dict().items())
    assert sum(p.numel() for p in model.parameters()) == res["params"]

    code = evaluate_cli.main([str(out), "--json", str(tmp_path / "ev.json"), "--device", "cpu"])
    printed = capsys.readouterr().out
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert code == 0 and ev["count"] == 40 and f"top-1 {res['top1']:.2f}%" in printed
    assert ev["top1"] == pytest.approx(res["top1"]) and ev["top1_soft"] == pytest.approx(
        res["top1_soft"]
    )
    assert ev["top5"] == pytest.approx(res["top5"]) and ev["weights"] == "ema"
    # the identity factors forced: what evaluate --permutation identity gives for the same weights
    code = evaluate_cli.main([str(out), "--permutation", "identity", "--json",
                              str(tmp_path / "ev.json"), "--device", "cpu"])  # fmt: skip
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert code == 0 and ev["top1"] == pytest.approx(res["top1_identity"])
    assert ev["top5"] == pytest.approx(res["top5_identity"])


def test_evaluate_uses_the_weights_the_run_evaluated(tmp_path, capsys):
    """A run with --ema --eval-weights model evaluated (and chose best.pt by) the model's own
    weights: model_from_checkpoint and dyshuffle evaluate use them too unless told otherwise."""
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["--train-subset", "64", "--val-subset", "40", "--batch-size", "32",
                               "--epochs", "1", "--ema", "--ema-decay", "0.9", "--eval-weights",
                               "model", "--output", str(out), "--no-tensorboard", *FAST],
                              capsys)  # fmt: skip
    assert code == 0, stdout
    res = json.loads((out / "results.json").read_text())
    state = load_checkpoint(out / "best.pt")
    assert res["eval_weights"] == state["eval_weights"] == "model"
    assert any(not torch.equal(state["ema"][k], v) for k, v in state["model"].items())
    model, _ = model_from_checkpoint(out / "best.pt")
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())
    ev_json = tmp_path / "ev.json"
    assert evaluate_cli.main([str(out / "best.pt"), "--json", str(ev_json), "--device", "cpu"]) == 0
    ev = json.loads(ev_json.read_text())
    assert ev["weights"] == "model" and "model weights" in capsys.readouterr().out
    assert ev["loss"] == pytest.approx(res["val_loss"], rel=1e-6) and ev["top1"] == res["top1"]
    # the EMA weights on request
    model, _ = model_from_checkpoint(out / "best.pt", weights="ema")
    assert all(torch.equal(v, state["ema"][k]) for k, v in model.state_dict().items())
    assert evaluate_cli.main([str(out), "--weights", "ema", "--json", str(ev_json)]) == 0
    assert json.loads(ev_json.read_text())["weights"] == "ema"
    # --threads: the same numbers with one thread (the test restores the count)
    threads = torch.get_num_threads()
    try:
        assert (
            evaluate_cli.main([str(out / "best.pt"), "--threads", "1", "--json", str(ev_json)]) == 0
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert json.loads(ev_json.read_text())["top1"] == res["top1"]
    capsys.readouterr()
    assert evaluate_cli.main([str(out), "--threads", "-1"]) == 2
    assert "--threads must be 0 or more, got -1" in capsys.readouterr().err


def test_evaluate_identity_is_the_model_with_the_identity_factors_forced(tmp_path, capsys):
    """``--permutation identity`` evaluates every dynamic layer with its identity factors forced:
    the numbers of the same weights built with ``hard_identity=True`` and evaluated hard, not
    those of the permutations the layers choose (a random generator chooses others)."""
    out = tmp_path / "run"
    argv = ["--train-subset", "64", "--val-subset", "100", "--batch-size", "32", "--epochs", "1",
            "--mixer-kwargs", '{"init": "random"}', "--output", str(out), "--no-tensorboard",
            *FAST]  # fmt: skip
    code, stdout, _ = run_cli(argv, capsys)
    assert code == 0, stdout
    ev_json = tmp_path / "ev.json"

    def evaluate(checkpoint, permutation):
        argv = [str(checkpoint), "--permutation", permutation, "--json", str(ev_json)]
        assert evaluate_cli.main([*argv, "--device", "cpu", "--no-progress"]) == 0
        return json.loads(ev_json.read_text()), capsys.readouterr().out

    every, printed = evaluate(out / "last.pt", "all")
    assert {"top1_hard", "top1_soft", "top1_identity"} <= set(every)
    assert every["permutation"] == "hard" and every["top1"] == every["top1_hard"]
    assert f"identity: top-1 {every['top1_identity']:.2f}%" in printed
    identity, _ = evaluate(out / "last.pt", "identity")
    hard, _ = evaluate(out / "last.pt", "hard")
    assert identity["permutation"] == "identity" and set(hard) == set(identity) - {
        "top1_identity", "top5_identity"} | {"top1_hard", "top5_hard"}  # fmt: skip
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    state["model_args"]["hard_identity"] = True
    torch.save(state, tmp_path / "forced.pt")
    forced, _ = evaluate(tmp_path / "forced.pt", "hard")
    assert forced["loss"] == pytest.approx(identity["loss"], rel=1e-6)
    assert (forced["top1"], forced["top5"]) == (identity["top1"], identity["top5"])
    assert identity["loss"] != pytest.approx(hard["loss"], rel=1e-4)
    assert every["top1_identity"] == identity["top1"] and every["top1_hard"] == hard["top1"]


def test_evaluate_assignment_replaces_the_trained_binarization(tmp_path, capsys):
    """``--assignment optimal`` evaluates a network trained with greedy 8 x 8 factors with the
    nearest permutations: every layer rebuilt so (the same weights), no negative decision margin
    where the greedy choice had some, the numbers of a checkpoint that says ``optimal``."""
    out = tmp_path / "run"
    argv = ["--train-subset", "64", "--val-subset", "100", "--batch-size", "32", "--epochs", "1",
            "--mixer-kwargs", '{"init": "random", "max_group_size": 64}', "--output", str(out),
            "--no-tensorboard", *FAST]  # fmt: skip
    code, stdout, _ = run_cli(argv, capsys)
    assert code == 0, stdout
    ev_json = tmp_path / "ev.json"

    def evaluate(checkpoint, *more):
        argv = [str(checkpoint), "--json", str(ev_json), "--device", "cpu", "--no-progress"]
        code = evaluate_cli.main([*argv, *more])
        return code, json.loads(ev_json.read_text()) if code == 0 else None, capsys.readouterr()

    _, trained, _ = evaluate(out / "last.pt")
    _, optimal, printed = evaluate(out / "last.pt", "--assignment", "optimal")
    assert trained["assignment"] == "auto" and optimal["assignment"] == "optimal"
    assert "permutations (optimal)" in printed.out
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    state["model_args"]["assignment"] = "optimal"
    torch.save(state, tmp_path / "optimal.pt")
    _, saved, _ = evaluate(tmp_path / "optimal.pt")
    assert (saved["loss"], saved["top1"]) == (optimal["loss"], optimal["top1"])
    assert optimal["loss"] != pytest.approx(trained["loss"], rel=1e-7, abs=0)
    with pytest.raises(ValueError, match="unknown assignment 'nearest'; valid: 'auto'"):
        evaluate_cli.evaluate_checkpoint(str(out), assignment="nearest", device="cpu")

    x = torch.randn(64, *state["input_size"], generator=torch.Generator().manual_seed(0))
    weights = None
    for options, negative in ((None, True), ({"assignment": "optimal"}, False)):
        model, loaded = model_from_checkpoint(out / "last.pt", layer_options=options)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, DynamicShuffle)}
        assert {(m.a, m.b) for m in layers.values()} == {(6, 8), (8, 8)}  # greedy above 6 x 6
        want = "auto" if options is None else "optimal"
        assert {m.assignment for m in layers.values()} == {want}
        assert loaded["model_args"].get("assignment") == (options or {}).get("assignment")
        state_dict = model.state_dict()
        weights = weights or state_dict
        assert all(torch.equal(v, weights[k]) for k, v in state_dict.items())
        calls = dynamic_layer_calls(model, x).values()
        margins = torch.cat([m.decision_margin(*a, **k).flatten() for m, a, k in calls])
        assert bool((margins < 0).any()) == negative

    # a model without dynamic layers: an error that names the checkpoint and the option
    plain = tmp_path / "plain"
    code, stdout, _ = run_cli(["--train-subset", "64", "--val-subset", "40", "--batch-size", "32",
                               "--epochs", "1", "--mixer", "shuffle", "--output", str(plain),
                               "--no-tensorboard", *FAST], capsys)  # fmt: skip
    assert code == 0, stdout
    code, _, printed = evaluate(plain, "--assignment", "optimal")
    assert code == 2 and "has no dynamic-shuffle layers (mixer 'shuffle'" in printed.err
    assert "{'assignment': 'optimal'}" in printed.err
    code, ev, _ = evaluate(plain)
    assert code == 0 and ev["assignment"] is None


def test_layer_options_reach_the_sds_layers_and_keep_the_other_keywords(tmp_path):
    """``model_from_checkpoint(layer_options=...)``: with ``pointwise="sds"`` the SDS layers'
    keywords are set too, beside the ones the checkpoint gave them."""
    model = create_model("shufflenet_v2_x0_5", num_classes=10, stem="cifar", mixer="dynamic",
                         pointwise="sds", pointwise_kwargs={"reduction": 4})  # fmt: skip
    path = checkpoint_of(model, tmp_path / "last.pt")
    rebuilt, loaded = model_from_checkpoint(path, layer_options={"assignment": "greedy"})
    assert loaded["model_args"]["pointwise_kwargs"] == {"reduction": 4, "assignment": "greedy"}
    assert loaded["model_args"]["assignment"] == "greedy"
    layers = [m for m in rebuilt.modules() if isinstance(m, DynamicShuffle)]
    assert (
        len(layers) > len([m for m in model.modules() if isinstance(m, StaticDynamicShuffle)]) > 0
    )
    assert {m.assignment for m in layers} == {"greedy"}
    assert {m.assignment for m in model.modules() if isinstance(m, DynamicShuffle)} == {"auto"}
    rebuilt_weights = rebuilt.state_dict()
    assert all(torch.equal(v, rebuilt_weights[k]) for k, v in model.state_dict().items())


def test_bf16_channels_last_run_keeps_float32_weights(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["--train-subset", "64", "--val-subset", "40", "--batch-size", "32",
                               "--epochs", "1", "--amp", "bf16", "--channels-last", "--output",
                               str(out), "--no-tensorboard", *FAST], capsys)  # fmt: skip
    assert code == 0, stdout
    res = json.loads((out / "results.json").read_text())
    assert res["amp"] == "bf16" and res["channels_last"] and math.isfinite(res["val_loss"])
    state = load_checkpoint(out / "last.pt")
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())


# -- failures: NaN loss and Ctrl-C ---------------------------------------------------------------


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    forward = torch.nn.CrossEntropyLoss.forward
    calls = {"n": 0}

    def poisoned(self, input, target):
        calls["n"] += 1
        loss = forward(self, input, target)
        return loss * float("nan") if calls["n"] == 3 else loss  # first step of epoch 2

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", poisoned)
    out = tmp_path / "run"
    code, _, err = run_cli(
        [
            "--train-subset",
            "64",
            "--val-subset",
            "40",
            "--batch-size",
            "32",
            "--epochs",
            "3",
            "--output",
            str(out),
            "--no-tensorboard",
            *FAST,
        ],
        capsys,
    )
    assert code == 1
    assert "loss became NaN or infinite in epoch 2" in err and str(out / "last.pt") in err
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1 and state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert len(list(csv.DictReader((out / "metrics.csv").open()))) == 1


def test_sigint_saves_a_checkpoint_and_resume_finishes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--train-subset", "128", "--val-subset", "40", "--batch-size", "16", "--epochs", "2",
            "--output", str(out), "--no-tensorboard", *FAST]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dyshuffle.cli", "train", *args, "--debug-step-delay", "0.4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    deadline = time.time() + 120
    while not (out / "config.yaml").exists() and time.time() < deadline:  # training has started
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted by SIGINT" in stderr and f"--resume {out}" in stderr
    state = load_checkpoint(out / "last.pt")
    assert 0 < state["global_step"] < 16 and state["step_in_epoch"] == state["global_step"] % 8
    code, stdout, _ = run_cli(["--resume", str(out / "last.pt"), *FAST], capsys)
    assert (
        code == 0
        and f"resuming at epoch {state['epoch'] + 1}, step {state['step_in_epoch']}" in stdout
    )
    final = load_checkpoint(out / "last.pt")
    assert final["epoch"] == 2 and final["global_step"] == 16


# -- the real CIFAR-10 (JPEG copy) ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason=f"{SHARED_CIFAR} is absent")
def test_real_cifar10_jpeg_trains_well_above_chance(tmp_path, capsys):
    out = tmp_path / "run"
    # a 5,000-image subset at 16x16 pixels for three epochs: about a minute on one CPU core
    # (36.3% top-1 when measured on the shared 2-core machine)
    code, stdout, _ = run_cli(["--data", "imagefolder", "--data-dir", str(SHARED_CIFAR),
                               "--cache-dir", str(tmp_path / "cache"), "--image-size", "16",
                               "--train-subset", "5000", "--val-subset", "1000", "--epochs", "3",
                               "--batch-size", "64", "--lr", "0.05", "--eval-every", "3",
                               "--output", str(out),
                               "--no-tensorboard", *FAST], capsys)  # fmt: skip
    assert code == 0, stdout
    res = json.loads((out / "results.json").read_text())
    state = load_checkpoint(out / "best.pt")
    assert state["class_names"] == CIFAR10_NAMES and state["input_size"] == [3, 16, 16]
    assert (
        res["num_train"] == 4992
        and res["num_val"] == 1000
        and res["model_args"]["mixer"] == "dynamic"
    )
    assert res["top1"] > 30.0, res  # chance is 10%


def test_ema_weights_of_a_checkpoint_without_ema_is_one_error(tmp_path, capsys):
    """``weights="ema"`` without saved EMA weights: the same message from every entry point."""
    message = (
        "the checkpoint holds no EMA weights (its run had no --ema); valid weights: auto, model"
    )
    model = create_model("shufflenet_v2_x0_5", num_classes=10, stem="cifar", mixer="shuffle")
    checkpoint_of(model, tmp_path / "last.pt")
    with pytest.raises(ValueError) as direct:
        resolve_weights(load_checkpoint(tmp_path / "last.pt"), "ema")
    with pytest.raises(ValueError) as rebuilt:
        model_from_checkpoint(tmp_path / "last.pt", weights="ema")
    assert str(direct.value) == str(rebuilt.value) == message
    assert evaluate_cli.main([str(tmp_path), "--weights", "ema", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"dyshuffle evaluate: error: {message}\n"


@pytest.mark.parametrize("pointwise", ["conv", "sds"])
def test_checkpoints_rebuild_their_model_when_layer_defaults_change(tmp_path, pointwise):
    """A checkpoint keeps the dynamic layers' defaults of its time: written with a generator
    width that is no longer the default, it rebuilds the same model (and says which arguments);
    one written before the defaults were saved loads with the earlier defaults, with a warning."""
    torch.manual_seed(0)
    # every dynamic layer with the generator width of a version whose default was 4
    kw = {"reduction": 4}
    if pointwise == "sds":
        kw["pointwise_kwargs"] = {"reduction": 4}
    model = create_model(
        "shufflenet_v2_x0_5",
        num_classes=10,
        stem="cifar",
        mixer="dynamic",
        pointwise=pointwise,
        **kw,
    ).eval()
    # the arguments as a version whose default reduction was 4 recorded them: without it
    args = {k: v for k, v in model.model_args.items() if k != "reduction"}
    if pointwise == "sds":
        args.pop("pointwise_kwargs")
    model.model_args = args
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    saved = {**layer_defaults(), "reduction": 4}
    checkpoint_of(model, tmp_path / "with.pt", layer_defaults=saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the saved defaults need no guess
        got, state = model_from_checkpoint(tmp_path / "with.pt")
    assert torch.equal(got(x), want)
    # the returned arguments rebuild that model: its weights load, shapes included
    create_model(**state["model_args"]).load_state_dict(got.state_dict())
    # written before layer_defaults existed: the earlier defaults, with a warning
    checkpoint_of(model, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="earlier defaults"):
        got, _ = model_from_checkpoint(tmp_path / "old.pt")
    assert torch.equal(got(x), want)
    # nothing fits: the error of the current defaults, naming the mismatch
    model.model_args = {**args, "mixer": "dynamic", "max_group_size": 4}
    checkpoint_of(model, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="size mismatch"):
        model_from_checkpoint(tmp_path / "bad.pt")
