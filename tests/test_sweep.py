"""``dyshuffle sweep``: runs x seeds become records, the report is rebuilt, reruns are skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dyshuffle.sweep import load_spec, main, options_to_argv, run_label
from dyshuffle.train.config import add_config_arguments, build_parser, resolve_config


def test_options_to_argv_round_trips_through_the_train_parser():
    options = {
        "mixer": "dynamic",
        "mixer_kwargs": {"shared": False, "tau": 0.5},
        "channels_last": True,
        "tensorboard": False,
        "epochs": 3,
        "betas": [0.9, 0.99],
    }
    parser = build_parser("t", "t")
    add_config_arguments(parser)
    parsed = vars(parser.parse_args(options_to_argv(options)))
    cfg = resolve_config(parsed)
    for key, value in options.items():
        assert getattr(cfg, key) == value, key


def test_run_label_is_order_independent():
    assert run_label({"a": 1, "b": {"y": 2, "x": 1}}) == run_label({"b": {"x": 1, "y": 2}, "a": 1})


def test_sweep_records_runs_and_skips_recorded_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump(
            dict(
                data="digits",
                epochs=1,
                batch_size=64,
                train_subset=256,
                val_subset=128,
                progress=False,
                tensorboard=False,
                threads=1,
            )
        )
    )
    spec = dict(
        name="tiny",
        base="base.yaml",
        dataset="digits",
        records="results/digits_runs.jsonl",
        report="RESULTS.md",
        seeds=[0],
        runs=[{"mixer": "shuffle"}, {"mixer": "dynamic", "mixer_kwargs": {"mode": "soft"}}],
    )
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    assert load_spec("sweep.yaml").seeds == [0]
    assert main(["sweep.yaml", "--note", "tiny test"]) == 0
    lines = (tmp_path / "results/digits_runs.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["mixer"] for r in records] == ["shuffle", "dynamic"]
    dyn = records[1]
    assert dyn["options"] == {"mixer.mode": "soft"}
    assert all(r["note"] == "tiny test" for r in records)
    assert dyn["top1_soft"] is not None and records[0]["top1_soft"] is None
    assert dyn["top1_identity"] is not None and records[0]["top1_identity"] is None
    assert dyn["macs"] > records[0]["macs"]  # the generators are counted
    for r in records:
        assert 0.0 <= r["top1_hard"] <= 100.0 and r["command"].startswith("dyshuffle train")
    report = (tmp_path / "RESULTS.md").read_text()
    assert "| dynamic |" in report and "| shuffle |" in report and "mixer.mode=soft" in report
    assert "- tiny test" in report
    # its figure beside the records, linked from the report
    (figure,) = (tmp_path / "results/figures").iterdir()
    assert f"](results/figures/{figure.name})" in report
    # a second call finds both runs recorded and trains nothing
    capsys.readouterr()
    assert main(["sweep.yaml"]) == 0
    assert "already recorded on cpu" in capsys.readouterr().out
    assert len((tmp_path / "results/digits_runs.jsonl").read_text().splitlines()) == 2
    # runs recorded on another device are not this device's: the shuffle is run again here
    path = tmp_path / "results/digits_runs.jsonl"
    other = dict(records[0], device="NVIDIA H200")
    path.write_text(json.dumps(other) + "\n" + lines[1] + "\n")
    assert main(["sweep.yaml"]) == 0
    again = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["mixer"], r["device"]) for r in again] == [
        ("shuffle", "NVIDIA H200"),
        ("dynamic", "cpu"),
        ("shuffle", "cpu"),
    ]
    report = (tmp_path / "RESULTS.md").read_text()  # of these three records
    # the report alone is regenerated from the records
    (tmp_path / "RESULTS.md").unlink()
    assert main(["--report"]) == 0
    assert (tmp_path / "RESULTS.md").read_text() == report


def test_bad_sweep_file_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "base": "b.yaml", "runs": [], "sed": [1]}))
    assert main([str(bad)]) == 2
    assert "unknown sweep keys ['sed']" in capsys.readouterr().err


def test_a_run_folder_left_by_a_crash_is_resumed(tmp_path, monkeypatch, capsys):
    """Records lost after the run wrote its checkpoint: the rerun continues from last.pt."""
    monkeypatch.chdir(tmp_path)
    base = dict(data="digits", epochs=1, train_subset=128, val_subset=64, progress=False)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**base, "tensorboard": False}))
    spec = dict(
        name="crash", base="base.yaml", records="r/x_runs.jsonl", runs=[{"mixer": "shuffle"}]
    )
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["s.yaml"]) == 0
    first = json.loads((tmp_path / "r/x_runs.jsonl").read_text())
    (tmp_path / "r/x_runs.jsonl").unlink()
    capsys.readouterr()
    assert main(["s.yaml"]) == 0
    assert "resuming" in capsys.readouterr().out
    again = json.loads((tmp_path / "r/x_runs.jsonl").read_text())
    assert again["top1_hard"] == first["top1_hard"] and again["params"] == first["params"]


def test_force_reruns_a_finished_run_and_the_report_reads_any_records_file(
    tmp_path, monkeypatch, capsys
):
    """--force trains a finished run again (its folder moved aside), and the report counts the
    seed once; a records file of any name is in its report."""
    monkeypatch.chdir(tmp_path)
    base = dict(data="digits", epochs=1, train_subset=128, val_subset=64, progress=False)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**base, "tensorboard": False}))
    spec = dict(name="f", base="base.yaml", records="r/mine.jsonl", report="r/R.md",
                runs=[{"mixer": "shuffle"}])  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["s.yaml"]) == 0
    assert "| shuffle |" in (tmp_path / "r/R.md").read_text()
    capsys.readouterr()
    assert main(["s.yaml", "--force"]) == 0
    out = capsys.readouterr().out
    assert "resuming" not in out and "--force: the finished run moved to" in out
    first, second = map(json.loads, (tmp_path / "r/mine.jsonl").read_text().splitlines())
    assert second["seed"] == first["seed"] and second["train_seconds"] != first["train_seconds"]
    assert len(list((tmp_path / "runs/sweeps/f/mixer=shuffle").glob("seed0.replaced-*"))) == 1
    rows = [
        line for line in (tmp_path / "r/R.md").read_text().splitlines() if "| shuffle |" in line
    ]
    assert len(rows) == 1 and "| 1 |" in rows[0]  # one seed, the rerun's record


def test_a_set_option_that_changes_training_is_another_run(tmp_path, monkeypatch, capsys):
    """`--set epochs=2` after a 1-epoch sweep trains again, in its own folder, and the report
    keeps the two apart; `--set threads=2` (how, not what) leaves the recorded run recorded."""
    monkeypatch.chdir(tmp_path)
    base = dict(data="digits", epochs=1, train_subset=128, val_subset=64, progress=False)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**base, "tensorboard": False}))
    spec = dict(name="s", base="base.yaml", records="r/x_runs.jsonl", report="r/R.md",
                runs=[{"mixer": "shuffle"}, {"mixer": "shuffle", "lr": 0.05}])  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["s.yaml"]) == 0
    capsys.readouterr()
    assert main(["s.yaml", "--set", "threads=2"]) == 0
    assert capsys.readouterr().out.count("already recorded on cpu") == 2
    assert main(["s.yaml", "--set", "epochs=2", "--set", "lr=0.2"]) == 0
    out = capsys.readouterr().out
    assert "already recorded" not in out and "resuming" not in out
    records = [json.loads(line) for line in (tmp_path / "r/x_runs.jsonl").read_text().splitlines()]
    assert [(r["epochs"], r["options"]) for r in records] == [
        (1, {}),
        (1, {"lr": 0.05}),
        (2, {"lr": 0.2}),
        (2, {"lr": 0.05}),  # the run's own option wins over --set, as in training
    ]
    assert records[2]["sweep_settings"] == {"epochs": 2, "lr": 0.2}
    assert (tmp_path / "runs/sweeps/s/epochs=2,lr=0.2,mixer=shuffle/seed0/last.pt").is_file()
    report = (tmp_path / "r/R.md").read_text().splitlines()
    assert len([line for line in report if "| shuffle |" in line]) == 4
    capsys.readouterr()
    assert main(["s.yaml", "--set", "epochs=2", "--set", "lr=0.2"]) == 0
    assert capsys.readouterr().out.count("already recorded on cpu") == 2


def test_a_neutral_option_of_a_run_in_the_file_is_not_another_run(tmp_path, monkeypatch, capsys):
    """A run of the file that sets a neutral option itself (``grad_checkpointing``: the same
    training; ``threads``) has the label and recorded options of the run without it: recorded
    once, then skipped, and trained with the option when it comes first."""
    monkeypatch.chdir(tmp_path)
    base = dict(data="digits", epochs=1, train_subset=128, val_subset=64, progress=False)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**base, "tensorboard": False}))
    runs = [{"mixer": "shuffle", "grad_checkpointing": True, "threads": 2}, {"mixer": "shuffle"}]
    spec = dict(name="n", base="base.yaml", records="r/x_runs.jsonl", report="r/R.md", runs=runs)
    (tmp_path / "n.yaml").write_text(yaml.safe_dump(spec))
    assert main(["n.yaml"]) == 0
    out = capsys.readouterr().out
    assert "--grad-checkpointing --mixer shuffle --threads 2" in out  # trained with them
    assert out.count("already recorded on cpu") == 1  # and the second is the same run
    records = [json.loads(line) for line in (tmp_path / "r/x_runs.jsonl").read_text().splitlines()]
    assert [(r["run"], r["options"]) for r in records] == [('mixer="shuffle"', {})]
    assert (tmp_path / "runs/sweeps/n/mixer=shuffle/seed0/last.pt").is_file()
    capsys.readouterr()
    assert main(["n.yaml"]) == 0  # and both are recorded for the next time
    assert capsys.readouterr().out.count("already recorded on cpu") == 2


def _dry_run_commands(argv: list[str], capsys) -> list[str]:
    capsys.readouterr()
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    return [line for line in out if line.startswith("[sweep] dyshuffle train")]


def test_shards_split_the_jobs_disjointly_in_sweep_order(tmp_path, monkeypatch, capsys):
    """Shards 0/2 and 1/2 interleave back to the unsharded job list (seeds outer, runs inner)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump(dict(data="digits", epochs=1, train_subset=64, val_subset=32))
    )
    runs = [{"mixer": "shuffle"}, {"mixer": "dynamic"}, {"mixer": "none"}]
    spec = dict(name="shards", base="base.yaml", records="r/s_runs.jsonl", seeds=[0], runs=runs)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    argv = ["s.yaml", "--seeds", "3", "4"]  # the --seeds override sets the job list
    full = _dry_run_commands(argv, capsys)
    assert len(full) == 2 * 3 and len(set(full)) == len(full)
    assert ["--seed 3" in c for c in full] == [True] * 3 + [False] * 3  # seeds outer
    shards = [_dry_run_commands([*argv, "--shard", f"{k}/2"], capsys) for k in range(2)]
    assert shards[0] == full[0::2] and shards[1] == full[1::2]
    assert set(shards[0]).isdisjoint(shards[1])
    # more shards than jobs: the last ones have nothing to do
    assert _dry_run_commands([*argv, "--shard", "5/7"], capsys) == full[5:]
    assert _dry_run_commands([*argv, "--shard", "6/7"], capsys) == []


def test_runs_keeps_the_rows_named_by_position_and_shards_count_among_them(
    tmp_path, monkeypatch, capsys
):
    """``--runs I ...``: only those rows of the file, at their own seeds or ``--seeds``; a position
    outside the file is an error that names it and the valid range."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(dict(data="digits", epochs=1)))
    runs = [{"mixer": "shuffle"}, {"mixer": "dynamic", "seeds": [2, 3]}, {"mixer": "none"}]
    spec = dict(name="rows", base="base.yaml", records="r/w_runs.jsonl", seeds=[0], runs=runs)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    loaded = load_spec("s.yaml")
    assert [(s, r["mixer"]) for s, r in loaded.jobs(only=[1])] == [(2, "dynamic"), (3, "dynamic")]
    assert [(s, r["mixer"]) for s, r in loaded.jobs(only=[2, 0])] == [(0, "shuffle"), (0, "none")]
    assert [(s, r["mixer"]) for s, r in loaded.jobs([7], only=[1])] == [(7, "dynamic")]
    full = _dry_run_commands(["s.yaml"], capsys)
    picked = _dry_run_commands(["s.yaml", "--runs", "1"], capsys)
    assert picked == [c for c in full if "--mixer dynamic" in c] and len(picked) == 2
    assert _dry_run_commands(["s.yaml", "--runs", "1", "--shard", "1/2"], capsys) == picked[1:]
    for bad in ("3", "-1"):
        assert main(["s.yaml", "--dry-run", "--runs", "0", bad]) == 2
        err = capsys.readouterr().err
        assert f"--runs {bad}: s.yaml has 3 runs, positions 0 .. 2" in err


def test_a_runs_own_seeds_replace_the_files_and_keep_its_label(tmp_path, monkeypatch, capsys):
    """A run with ``seeds`` runs at those only; its label (what the records match) is the same as
    without them; ``--seeds`` on the command line applies to every run."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(dict(data="digits", epochs=1)))
    runs = [
        {"mixer": "shuffle"},
        {"mixer": "dynamic", "seeds": [0]},
        {"mixer": "none", "seeds": [5, 1]},
    ]
    spec = dict(name="own", base="base.yaml", records="r/o_runs.jsonl", seeds=[1, 0], runs=runs)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    loaded = load_spec("s.yaml")
    assert loaded.runs == [{"mixer": "shuffle"}, {"mixer": "dynamic"}, {"mixer": "none"}]
    assert loaded.run_seeds == [None, [0], [5, 1]]
    jobs = [(seed, run["mixer"]) for seed, run in loaded.jobs()]
    # the file's seeds in its order, then the runs' own (5), runs inner
    assert jobs == [(1, "shuffle"), (1, "none"), (0, "shuffle"), (0, "dynamic"), (5, "none")]
    commands = _dry_run_commands(["s.yaml"], capsys)
    assert [
        (c.split("--seed ")[1].split()[0], c.split("--mixer ")[1].split()[0]) for c in commands
    ] == [(str(seed), mixer) for seed, mixer in jobs]
    assert all("seeds" not in c for c in commands)  # not a training option
    assert [run_label(run) for run in loaded.runs] == [
        run_label({"mixer": m}) for m in ("shuffle", "dynamic", "none")
    ]
    # --seeds: every run at the seeds given
    assert [(s, r["mixer"]) for s, r in loaded.jobs([7])] == [
        (7, "shuffle"),
        (7, "dynamic"),
        (7, "none"),
    ]
    assert len(_dry_run_commands(["s.yaml", "--seeds", "7"], capsys)) == 3
    # a bad list names the run and the value
    for bad in ([], "0", [0.5], [True]):
        runs[1]["seeds"] = bad
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(dict(spec, runs=runs)))
        assert main(["s.yaml", "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert 'run 1 (mixer="dynamic")' in err and f"got {bad!r}" in err


def test_an_unknown_set_option_is_named_with_the_closest_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"data": "digits"}))
    spec = {"name": "x", "base": "base.yaml", "runs": [{"mixer": "shuffle"}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["s.yaml", "--dry-run", "--set", "seeed=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown option 'seeed' (did you mean 'seed'?)" in err and "Traceback" not in err


def test_bad_shard_names_the_value(capsys):
    for bad in ("2/2", "x", "1/0"):
        assert main(["unused.yaml", "--dry-run", "--shard", bad]) == 2
        assert f"--shard {bad!r}" in capsys.readouterr().err


def test_expected_run_length_keeps_a_run_that_would_not_fit_from_starting(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(dict(data="digits", epochs=1)))
    spec = dict(name="tb", base="base.yaml", records="r/t_runs.jsonl", runs=[{"mixer": "shuffle"}])
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["s.yaml", "--time-budget", "100", "--expect", "200"]) == 0
    out = capsys.readouterr().out
    assert "time budget 100s: stopping" in out and "dyshuffle train" not in out
    assert not (tmp_path / "r/t_runs.jsonl").exists()


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_resolve_to_valid_runs(path):
    """Every run of every sweep file in the repository is a valid training config whose model
    builds (a device session must not find a typo in its last minutes)."""
    from dyshuffle.layers import DynamicShuffle, StaticDynamicShuffle
    from dyshuffle.train.engine import build_model

    spec = load_spec(path)
    base = REPO / spec.base
    assert base.is_file(), f"{path.name}: base {spec.base} does not exist"
    labels = set()
    for run in spec.runs:
        cfg = resolve_config({**spec.common, **run}, str(base))
        model = build_model(cfg, 10, (3, 32, 32))
        sds = [m for m in model.modules() if isinstance(m, StaticDynamicShuffle)]
        assert bool(sds) == (cfg.pointwise == "sds")
        inner = {id(m) for layer in sds for m in layer.modules()}
        mixers = [m for m in model.modules() if isinstance(m, DynamicShuffle)]
        layers = [m for m in mixers if id(m) not in inner]
        if cfg.mixer in ("dynamic", "learned"):  # the options reach the layers
            assert layers and {type(m).__name__ for m in layers} == {
                {"dynamic": "DynamicShuffle", "learned": "LearnedShuffle"}[cfg.mixer]
            }
            keys = (
                "shared",
                "init",
                "mode",
                "noise",
                "reduction",
                "descriptor_grad",
                "hard_identity",
            )
            for key in keys:
                if key in cfg.mixer_kwargs:
                    assert {getattr(m, key) for m in layers} == {cfg.mixer_kwargs[key]}, key
        else:
            assert not layers
        labels.add(json.dumps(run, sort_keys=True))
    assert len(labels) == len(spec.runs), f"{path.name}: a run is listed twice"


def _records(tmp_path: Path, epochs: int = 24) -> Path:
    """Run records of two settings (24 and 48 epochs) with the standard model and others."""
    base = dict(
        dataset="cifar10-jpeg", model="shufflenet_v2_x1_0", options={}, epochs=epochs,
        params=1000, macs=2e6, train_seconds=1.0, device="cpu", commit="abc", command="c",
    )  # fmt: skip
    rows = []
    for epochs_ in (epochs, 48):
        for s, (fixed, dyn) in enumerate([(80.0, 80.5), (80.4, 81.1), (79.9, 80.2)]):
            common = {**base, "epochs": epochs_, "seed": s}
            rows.append({**common, "mixer": "shuffle", "top1_hard": fixed, "top1_soft": None})
            rows.append({**common, "mixer": "dynamic", "top1_hard": dyn, "top1_soft": dyn - 5})
    path = tmp_path / "results" / "cifar10_runs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_report_links_each_figure_it_writes_and_is_regenerated_byte_for_byte(tmp_path, monkeypatch):
    import re

    monkeypatch.chdir(tmp_path)
    _records(tmp_path)
    figures = tmp_path / "results" / "figures"
    figures.mkdir(parents=True)
    (figures / "notes.txt").write_text("not a figure of the report")
    assert main(["--report"]) == 0
    first = (tmp_path / "RESULTS.md").read_bytes()
    pngs = sorted(figures.glob("*.png"))
    assert [p.name for p in pngs] == [
        "hard-minus-fixed__cifar10-jpeg__shufflenet_v2_x1_0__24ep__cpu.png",
        "hard-minus-fixed__cifar10-jpeg__shufflenet_v2_x1_0__48ep__cpu.png",
    ]
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", first.decode())
    # every figure file is linked, every link is a figure file (relative to the report)
    assert sorted(links) == [f"results/figures/{p.name}" for p in pngs]
    assert all(0 < p.stat().st_size < 150_000 for p in pngs)
    # again from the same records: the same markdown, byte for byte, and the same figures
    images = [p.read_bytes() for p in pngs]
    assert main(["--report"]) == 0
    assert (tmp_path / "RESULTS.md").read_bytes() == first
    assert [p.read_bytes() for p in pngs] == images
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # a setting gone from the records takes its figure along; other files stay
    _records(tmp_path, epochs=12)
    assert main(["--report"]) == 0
    names = sorted(p.name for p in figures.iterdir())
    assert names == [
        "hard-minus-fixed__cifar10-jpeg__shufflenet_v2_x1_0__12ep__cpu.png",
        "hard-minus-fixed__cifar10-jpeg__shufflenet_v2_x1_0__48ep__cpu.png",
        "notes.txt",
    ]
    text = (tmp_path / "RESULTS.md").read_text()
    assert "__24ep__" not in text and "__12ep__" in text
    # a report elsewhere links the same figures relative to itself
    (tmp_path / "docs").mkdir()
    assert main(["--report", "--output", "docs/R.md"]) == 0
    assert "](../results/figures/hard-minus-fixed__" in (tmp_path / "docs/R.md").read_text()
