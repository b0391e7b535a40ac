"""Run records and the tables and figures made from them.

Every finished run is one JSON object on one line of a ``*_runs.jsonl`` file (append-only);
``RESULTS.md`` is regenerated from those files, never edited by hand, so each number in it traces
back to a run record that names its command, commit and device.

Beside the tables, the report shows one figure per setting (data set, model, schedule, recipe and
device) that has the standard model (the fixed shuffle with the 1x1 convolutions) and another
configuration: each configuration's hard top-1 minus the standard model's, the table's
``hard - fixed`` column drawn (``figure_series`` gives the plotted numbers; the table's cells are
formatted from the same ``Delta`` values). ``write_figures`` writes them as PNG files named from
the setting (``hard-minus-fixed__<data set>__<model>__<epochs>ep__<recipe>__<device>.png``) into
``figures/`` in the folder of the (first) record file, ``results/figures/`` for
``results/*_runs.jsonl``; the report links them by their path relative to itself. Figures of
settings no longer in the records are removed from that folder, so each figure file there is
one the report links. Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ._atomic import atomic_write

__all__ = [
    "FIGURE_PREFIX",
    "REQUIRED_FIELDS",
    "Delta",
    "FigureRow",
    "Group",
    "SettingFigure",
    "append_record",
    "default_figure_dir",
    "figure_series",
    "group_records",
    "read_records",
    "render_results",
    "write_figures",
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
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{number}: not a JSON object ({e.msg})") from e
                if not isinstance(record, dict):
                    kind = type(record).__name__
                    raise ValueError(f"{p}:{number}: not a JSON object (a {kind})")
                records.append(record)
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
        return _mean_std(self.values(name))

    def paired_mean_std(self, name: str, other: str) -> tuple[float, float] | None:
        """Mean and spread over seeds of ``name - other`` of each run that has both."""
        pairs = [r for r in self.records if r.get(name) is not None and r.get(other) is not None]
        return _mean_std([float(r[name]) - float(r[other]) for r in pairs])

    @property
    def first(self) -> dict[str, Any]:
        return self.records[0]


def group_records(records: Sequence[dict[str, Any]]) -> list[Group]:
    """Group runs that differ only by seed (and by measured values); of records of the same
    configuration and seed, the last one.

    The parameter count is part of the key: runs with the same options but different defaults
    (a layer's default changed between commits) are different models and stay apart.
    """
    groups: dict[tuple, Group] = {}
    latest: dict[tuple, int] = {}  # a seed run again (sweep --force): its last record counts
    for i, r in enumerate(records):
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
        latest[(key, r.get("seed"))] = i
    for (key, _), i in sorted(latest.items(), key=lambda item: item[1]):
        groups.setdefault(key, Group(key)).records.append(records[i])
    return list(groups.values())


def _mean_std(vals: list[float]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (``nan`` for one value), ``None`` for none."""
    if not vals:
        return None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else math.nan


def _fmt(ms: tuple[float, float] | None, scale: float = 1.0, digits: int = 2) -> str:
    if ms is None:
        return "-"
    mean, std = ms
    if math.isnan(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


@dataclass(frozen=True)
class Delta:
    """A difference of two means (points of top-1), with its standard error when both sides
    have two seeds or more; ``str`` gives the table's cell."""

    diff: float
    se: float | None = None

    @classmethod
    def of(cls, values: Sequence[float], base: Sequence[float]) -> Delta:
        """Mean of ``values`` minus mean of ``base``; standard error
        ``sqrt(s1^2 / n1 + s2^2 / n2)`` when both have two values or more."""
        diff = statistics.fmean(values) - statistics.fmean(base)
        if len(values) < 2 or len(base) < 2:
            return cls(diff)
        var = statistics.variance
        return cls(diff, math.sqrt(var(values) / len(values) + var(base) / len(base)))

    def __str__(self) -> str:
        if self.se is None:
            return f"{self.diff:+.2f}"
        return f"{self.diff:+.2f} ± {self.se:.2f}"


def _delta(values: list[float], base: list[float]) -> str:
    """Difference of the means, with its standard error when both sides have two seeds or more
    (``sqrt(s1^2 / n1 + s2^2 / n2)``)."""
    return str(Delta.of(values, base))


def _context(key: tuple) -> tuple:
    """The key without mixer and options: what a fair comparison holds fixed."""
    return key[0], key[1], key[3], key[5], key[6], key[7]


def _standard(g: Group) -> bool:
    """The standard model: the fixed shuffle with its default options and the 1x1 convolutions."""
    return g.first["mixer"] == "shuffle" and g.key[4] == "-" and g.key[3] == "conv"


def _setting(key: tuple) -> tuple:
    """The context without the pointwise layer: data set, model, schedule and device."""
    ctx = _context(key)
    return ctx[:2] + ctx[3:]


def _baseline(groups: list[Group], g: Group) -> Group | None:
    """The standard model of ``g``'s setting: the fixed shuffle with the 1x1 convolutions (for
    an SDS row, the model whose convolutions it replaces)."""
    for other in groups:
        if _standard(other) and _setting(other.key) == _setting(g.key):
            return other
    return None


def _hard_minus_fixed(groups: list[Group], g: Group) -> tuple[Group, Delta] | None:
    """The table's ``hard - fixed`` of ``g``: its standard model and the difference of their
    hard top-1; ``None`` for the standard model itself, a setting without one, or no hard top-1."""
    base = _baseline(groups, g)
    if base is None or base is g or not g.values("top1_hard"):
        return None
    return base, Delta.of(g.values("top1_hard"), base.values("top1_hard"))


def _hard_by_seed(g: Group) -> dict[Any, float]:
    """The hard top-1 of each run of ``g`` that has one, by seed."""
    return {r["seed"]: float(r["top1_hard"]) for r in g.records if r.get("top1_hard") is not None}


def _seed_differences(a: Group, b: Group) -> list[float]:
    """Hard top-1 of ``a`` minus that of ``b`` at each seed both ran, in seed order."""
    va, vb = _hard_by_seed(a), _hard_by_seed(b)
    return [va[s] - vb[s] for s in sorted(va.keys() & vb.keys())]


def _same_seed_cell(g: Group, base: Group) -> str:
    """The table's ``same seed`` cell of ``g`` against its standard model ``base``: over the
    seeds both ran, the mean and sample standard deviation (none for one seed) of each seed's
    hard top-1 minus ``base``'s at that seed, and the number of those seeds; ``-`` when they
    share no seed."""
    diffs = _seed_differences(g, base)
    if not diffs:
        return "-"
    mean, std = _mean_std(diffs)
    spread = "" if math.isnan(std) else f" ± {std:.2f}"
    return f"{mean:+.2f}{spread} ({len(diffs)})"


#: issue 6's targets: the model and least schedule they are defined for, and their thresholds
TARGET_MODEL = "shufflenet_v2_x1_0"
TARGET_EPOCHS = 24
TARGET_SEEDS = 3
TARGET_GAIN = 0.5  # points of hard top-1 over the fixed shuffle
TARGET_HARD_SOFT = 0.1  # points between hard and soft top-1
TARGET_SDS_LOSS = 1.0  # points below the 1x1 convolutions at most ...
TARGET_SDS_PARAMS = 0.5  # ... with at most this share of their parameters


def _mean(g: Group, name: str) -> float:
    return statistics.fmean(g.values(name))


def _verdict(ok: bool, seeds: int) -> str:
    """``met`` / ``not met``, with the seeds when fewer than the target asks for."""
    word = "**met**" if ok else "not met"
    if seeds >= TARGET_SEEDS:
        return word
    return f"{word} on {seeds} seed{'s' * (seeds != 1)} (the target needs {TARGET_SEEDS})"


#: the option of an SDS run that holds the keywords of its static-dynamic shuffles
SDS_OPTIONS = "mixer.pointwise_kwargs"


@functools.cache
def _sds_params(model: str, kwargs_json: str = "{}") -> tuple[int, int] | None:
    """Parameters of ``model``'s 1x1 convolutions that SDS replaces, and of the SDS layers built
    with the keywords ``kwargs_json`` (a JSON object)."""
    try:
        from .layers import StaticDynamicShuffle
        from .models import create_model

        conv = create_model(model, pointwise="conv")
        sds = create_model(model, pointwise="sds", pointwise_kwargs=json.loads(kwargs_json))
    except (KeyError, ValueError, TypeError):  # another zoo's model, no SDS form, bad keywords
        return None
    from .macs import replaced_params

    return replaced_params(conv, sds, StaticDynamicShuffle)


#: the option of a run whose dynamic layers apply the identity factors to every input
FORCED_IDENTITY = "mixer.hard_identity"


def _forced_identity(g: Group) -> bool:
    """Runs of the ``hard_identity`` ablation: a dynamic layer that permutes no input by its own
    factors (a control, not a candidate for the best dynamic configuration)."""
    return bool((g.first.get("options") or {}).get(FORCED_IDENTITY))


def _paired_difference(a: Group, b: Group) -> tuple[float, int]:
    """Mean hard top-1 of ``a`` minus ``b`` over the seeds both have (an ablation runs the same
    seeds), and how many; over all their runs when they share no seed."""
    diffs = _seed_differences(a, b)
    if not diffs:
        n = min(len(a.values("top1_hard")), len(b.values("top1_hard")))
        return _mean(a, "top1_hard") - _mean(b, "top1_hard"), n
    return statistics.fmean(diffs), len(diffs)


def _target_row(groups: list[Group], base: Group) -> tuple[list[str], bool]:
    """The cells of issue 6's accuracy targets for the configurations of ``base``'s context,
    and whether the gain is met on enough seeds."""
    same = [g for g in groups if _context(g.key) == _context(base.key)]
    # the best dynamic configuration: among those with enough seeds when there are such
    dynamic = [
        g
        for g in same
        if g.first["mixer"] == "dynamic" and g.values("top1_hard") and not _forced_identity(g)
    ]
    seeded = [g for g in dynamic if len(g.records) >= TARGET_SEEDS]
    best = max(seeded or dynamic, key=lambda g: _mean(g, "top1_hard"), default=None)
    if best is None:
        return ["-", "not measured", "not measured", "not measured", "not measured"], False
    hard, n = _mean(best, "top1_hard"), len(best.records)
    ok = hard - _mean(base, "top1_hard") >= TARGET_GAIN
    seeds = min(n, len(base.records))
    gain = _delta(best.values("top1_hard"), base.values("top1_hard"))
    cells = [f"`{best.key[4]}`", f"{gain}: {_verdict(ok, seeds)}"]
    if best.values("top1_soft"):
        gap = hard - _mean(best, "top1_soft")
        cells.append(f"{gap:+.2f}: {_verdict(abs(gap) <= TARGET_HARD_SOFT, n)}")
    else:
        cells.append("not measured")
    # the control: the learned static permutation with the best configuration's options (the
    # same factors and sharing, no input dependence) when it was run, else with the defaults
    learned = {g.key[4]: g for g in same if g.first["mixer"] == "learned" and g.values("top1_hard")}
    control = learned.get(best.key[4]) or learned.get("-")
    if control is not None:
        diff = _mean(control, "top1_hard") - hard
        which = "" if control.key[4] == "-" else f" (`{control.key[4]}`)"
        control_seeds = min(n, len(control.records))
        cells.append(f"{diff:+.2f}{which}: {_verdict(diff < 0, control_seeds)}")
    else:
        cells.append("not measured")
    # the same configuration with the identity factors forced for every input: below it when
    # the gain needs the permutations to depend on the input
    forced_key = _options_key({**(best.first.get("options") or {}), FORCED_IDENTITY: True})
    forced = [g for g in same if g.first["mixer"] == "dynamic" and g.key[4] == forced_key]
    if forced and forced[0].values("top1_hard"):
        diff, paired = _paired_difference(forced[0], best)
        cells.append(f"{diff:+.2f}: {_verdict(diff < 0, paired)}")
    else:
        cells.append("not measured")
    return cells, ok and seeds >= TARGET_SEEDS


def _sds_cell(groups: list[Group], base: Group) -> str:
    """SDS against the 1x1 convolutions it replaces, both with the fixed shuffle: the best SDS
    configuration within the parameter bound (among those with enough seeds when there are
    such), else the best of all."""

    def sds_kwargs(g: Group) -> dict:
        return (g.first.get("options") or {}).get(SDS_OPTIONS) or {}

    def sds_only(g: Group) -> bool:
        """The fixed shuffle, options of the SDS layers at most, and their dynamic part kept
        and applied (``dynamic=False`` leaves a grouped 1x1 convolution, ``hard_identity``
        its sum with the identity: controls, not candidates)."""
        return (
            g.first["mixer"] == "shuffle"
            and set(g.first.get("options") or {}) <= {SDS_OPTIONS}
            and sds_kwargs(g).get("dynamic", True) is not False
            and not sds_kwargs(g).get("hard_identity", False)
        )

    def counts(g: Group) -> tuple[int, int] | None:  # (1x1 convolutions, SDS layers), cached
        return _sds_params(g.first["model"], json.dumps(sds_kwargs(g), sort_keys=True))

    def within_bound(g: Group) -> bool:
        c = counts(g)
        return c is not None and c[1] <= TARGET_SDS_PARAMS * c[0]

    sds = [
        g
        for g in groups
        if g.key[3] == "sds"
        and sds_only(g)
        and _setting(g.key) == _setting(base.key)
        and g.values("top1_hard")
    ]
    if not sds:
        return "not measured"
    pool = [g for g in sds if within_bound(g)] or sds
    seeded = [g for g in pool if len(g.records) >= TARGET_SEEDS]
    g = max(seeded or pool, key=lambda g: _mean(g, "top1_hard"))
    diff = _mean(g, "top1_hard") - _mean(base, "top1_hard")
    which = "" if g.key[4] == "-" else f" (`{g.key[4]}`)"
    seeds = min(len(g.records), len(base.records))
    if counts(g) is None:
        return f"{diff:+.2f}{which}, parameters of the replaced layers unknown"
    conv, replaced = counts(g)
    ok = diff >= -TARGET_SDS_LOSS and within_bound(g)
    return f"{diff:+.2f} at {replaced / conv:.2f}x the parameters{which}: {_verdict(ok, seeds)}"


def _targets(groups: list[Group], dataset: str) -> list[str]:
    """Issue 6's targets, checked against the records of one data set (one row per context)."""
    bases = [g for g in groups if g.key[0] == dataset and _standard(g)]
    if not bases:
        return []
    lines = [
        "### Targets of issue 6",
        "",
        f"Checked by the report against the rows above, per schedule: the best dynamic "
        f"configuration (by mean hard top-1, among those with {TARGET_SEEDS} seeds or more when "
        f"there are such; `hard_identity` runs are controls, not candidates) at least "
        f"+{TARGET_GAIN} points over the fixed shuffle, its hard top-1 "
        f"within {TARGET_HARD_SOFT} of its soft top-1, the learned static permutation below it "
        f"(with the same options when such runs exist, which the cell then names), the same "
        f"configuration with the identity factors forced for every input (`hard_identity`, "
        f"the layer's gradient path without a permutation that depends on the input) below it "
        f"on the seeds both have, "
        f"and SDS (with the fixed shuffle) within {TARGET_SDS_LOSS:g} point of the 1x1 "
        f"convolutions with at most {TARGET_SDS_PARAMS:g}x their parameters (of the replaced "
        f"layers; the best SDS configuration within that bound, named when not the default, "
        f"its runs without a dynamic part or with `hard_identity` being controls). "
        f"Each needs {TARGET_SEEDS} seeds on both sides. The targets are defined for "
        f"`{TARGET_MODEL}` at {TARGET_EPOCHS} epochs or more; other rows are proxies.",
        "",
        "| model | epochs | recipe | device | protocol | best dynamic (options) | dynamic - fixed "
        "| hard - soft | learned - dynamic | identity forced - dynamic | SDS - conv |",
        "|" + "---|" * 11,
    ]
    met = []
    for base in sorted(bases, key=lambda g: g.key[1:]):
        f = base.first
        target = f["model"] == TARGET_MODEL and int(f["epochs"]) >= TARGET_EPOCHS
        cells, gain = _target_row(groups, base)
        cells.append(_sds_cell(groups, base))
        if target and gain:
            met.append(f"{f['model']} at {f['epochs']} epochs ({f.get('recipe') or '-'})")
        lines.append(
            f"| {f['model']} | {f['epochs']} | {f.get('recipe', '') or '-'} | {f['device']} "
            f"| {'target' if target else 'proxy'} | " + " | ".join(cells) + " |"
        )
    lines.append("")
    if met:
        lines.append("The accuracy gain is met at: " + "; ".join(met) + ".")
    else:
        lines.append(
            f"**The accuracy gain (+{TARGET_GAIN} points) is not met** by any recorded run of "
            f"the target protocol."
        )
    lines.append("")
    return lines


def render_results(
    records: Sequence[dict[str, Any]],
    sources: Sequence[str] = (),
    figures: Mapping[tuple, str] | None = None,
) -> str:
    """``RESULTS.md``: mean ± standard deviation over seeds per configuration, per data set.

    Args:
        records: the run records.
        sources: the record files, named in the report's first lines.
        figures: the link (a path relative to the report) of each setting's figure, by
            ``SettingFigure.setting``; a data set with figures shows them above its table.
    """
    lines = [
        "# Results",
        "",
        "Generated by `dyshuffle sweep --report` from "
        + (", ".join(f"`{s}`" for s in sources) or "the run records")
        + ". Do not edit by hand: every row is the mean ± sample standard deviation over the",
        "seeds of runs recorded there, each with its command, commit and device. `hard - fixed`:",
        "the hard top-1 minus that of the fixed shuffle with the 1x1 convolutions (the standard",
        "model) of the same model, schedule and device; for SDS rows, the model whose 1x1",
        "convolutions they replace. `same seed`: the mean ± standard deviation of each seed's",
        "hard top-1 minus the standard model's at the same seed, over the seeds both ran (their",
        "number in brackets): the paired comparison. `hard - identity`: per run, the hard top-1",
        "minus that of the same weights with every dynamic layer's identity factors forced for",
        'every image (`permutation_mode(model, "identity")`, each layer\'s fixed cross-group',
        "shuffle): what the permutations the layers chose are worth to the trained network (0",
        "when they chose the identity factors for every image; `-` for runs recorded before it",
        "was measured).",
        "",
    ]
    if not records:
        lines.append("No runs recorded yet.")
        return "\n".join(lines) + "\n"
    groups = group_records(records)
    for dataset in sorted({g.key[0] for g in groups}):
        lines += [f"## {dataset}", ""]
        lines += _figure_links(groups, dataset, figures or {})
        lines.append(
            "| model | mixer | pointwise | options | epochs | recipe | device | seeds "
            "| top-1 hard (%) | top-1 soft (%) | hard - fixed (points ± s.e.) "
            "| hard - fixed, same seed (points ± s.d., seeds) "
            "| hard - identity (points) | params | MMACs | train img/s |"
        )
        lines.append("|" + "---|" * 16)
        rows = sorted((g for g in groups if g.key[0] == dataset), key=lambda g: g.key[1:])
        for g in rows:
            f = g.first
            hard = g.mean_std("top1_hard")
            compared = _hard_minus_fixed(groups, g)
            delta = "-" if compared is None else str(compared[1])
            same_seed = "-" if compared is None else _same_seed_cell(g, compared[0])
            throughput = g.mean_std("train_images_per_second")
            lines.append(
                f"| {f['model']} | {f['mixer']} | {f.get('pointwise', 'conv')} | {g.key[4]} "
                f"| {f['epochs']} | {f.get('recipe', '') or '-'} | {f['device']} "
                f"| {len(g.records)} | {_fmt(hard)} | {_fmt(g.mean_std('top1_soft'))} "
                f"| {delta} | {same_seed} "
                f"| {_fmt(g.paired_mean_std('top1_hard', 'top1_identity'))} "
                f"| {int(f['params']):,} | {float(f['macs']) / 1e6:.1f} "
                f"| {_fmt(throughput, 1.0, 0)} |"
            )
        lines.append("")
        lines += _targets(groups, dataset)
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


# --- figures -------------------------------------------------------------------------------

#: the start of every figure file's name (the report's figure folder holds only these)
FIGURE_PREFIX = "hard-minus-fixed__"
#: the resolution of the PNG files (dots per inch)
FIGURE_DPI = 100
#: a figure whose rows span more points than this has an axis logarithmic beyond ±1 point
LOG_SPAN = 15.0
#: the order of the kinds of configuration in a figure, and their colours
_KINDS = {
    "dynamic": "tab:blue",
    "learned": "tab:orange",
    "shuffle": "tab:gray",
    "none": "tab:red",
    "shuffle + sds": "tab:green",
}


@dataclass(frozen=True)
class FigureRow:
    """One configuration of a figure.

    Attributes:
        key: its group key (``Group.key``: the table row it is).
        label: its name as the table gives it (mixer, pointwise layer, options), shortened.
        kind: mixer, and ``+ sds`` when its 1x1 convolutions are static-dynamic shuffles.
        delta: its hard top-1 minus the standard model's: the table's ``hard - fixed`` cell.
        seeds: at each seed the standard model also ran, the hard top-1 minus the standard
            model's at that seed (the differences of the table's ``same seed`` cell), in seed
            order.
        unpaired: at each other seed, the hard top-1 minus the standard model's mean.
    """

    key: tuple
    label: str
    kind: str
    delta: Delta
    seeds: tuple[float, ...]
    unpaired: tuple[float, ...] = ()


@dataclass(frozen=True)
class SettingFigure:
    """The figure of one setting: its standard model and the other configurations, grouped by
    kind and best first within a kind.

    Attributes:
        setting: data set, model, epochs, recipe and device.
        name: the PNG file's name (stable: made from ``setting``).
        base: the standard model's runs.
        rows: the other configurations, in the figure's order (top to bottom).
    """

    setting: tuple
    name: str
    base: Group
    rows: tuple[FigureRow, ...]

    @property
    def title(self) -> str:
        dataset, model, epochs, recipe, device = self.setting
        extra = f", recipe {recipe}" if recipe else ""
        return f"{dataset}, {model}, {epochs} epochs, {device}{extra}"


def _slug(value: Any) -> str:
    return re.sub(r"[^a-z0-9_.=+-]+", "-", str(value).lower()).strip("-_") or "-"


def _figure_name(setting: tuple) -> str:
    dataset, model, epochs, recipe, device = setting
    parts = [dataset, model, f"{epochs}ep", *([recipe] if recipe else []), device]
    return FIGURE_PREFIX + "__".join(_slug(p) for p in parts) + ".png"


def _kind(g: Group) -> str:
    """The mixer, and the pointwise layer when not the 1x1 convolutions."""
    return g.first["mixer"] + ("" if g.key[3] == "conv" else f" + {g.key[3]}")


def _short_label(g: Group) -> str:
    """The table's mixer, pointwise layer and options, the ``mixer.`` prefix left out and the
    SDS keywords written as options of their own."""
    options = g.first.get("options") or {}
    parts = []
    for k in sorted(options):
        v = options[k]
        if k == SDS_OPTIONS and isinstance(v, dict):
            parts += [f"{kk}={v[kk]}" for kk in sorted(v)]
        else:
            parts.append(f"{k.removeprefix('mixer.')}={v}")
    return _kind(g) + (": " + ", ".join(parts) if parts else "")


def figure_series(records: Sequence[dict[str, Any]]) -> list[SettingFigure]:
    """The figures' numbers: per setting with a standard model and another configuration, the
    table's ``hard - fixed`` of each configuration (the same ``Delta``), in setting order."""
    groups = group_records(records)
    figures: dict[tuple, list[tuple[Group, FigureRow]]] = {}
    bases: dict[tuple, Group] = {}
    for g in groups:
        compared = _hard_minus_fixed(groups, g)
        if compared is None:
            continue
        base, delta = compared
        mean, base_seeds = _mean(base, "top1_hard"), _hard_by_seed(base)
        row = FigureRow(
            key=g.key,
            label=_short_label(g),
            kind=_kind(g),
            delta=delta,
            seeds=tuple(_seed_differences(g, base)),
            unpaired=tuple(
                v - mean for s, v in sorted(_hard_by_seed(g).items()) if s not in base_seeds
            ),
        )
        bases[_setting(g.key)] = base
        figures.setdefault(_setting(g.key), []).append((g, row))
    order = list(_KINDS)

    def place(item: tuple[Group, FigureRow]) -> tuple:
        g, row = item
        kind = order.index(row.kind) if row.kind in order else len(order)
        return kind, row.kind, -row.delta.diff, g.key[1:]

    return [
        SettingFigure(
            setting=setting,
            name=_figure_name(setting),
            base=bases[setting],
            rows=tuple(row for _, row in sorted(rows, key=place)),
        )
        for setting, rows in sorted(figures.items())
    ]


def _figure_links(groups: list[Group], dataset: str, figures: Mapping[tuple, str]) -> list[str]:
    """The figures of ``dataset`` (those in ``figures``), as markdown images."""

    def target_first(setting: tuple) -> tuple:
        _, model, epochs, *_ = setting
        return model != TARGET_MODEL or int(epochs) < TARGET_EPOCHS, setting

    settings = sorted(
        {_setting(g.key) for g in groups if g.key[0] == dataset and _setting(g.key) in figures},
        key=target_first,
    )
    if not settings:
        return []
    lines = [
        "### Hard top-1 against the standard model",
        "",
        "One figure per setting, the target protocol's first: each configuration's hard top-1 "
        "minus that of the standard model (the `hard - fixed` column of the table below), mean "
        "± its standard error when both have two seeds or more; each dot a seed's hard top-1 "
        "minus the standard model's at that seed (the differences of the `same seed` column), "
        "an open dot a seed the standard model did not run, against its mean; the dashed "
        f"line is issue 6's +{TARGET_GAIN} target. A figure whose rows span more than "
        f"{LOG_SPAN:g} points has an axis logarithmic beyond ±1 point.",
        "",
    ]
    for setting in settings:
        _, model, epochs, recipe, device = setting
        alt = f"{model}, {epochs} epochs, {recipe or '-'}, {device}: hard top-1 minus fixed"
        lines += [f"![{alt}]({figures[setting]})", ""]
    return lines


def default_figure_dir(record_files: Sequence[str | os.PathLike]) -> Path | None:
    """``figures/`` in the folder of the first record file (``results/figures`` for
    ``results/*_runs.jsonl``); ``None`` without record files."""
    return Path(record_files[0]).parent / "figures" if record_files else None


def _draw(fig: SettingFigure, f: IO[bytes]) -> None:
    """Render ``fig`` as a PNG into the binary file ``f`` (Agg, no display)."""
    import PIL.Image
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = fig.rows
    n = len(rows)
    # the labels' width (about 0.062 inch a character at 8 points), the plot, the right column
    width = 0.062 * max(len(r.label) for r in rows) + 7.0
    figure = Figure(figsize=(width, 1.7 + 0.27 * n), dpi=FIGURE_DPI, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ys = list(range(n))
    for y, row in zip(ys, rows):
        colour = _KINDS.get(row.kind, "black")
        ax.scatter(row.seeds, [y] * len(row.seeds), s=12, color=colour, alpha=0.45, lw=0, zorder=2)
        ax.scatter(
            row.unpaired, [y] * len(row.unpaired), s=12, fc="none", ec=colour, lw=0.8, zorder=2
        )
        ax.errorbar(
            row.delta.diff,
            y,
            xerr=row.delta.se,  # None: no error bar (a side with one seed)
            fmt="D",
            ms=5,
            color=colour,
            mec="black",
            mew=0.5,
            capsize=3,
            elinewidth=1.2,
            zorder=3,
        )
    ax.axvline(0.0, color="black", lw=1.0, zorder=1.8)
    ax.axvline(TARGET_GAIN, color="purple", lw=1.2, ls="--", zorder=1.8)
    extent = [v for r in rows for v in (*r.seeds, *r.unpaired, r.delta.diff)]
    extent += [r.delta.diff + s * r.delta.se for r in rows if r.delta.se for s in (-1, 1)]
    lo, hi = min([*extent, 0.0, -1.0]), max([*extent, TARGET_GAIN, 1.0])
    if hi - lo > LOG_SPAN:  # far rows would squeeze the target's scale: logarithmic beyond 1
        ax.set_xscale("symlog", linthresh=1.0, linscale=1.0)
        ax.set_xlim(lo * 1.3 if lo < -1.0 else lo - 0.2, hi * 1.3 if hi > 1.0 else hi + 0.2)
        steps = (0.5, 1, 2, 5, 10, 20, 50, 100)
        ticks = sorted({0.0, *(t for v in steps for t in (-v, v) if lo <= t <= hi)})
        ax.set_xticks(ticks, [f"{t:+g}" if t else "0" for t in ticks])
    else:
        pad = 0.08 * (hi - lo)
        ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(n - 0.5, -0.5)  # the first row on top
    ax.set_yticks(ys, [r.label for r in rows], fontsize=8)
    ax.set_axisbelow(True)
    ax.grid(axis="x", color="0.88", lw=0.6)
    ax.tick_params(axis="x", labelsize=8)
    right = ax.twinx()
    right.set_ylim(ax.get_ylim())
    right.set_yticks(
        ys, [f"{r.delta}  ({len(r.seeds) + len(r.unpaired)})" for r in rows], fontsize=8
    )
    base = fig.base
    ax.set_xlabel(
        f"hard top-1 minus the fixed shuffle with 1x1 convolutions "
        f"({_fmt(base.mean_std('top1_hard'))} %, {len(base.records)} seed"
        f"{'s' * (len(base.records) != 1)}), points\n"
        "right: mean ± standard error when both have two seeds or more (seeds)\n"
        "dots: each seed minus the fixed shuffle at that seed (open: a seed it did not run, "
        "minus its mean)",
        fontsize=8,
    )
    ax.set_title(fig.title, fontsize=9)
    handles = [
        Line2D([], [], ls="", marker="D", ms=5, color=c, mec="black", mew=0.5, label=k)
        for k, c in _KINDS.items()
        if any(r.kind == k for r in rows)
    ]
    handles.append(Line2D([], [], color="purple", ls="--", label=f"target +{TARGET_GAIN}"))
    figure.legend(handles=handles, fontsize=8, loc="outside lower center", ncol=len(handles))
    canvas.draw()
    # 256 colours are plenty for a plot: a palette PNG is a third of the RGBA one's size
    image = PIL.Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba())
    image.convert("RGB").quantize(256).save(f, format="png", optimize=True)


def write_figures(
    records: Sequence[dict[str, Any]], folder: str | os.PathLike
) -> dict[tuple, Path]:
    """Write the figure of every setting of ``figure_series(records)`` into ``folder`` (each
    atomically) and remove the figures of settings no longer there; return the paths by setting.
    """
    folder = Path(folder)
    figures = figure_series(records)
    if figures:
        folder.mkdir(parents=True, exist_ok=True)
    written = {
        fig.setting: atomic_write(folder / fig.name, functools.partial(_draw, fig))
        for fig in figures
    }
    if folder.is_dir():
        keep = {p.name for p in written.values()}
        for stale in folder.glob(FIGURE_PREFIX + "*.png"):
            if stale.name not in keep:
                stale.unlink()
    return written
