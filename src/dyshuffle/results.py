"""Run records and the tables made from them.

Every finished run is one JSON object on one line of a ``*_runs.jsonl`` file (append-only);
``RESULTS.md`` is regenerated from those files, never edited by hand, so each figure in it traces
back to a run record that names its command, commit and device.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "REQUIRED_FIELDS",
    "Group",
    "append_record",
    "group_records",
    "read_records",
    "render_results",
]

#: fields every run record carries
REQUIRED_FIELDS = (
    "dataset",
    "model",
    "mixer",
    "options",
    "seed",
    "epochs",
    "top1_hard",
    "top1_soft",
    "params",
    "macs",
    "train_seconds",
    "device",
    "commit",
    "command",
)
# accuracies are in percent, as ``results.json`` of a training run gives them


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one run record as a JSON line (flushed and fsynced: a crash loses no earlier run)."""
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        raise ValueError(f"run record lacks fields {missing}; required: {list(REQUIRED_FIELDS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """All records of the given JSONL files; a malformed line raises naming file and line."""
    records = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{number}: not a JSON object ({e.msg})") from e
    return records


def _options_key(options: dict[str, Any] | None) -> str:
    if not options:
        return "-"
    return ", ".join(f"{k}={options[k]}" for k in sorted(options))


@dataclass
class Group:
    """The runs of one configuration (everything but the seed equal)."""

    key: tuple
    records: list[dict[str, Any]] = field(default_factory=list)

    def values(self, name: str) -> list[float]:
        return [float(r[name]) for r in self.records if r.get(name) is not None]

    def mean_std(self, name: str) -> tuple[float, float] | None:
        vals = self.values(name)
        if not vals:
            return None
        return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else math.nan

    @property
    def first(self) -> dict[str, Any]:
        return self.records[0]


def group_records(records: Sequence[dict[str, Any]]) -> list[Group]:
    """Group runs that differ only by seed (and by measured values).

    The parameter count is part of the key: runs with the same options but different defaults
    (a layer's default changed between commits) are different models and stay apart.
    """
    groups: dict[tuple, Group] = {}
    for r in records:
        key = (
            r["dataset"],
            r["model"],
            r["mixer"],
            r.get("pointwise", "conv"),
            _options_key(r.get("options")),
            r["epochs"],
            r.get("recipe", ""),
            r["device"],
            # a default changed between runs: same options, another architecture
            int(r["params"]),
        )
        groups.setdefault(key, Group(key)).records.append(r)
    return list(groups.values())


def _fmt(ms: tuple[float, float] | None, scale: float = 1.0, digits: int = 2) -> str:
    if ms is None:
        return "-"
    mean, std = ms
    if math.isnan(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _delta(values: list[float], base: list[float]) -> str:
    """Difference of the means, with its standard error when both sides have two seeds or more
    (``sqrt(s1^2 / n1 + s2^2 / n2)``)."""
    diff = statistics.fmean(values) - statistics.fmean(base)
    if len(values) < 2 or len(base) < 2:
        return f"{diff:+.2f}"
    var = statistics.variance
    se = math.sqrt(var(values) / len(values) + var(base) / len(base))
    return f"{diff:+.2f} ± {se:.2f}"


def _context(key: tuple) -> tuple:
    """The key without mixer and options: what a fair comparison holds fixed."""
    return key[0], key[1], key[3], key[5], key[6], key[7]


def _baseline(groups: list[Group], g: Group) -> Group | None:
    """The fixed-shuffle group with the same data set, model, pointwise, schedule and device."""
    for other in groups:
        fixed = other.first["mixer"] == "shuffle" and other.key[4] == "-"
        if fixed and _context(other.key) == _context(g.key):
            return other
    return None


def render_results(records: Sequence[dict[str, Any]], sources: Sequence[str] = ()) -> str:
    """``RESULTS.md``: mean ± standard deviation over seeds per configuration, per data set."""
    lines = [
        "# Results",
        "",
        "Generated by `dyshuffle sweep --report` from "
        + (", ".join(f"`{s}`" for s in sources) or "the run records")
        + ". Do not edit by hand: every row is the mean ± sample standard deviation over the",
        "seeds of runs recorded there, each with its command, commit and device.",
        "",
    ]
    if not records:
        lines.append("No runs recorded yet.")
        return "\n".join(lines) + "\n"
    groups = group_records(records)
    for dataset in sorted({g.key[0] for g in groups}):
        lines += [f"## {dataset}", ""]
        lines.append(
            "| model | mixer | pointwise | options | epochs | recipe | device | seeds "
            "| top-1 hard (%) | top-1 soft (%) | hard - fixed (points ± s.e.) | params | MMACs "
            "| train img/s |"
        )
        lines.append("|" + "---|" * 14)
        rows = sorted((g for g in groups if g.key[0] == dataset), key=lambda g: g.key[1:])
        for g in rows:
            f = g.first
            base = _baseline(groups, g)
            delta = "-"
            hard = g.mean_std("top1_hard")
            if base is not None and base is not g and hard is not None:
                delta = _delta(g.values("top1_hard"), base.values("top1_hard"))
            throughput = g.mean_std("train_images_per_second")
            lines.append(
                f"| {f['model']} | {f['mixer']} | {f.get('pointwise', 'conv')} | {g.key[4]} "
                f"| {f['epochs']} | {f.get('recipe', '') or '-'} | {f['device']} "
                f"| {len(g.records)} | {_fmt(hard)} | {_fmt(g.mean_std('top1_soft'))} "
                f"| {delta} | {int(f['params']):,} | {float(f['macs']) / 1e6:.1f} "
                f"| {_fmt(throughput, 1.0, 0)} |"
            )
        lines.append("")
        lines.append("Commands (one per configuration, seed varies):")
        lines.append("")
        for g in rows:
            lines.append(f"- `{g.first['command']}` (commit {str(g.first['commit'])[:10]})")
        lines.append("")
        notes = sorted({r["note"] for g in rows for r in g.records if r.get("note")})
        if notes:
            lines += ["Conditions recorded with the runs:", ""]
            lines += [f"- {n}" for n in notes]
            lines.append("")
    return "\n".join(lines) + "\n"
