"""``dyshuffle sweep``: run a list of configurations x seeds, record every run, rebuild RESULTS.md.

A sweep file (YAML) names a training recipe, the seeds and the runs; each run is a mapping of
``dyshuffle train`` options that override the recipe::

    name: cifar10-v2-x1_0
    base: configs/cifar10_fast.yaml     # a dyshuffle train recipe
    dataset: cifar10-jpeg               # label of the data in the records
    records: results/cifar10_runs.jsonl # append-only run records
    seeds: [0, 1, 2]
    set: {}                             # options applied to every run (e.g. data_dir)
    runs:
      - {mixer: shuffle}
      - {mixer: dynamic, mixer_kwargs: {shared: false}}
      - {mixer: dynamic, mixer_kwargs: {noise: 1.0}, seeds: [0]}   # this run's own seeds

Every finished run is appended to ``records`` at once (a crash loses no finished run), and a run
already recorded for the same sweep, run, seed and device (the CUDA card's name, or ``cpu``) is
skipped, so an interrupted sweep continues where it stopped, and a machine of another kind runs
its own baselines. ``RESULTS.md`` is regenerated from all record files after each run.

``--set key=value`` applies an option to every run that does not set it itself. One that
changes what a run learns (``epochs``, ``lr``, ``mixer_kwargs`` ...) makes other runs: it is part
of their labels, folders and recorded options, so the runs recorded without it are neither
skipped for them nor averaged with them; one that only says where or how a run goes
(``data_dir``, ``workers``, ``threads`` ...: ``NEUTRAL_KEYS``) does not, whether it comes with
``--set`` or from a run of the file.

A run's own ``seeds`` replace the file's for that run (a question answered on one seed stays on
one seed when the file is run again); ``--seeds`` on the command line replaces both.

The jobs of a sweep are its (seed, run) pairs, seeds outer, runs inner; ``--shard K/W`` runs only
the jobs at positions ``i`` with ``i % W == K``, so ``W`` processes (``--shard 0/W`` ...
``--shard W-1/W``) share one sweep without running a job twice. ``--runs I ...`` keeps only the
file's runs at those positions in its ``runs`` list (from 0); with ``--force`` it trains one row
again (its new records count in the report, the earlier ones stay in the file).

Examples::

    dyshuffle sweep sweeps/cifar10_cpu.yaml --set data_dir=../shared/data/cifar10-jpeg.tgz
    dyshuffle sweep sweeps/cifar10_gpu.yaml --shard 1/6 --records runs/w1/cifar10_runs.jsonl
    dyshuffle sweep sweeps/cifar10_cpu_full.yaml --runs 33 --force   # train row 33 again
    dyshuffle sweep --report                       # only rebuild RESULTS.md from results/*.jsonl

Each report write also draws its figures (``dyshuffle.results.write_figures``) into
``figures/`` beside the first record file, ``results/figures/`` by default, and links them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ._atomic import atomic_write_text
from .results import (
    append_record,
    default_figure_dir,
    read_records,
    render_results,
    write_figures,
)

__all__ = ["SweepSpec", "load_spec", "main", "options_to_argv", "parse_shard", "run_sweep"]

SPEC_KEYS = ("name", "base", "dataset", "records", "seeds", "set", "runs", "report")
#: keys of a run that identify the model rather than its options
MODEL_KEYS = ("model", "mixer", "pointwise")
#: run options that are not about the method (kept out of the configuration's label)
PLUMBING_KEYS = ("data_dir", "output", "progress", "tensorboard", "cache_dir", "device", "workers")
#: options that change where and how a run is seen, never what it learns: one of them, from
#: ``--set`` or a run of the file, leaves a recorded run recorded (e.g. ``data_dir``, which
#: differs from machine to machine; ``grad_checkpointing``, which trains the same weights with
#: less memory)
NEUTRAL_KEYS = (
    *PLUMBING_KEYS,
    "threads",
    "log_every",
    "save_every_steps",
    "debug_step_delay",
    "grad_checkpointing",
)


class SweepSpec:
    """A parsed sweep file: ``name``, ``base``, ``dataset``, ``records``, ``seeds``, ``runs``
    (the option mappings, without their own ``seeds``, which are ``run_seeds``: a list per run,
    or ``None`` for the file's)."""

    def __init__(self, raw: dict[str, Any], path: Path) -> None:
        unknown = sorted(set(raw) - set(SPEC_KEYS))
        if unknown:
            raise ValueError(f"{path}: unknown sweep keys {unknown}; valid: {list(SPEC_KEYS)}")
        for key in ("name", "base", "runs"):
            if key not in raw:
                raise ValueError(f"{path}: sweep file needs {key!r}")
        self.path = path
        self.name = str(raw["name"])
        self.base = str(raw["base"])
        self.dataset = str(raw.get("dataset", ""))
        self.records = str(raw.get("records", "results/runs.jsonl"))
        self.report = str(raw.get("report", "RESULTS.md"))
        self.seeds = [int(s) for s in raw.get("seeds", [0])]
        self.common = dict(raw.get("set") or {})
        runs = raw["runs"]
        if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
            raise ValueError(f"{path}: 'runs' must be a list of option mappings")
        self.runs = [{k: v for k, v in r.items() if k != "seeds"} for r in runs]
        self.run_seeds = [
            _run_seeds(raw_run["seeds"], run, i, path) if "seeds" in raw_run else None
            for i, (raw_run, run) in enumerate(zip(runs, self.runs))
        ]

    def jobs(
        self, seeds: list[int] | None = None, only: list[int] | None = None
    ) -> list[tuple[int, dict[str, Any]]]:
        """The (seed, run) pairs of the sweep, seeds outer and runs inner: each run at its own
        seeds or else the file's, or every run at ``seeds`` when given. The seeds are taken in
        the file's order, then those that only some runs have, in increasing order. ``only``:
        the positions (from 0) in the file's ``runs`` of the runs to keep, the others left out.
        """
        keep = range(len(self.runs)) if only is None else self.check_positions(only)
        runs = [
            (run, rs) for i, (run, rs) in enumerate(zip(self.runs, self.run_seeds)) if i in keep
        ]
        if seeds is not None:
            return [(seed, run) for seed in seeds for run, _ in runs]
        own = sorted({s for _, rs in runs if rs for s in rs} - set(self.seeds))
        return [
            (seed, run)
            for seed in [*self.seeds, *own]
            for run, rs in runs
            if seed in (self.seeds if rs is None else rs)
        ]

    def check_positions(self, positions: list[int]) -> set[int]:
        """``positions`` as a set, each checked to be a run of the file (ValueError naming it)."""
        n = len(self.runs)
        for i in positions:
            if not 0 <= i < n:
                raise ValueError(f"--runs {i}: {self.path} has {n} runs, positions 0 .. {n - 1}")
        return set(positions)


def _run_seeds(seeds: Any, run: dict[str, Any], i: int, path: Path) -> list[int]:
    """The own ``seeds`` of run ``i`` (its options ``run``), checked."""
    if not (isinstance(seeds, list) and seeds and all(type(s) is int for s in seeds)):
        raise ValueError(
            f"{path}: run {i} ({run_label(run)}): 'seeds' must be a non-empty list of integers, "
            f"got {seeds!r}"
        )
    return list(seeds)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(raw).__name__}")
    return SweepSpec(raw, path)


def options_to_argv(options: dict[str, Any]) -> list[str]:
    """``dyshuffle train`` arguments equivalent to ``options`` (field -> ``--field-name``)."""
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value, sort_keys=True)]
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif value is None:
            continue
        else:
            argv += [flag, str(value)]
    return argv


def run_label(run: dict[str, Any]) -> str:
    """A stable name of a run: its options as ``key=value`` pairs."""
    return ",".join(f"{k}={json.dumps(run[k], sort_keys=True)}" for k in sorted(run)) or "base"


def _method_options(cfg_run: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, value in cfg_run.items():
        if key in MODEL_KEYS or key in PLUMBING_KEYS or key in ("seed", "epochs"):
            continue
        if key == "mixer_kwargs":
            options.update({f"mixer.{k}": v for k, v in value.items()})
        else:
            options[key] = value
    return options


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/W"`` -> ``(K, W)``: this process runs job ``i`` of the sweep when ``i % W == K``.

    Raises:
        ValueError: ``text`` is not two integers ``K/W`` with ``0 <= K < W``.
    """
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"--shard {text!r} is not K/W (e.g. 2/6: the third of six shards)")
    shard = (int(m.group(1)), int(m.group(2)))
    _check_shard(shard)
    return shard


def _check_shard(shard: tuple[int, int]) -> None:
    k, w = shard
    if not (w >= 1 and 0 <= k < w):
        valid = f"0/{w} .. {w - 1}/{w}" if w >= 1 else "W >= 1, e.g. 0/2 and 1/2"
        raise ValueError(f"--shard '{k}/{w}' needs 0 <= K < W; valid: {valid}")


def _done(records_path: Path, sweep: str) -> set[tuple[str, int, str]]:
    """``(run, seed, device)`` of the runs of ``sweep`` recorded in ``records_path``."""
    if not records_path.exists():
        return set()
    return {
        (r.get("run"), int(r["seed"]), r.get("device"))
        for r in read_records([records_path])
        if r.get("sweep") == sweep
    }


def device_name(choice: str) -> str:
    """The device a run's record names for a config's ``device`` (``auto``, ``cpu`` or ``cuda``):
    the CUDA card's name, or ``cpu``."""
    import torch

    from .train.distributed import resolve_device
    from .train.report import environment

    try:
        device = resolve_device(choice)
    except ValueError:  # CUDA asked for where there is none: training says so, not the skip check
        device = torch.device("cpu")
    return environment(device)["device"]


def write_report(
    report: str | Path, record_files: list[Path], figures: str | Path | None = None
) -> Path:
    """Regenerate the markdown report and its figures from every record file.

    Args:
        report: the markdown file.
        record_files: the run records (those that do not exist are left out).
        figures: the folder of the figures (default: ``figures/`` beside the first record file,
            ``results/figures`` for ``results/*_runs.jsonl``); the report links them relative to
            its own folder.
    """
    files = [p for p in record_files if p.exists()]
    records = read_records(files)
    report = Path(report)
    folder = Path(figures) if figures is not None else default_figure_dir(files)
    links = {}
    if folder is not None:
        for setting, path in write_figures(records, folder).items():
            links[setting] = Path(os.path.relpath(path, report.parent)).as_posix()
    text = render_results(records, [str(p) for p in files], links)
    return atomic_write_text(report, text)


def run_sweep(
    spec: SweepSpec,
    seeds: list[int] | None = None,
    extra: dict[str, Any] | None = None,
    output_root: str | Path = "runs/sweeps",
    dry_run: bool = False,
    force: bool = False,
    records: str | Path | None = None,
    report: str | Path | None = None,
    time_budget: float = 0.0,
    expect: float = 0.0,
    note: str | None = None,
    shard: tuple[int, int] | None = None,
    only: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Train every run x seed of ``spec`` not yet recorded; return the new records.

    Seeds are the outer loop, so a sweep cut short still has every configuration at the first
    seeds. ``time_budget`` (seconds, 0: none) stops before a run that would likely overrun it,
    judging by the longest run so far (``expect`` seconds before any has finished). ``note``
    (e.g. "4 runs shared the GPU") is recorded with every run and listed under its table in the
    report. ``only``: the positions (from 0) in the file's ``runs`` of the runs to train, the
    others left out (with ``force``: rerun one row of a file). ``shard=(K, W)`` runs only the
    jobs (seed, run), counted seeds outer and runs inner from 0 among those of ``only``, whose
    position ``i`` has ``i % W == K``; the other jobs belong to the other shards.
    """
    from .train.checkpoint import load_checkpoint
    from .train.config import resolve_config
    from .train.engine import train

    if shard is not None:
        _check_shard(shard)
    records_path = Path(records or spec.records)
    report = report or spec.report
    done = set() if force else _done(records_path, spec.name)
    new: list[dict[str, Any]] = []
    start, longest = time.monotonic(), float(expect)
    # the jobs in sweep order: seeds outer, runs inner
    jobs = spec.jobs(seeds, only)
    if shard is not None:
        k, w = shard
        jobs = jobs[k::w]  # positions i with i % w == k
        print(f"[sweep] shard {k}/{w}: {len(jobs)} job(s) of this sweep", flush=True)
    # a --set option that changes what a run learns (epochs, lr, a mixer option ...) makes
    # another run: part of its label (so the run recorded without it is not taken for it), of
    # its folder and of its record's options (so the report does not average the two)
    changing = {k: v for k, v in (extra or {}).items() if k not in NEUTRAL_KEYS}
    for seed, run in jobs:
        run = {**changing, **run}  # the run's own options win, as in training
        # a neutral option that a run of the file sets itself is left out of its label and
        # recorded options alike (the same training with or without it)
        learned = {k: v for k, v in run.items() if k not in NEUTRAL_KEYS}
        label = run_label(learned)
        elapsed = time.monotonic() - start
        if time_budget and not dry_run and elapsed + longest > time_budget:
            print(f"[sweep] time budget {time_budget:.0f}s: stopping after {elapsed:.0f}s")
            return new
        folder = re.sub(r"[^A-Za-z0-9_.=,+-]+", "", label)[:120] or "base"
        out = Path(output_root) / spec.name / folder / f"seed{seed}"
        options = {**spec.common, **(extra or {}), **run, "seed": seed, "output": str(out)}
        cfg = resolve_config({k: v for k, v in options.items() if v is not None}, spec.base)
        # a run is done on the device it ran on: RESULTS.md compares runs of one device only
        device = device_name(cfg.device)
        if (label, seed, device) in done:
            print(f"[sweep] {spec.name}: {label} seed {seed} already recorded on {device}, skipped")
            continue
        argv = ["--config", spec.base, *options_to_argv(options)]
        command = shlex.join(["dyshuffle", "train", *argv])
        print(f"[sweep] {command}", flush=True)
        if dry_run:
            continue
        resume = None
        if (out / "last.pt").exists():  # an interrupted run of this sweep: continue it
            resume = load_checkpoint(out / "last.pt")
            finished = int(resume.get("epoch", 0)) >= cfg.epochs and not resume.get("step_in_epoch")
            if force and finished:  # a rerun asked for: the finished run's folder moves aside
                aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                out.rename(aside)
                print(f"[sweep] --force: the finished run moved to {aside}", flush=True)
                resume = None
            else:
                print(f"[sweep] resuming {out}", flush=True)
        t0 = time.monotonic()
        result = train(cfg, resume=resume, command=command).results
        longest = max(longest, time.monotonic() - t0)
        record = {
            "sweep": spec.name,
            "run": label,
            "dataset": spec.dataset or cfg.data,
            "model": cfg.model,
            "mixer": cfg.mixer,
            "pointwise": cfg.pointwise,
            "options": _method_options(learned),
            "recipe": spec.name,
            "base": spec.base,
            "sweep_settings": {**spec.common, **(extra or {})},
            "seed": seed,
            "epochs": cfg.epochs,
            "top1_hard": result["top1"],
            "top1_soft": result.get("top1_soft"),
            "top1_identity": result.get("top1_identity"),
            "top5": result["top5"],
            "params": result["params"],
            "macs": result["macs"],
            "train_seconds": result["train_seconds"],
            "train_images_per_second": result.get("images_per_s"),
            "device": result["device"],
            "amp": cfg.amp,
            "batch_size": cfg.batch_size,
            "torch": result.get("torch"),
            "commit": result.get("commit"),
            "command": command,
        }
        if note:
            record["note"] = note
        append_record(records_path, record)
        done.add((label, seed, device))  # a later job of the same run (e.g. a twin) is skipped
        # the records file itself and the record files beside it (results/*_runs.jsonl)
        write_report(report, sorted({records_path, *records_path.parent.glob("*_runs.jsonl")}))
        new.append(record)
    return new


def _parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set takes key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.replace("-", "_")] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dyshuffle sweep",
        description="Run configurations x seeds from a sweep file; record each run; rebuild "
        "the results report.",
    )
    parser.add_argument("spec", nargs="?", help="sweep file (YAML), e.g. sweeps/cifar10_cpu.yaml")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="run every run at these seeds (the file's and the runs' own are ignored)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a train option for every run (repeatable), e.g. --set data_dir=PATH",
    )
    parser.add_argument("--output-root", default="runs/sweeps", help="parent of the run folders")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--force", action="store_true", help="rerun runs already recorded")
    parser.add_argument(
        "--report", action="store_true", help="only regenerate the report from the records"
    )
    parser.add_argument(
        "--records",
        nargs="+",
        help="record files for --report (default: results/*_runs.jsonl); with a sweep file, "
        "the one file new runs are appended to (default: the file's 'records')",
    )
    parser.add_argument(
        "--output", help="report path (default: RESULTS.md, or the sweep file's 'report')"
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="start no run that would likely end past this many seconds (0: no limit)",
    )
    parser.add_argument(
        "--expect",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --time-budget: how long a run is expected to take until one has finished "
        "(then the longest so far); a run that would not fit is not started",
    )
    parser.add_argument(
        "--note",
        help="a condition of these runs that the options do not say, recorded with each run and "
        "listed in the report (e.g. 'three runs shared the GPU at a time')",
    )
    parser.add_argument(
        "--runs",
        type=int,
        nargs="+",
        metavar="I",
        help="only these runs of the file: their positions in its 'runs' list, from 0 "
        "(e.g. with --force, rerun one row)",
    )
    parser.add_argument(
        "--shard",
        metavar="K/W",
        help="run only job i (seeds outer, runs inner, from 0) with i %% W == K, e.g. 2/6; "
        "W processes with shards 0/W .. W-1/W share the sweep",
    )
    args = parser.parse_args(argv)
    try:
        if args.report:
            files = [Path(p) for p in args.records] if args.records else None
            files = files or sorted(Path("results").glob("*_runs.jsonl"))
            out = write_report(args.output or "RESULTS.md", files)
            print(f"wrote {out} from {len(files)} record file(s)")
            return 0
        if not args.spec:
            parser.error("give a sweep file, or --report")
        shard = parse_shard(args.shard) if args.shard is not None else None
        spec = load_spec(args.spec)
        new = run_sweep(
            spec,
            seeds=args.seeds,
            extra=_parse_set(args.overrides),
            output_root=args.output_root,
            dry_run=args.dry_run,
            force=args.force,
            records=args.records[0] if args.records else None,
            report=args.output,
            time_budget=args.time_budget,
            expect=args.expect,
            note=args.note,
            shard=shard,
            only=args.runs,
        )
    except ValueError as e:
        print(f"dyshuffle sweep: error: {e}", file=sys.stderr)
        return 2
    where = args.records[0] if args.records else spec.records
    print(f"[sweep] {len(new)} new run(s) recorded in {where}")
    return 0
