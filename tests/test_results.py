"""Run records and the RESULTS.md table made from them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dyshuffle.results import REQUIRED_FIELDS, append_record, read_records, render_results


def record(mixer: str, seed: int, top1: float, **extra) -> dict:
    base = dict(
        dataset="cifar10",
        model="shufflenet_v2_x1_0",
        mixer=mixer,
        options={},
        seed=seed,
        epochs=24,
        top1_hard=top1,
        top1_soft=top1,
        params=1000,
        macs=2_000_000,
        train_seconds=1.0,
        device="cpu",
        commit="abc",
        command=f"dyshuffle train --mixer {mixer}",
    )
    base.update(extra)
    return base


def test_append_and_read_round_trip(tmp_path):
    path = tmp_path / "runs.jsonl"
    append_record(path, record("shuffle", 0, 0.5))
    append_record(path, record("dynamic", 0, 0.6))
    rows = read_records([path])
    assert [r["mixer"] for r in rows] == ["shuffle", "dynamic"]
    assert all(len(line) > 0 for line in path.read_text().splitlines())


def test_append_rejects_incomplete_records(tmp_path):
    bad = record("shuffle", 0, 0.5)
    del bad["commit"]
    with pytest.raises(ValueError, match=r"lacks fields \['commit'\]"):
        append_record(tmp_path / "r.jsonl", bad)
    assert "commit" in REQUIRED_FIELDS


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(record("shuffle", 0, 0.5)) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"runs.jsonl:2"):
        read_records([path])


def test_a_line_that_is_json_but_no_object_names_file_and_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(record("shuffle", 0, 0.5)) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"runs.jsonl:2: not a JSON object \(a list\)"):
        read_records([path])


def test_a_seed_recorded_twice_counts_once_with_its_last_record():
    rows = [record("shuffle", 0, 80.0), record("shuffle", 1, 82.0), record("shuffle", 0, 90.0)]
    text = render_results(rows, ["runs.jsonl"])
    assert text == render_results(rows[1:], ["runs.jsonl"])


def test_table_mean_spread_and_delta():
    rows = [record("shuffle", s, v) for s, v in enumerate([80.0, 82.0])]
    rows += [record("dynamic", s, v, top1_soft=v + 1.0) for s, v in enumerate([85.0, 87.0])]
    text = render_results(rows, ["runs.jsonl"])
    fixed = next(line for line in text.splitlines() if "| shuffle |" in line)
    dyn = next(line for line in text.splitlines() if "| dynamic |" in line)
    assert "81.00 ± 1.41" in fixed  # mean and sample std of 80 and 82
    assert "86.00 ± 1.41" in dyn and "87.00 ± 1.41" in dyn
    # 86 - 81 points, standard error sqrt(2 / 2 + 2 / 2) of the difference of the means
    assert "| +5.00 ± 1.41 |" in dyn
    one_seed = render_results([record("shuffle", 0, 80.0), record("dynamic", 0, 81.0)])
    assert "| +1.00 |" in one_seed  # no standard error from one seed
    assert "| 2 |" in dyn  # seeds


def test_runs_with_other_options_are_separate_configurations():
    rows = [
        record("dynamic", 0, 0.8, options={"tau": 1.0}),
        record("dynamic", 0, 0.7, options={"tau": 0.5}),
    ]
    text = render_results(rows)
    assert text.count("| dynamic |") == 2
    assert "tau=0.5" in text and "tau=1.0" in text


def test_same_options_with_other_parameter_counts_stay_apart():
    # e.g. a layer default changed between the commits of two runs
    rows = [record("dynamic", 0, 0.8, params=1000), record("dynamic", 1, 0.7, params=900)]
    text = render_results(rows)
    assert text.count("| dynamic |") == 2
    assert "| 1 |" in text and "| 2 |" not in text  # one seed each
    assert "| 1,000 |" in text and "| 900 |" in text


def test_empty_report():
    assert "No runs recorded yet." in render_results([])


def test_notes_are_listed_under_the_table():
    note = "three runs shared the GPU"
    rows = [record("shuffle", 0, 80.0, note=note), record("shuffle", 1, 81.0, note=note)]
    rows.append(record("dynamic", 0, 82.0))
    text = render_results(rows)
    assert text.count("- three runs shared the GPU") == 1
    assert "Conditions recorded with the runs:" in text
    assert "Conditions" not in render_results([record("shuffle", 0, 80.0)])


def test_commit_named_in_the_environment_wins(monkeypatch):
    # a device machine may receive a .git of another commit beside the tree it runs
    from dyshuffle.bench import _git_commit
    from dyshuffle.train.report import git_commit

    monkeypatch.setenv("DYSHUFFLE_COMMIT", "0123456789abcdef")
    assert git_commit() == "0123456789abcdef"
    assert _git_commit() == "0123456"
    monkeypatch.setenv("DYSHUFFLE_COMMIT", "0123456789abcdef-dirty")
    assert _git_commit() == "0123456+modified"
    monkeypatch.delenv("DYSHUFFLE_COMMIT")
    assert git_commit() != "0123456789abcdef"


def _targets_section(text: str) -> str:
    return text.split("### Targets of issue 6", 1)[1].split("Commands", 1)[0]


def _target_cells(text: str, model: str = "shufflenet_v2_x1_0") -> list[str]:
    row = next(line for line in _targets_section(text).splitlines() if f"| {model} |" in line)
    return [c.strip() for c in row.strip("|").split("|")]


def test_targets_met_when_the_best_dynamic_gains_on_three_seeds():
    rows = [record("shuffle", s, v) for s, v in enumerate([80.0, 80.2, 79.8])]
    # soft within 0.1 of hard; the learned static permutation below the dynamic one
    rows += [record("dynamic", s, v, top1_soft=v - 0.05) for s, v in enumerate([81.0, 81.2, 80.8])]
    rows += [record("learned", s, v) for s, v in enumerate([80.1, 80.3, 79.9])]
    # a better configuration with one seed only does not count as the best
    rows.append(record("dynamic", 0, 90.0, options={"tau": 0.5}))
    cells = _target_cells(render_results(rows))
    assert cells[4] == "target" and cells[5] == "`-`"
    assert cells[6].startswith("+1.00 ± ") and cells[6].endswith(": **met**")
    assert cells[7] == "+0.05: **met**"
    assert cells[8] == "-0.90: **met**"
    assert "The accuracy gain is met at: shufflenet_v2_x1_0 at 24 epochs" in render_results(rows)


def test_learned_control_takes_the_best_configurations_options():
    fixed = [record("shuffle", s, v) for s, v in enumerate([80.0, 80.2, 79.8])]
    best = {"mixer_kwargs": {"shared": False}}
    rows = fixed + [record("dynamic", s, 81.0, options=best) for s in range(3)]
    rows += [record("learned", s, 79.0) for s in range(3)]  # default options: below
    cells = _target_cells(render_results(rows))
    assert cells[8] == "-2.00: **met**"
    # the learned permutation with the same options is the control once it was run
    rows += [record("learned", s, 81.5, options=best) for s in range(2)]
    cells = _target_cells(render_results(rows))
    assert cells[8] == (
        "+0.50 (`mixer_kwargs={'shared': False}`): not met on 2 seeds (the target needs 3)"
    )
    # the control's seeds do not decide whether the gain itself is met
    assert "The accuracy gain is met at: shufflenet_v2_x1_0 at 24 epochs" in render_results(rows)


def test_forced_identity_control_is_the_best_configuration_with_hard_identity():
    fixed = [record("shuffle", s, v) for s, v in enumerate([80.0, 80.2, 79.8])]
    best = {"mixer.shared": False}
    rows = fixed + [record("dynamic", s, 81.0, options=best) for s in range(3)]
    assert _target_cells(render_results(rows))[9] == "not measured"
    # the same layer with the identity factors forced: as good, so the gain is not the
    # permutations'; better, it is still a control and not the best dynamic configuration
    forced = {**best, "mixer.hard_identity": True}
    same = rows + [record("dynamic", s, 81.0, options=forced) for s in range(3)]
    cells = _target_cells(render_results(same))
    assert cells[5] == "`mixer.shared=False`" and cells[9] == "+0.00: not met"
    better = rows + [record("dynamic", s, 81.5, options=forced) for s in range(2)]
    cells = _target_cells(render_results(better))
    assert cells[5] == "`mixer.shared=False`"
    assert cells[9] == "+0.50: not met on 2 seeds (the target needs 3)"
    below = rows + [record("dynamic", s, 80.0, options=forced) for s in range(3)]
    assert _target_cells(render_results(below))[9] == "-1.00: **met**"
    # compared on the seeds both have: two more seeds of the best row do not move it
    more = same + [record("dynamic", s, 85.0, options=best) for s in (3, 4)]
    cells = _target_cells(render_results(more))
    assert cells[6].startswith("+2.60") and cells[9] == "+0.00: not met"
    # with no seed in common, their means
    apart = rows + [record("dynamic", s, 81.5, options=forced) for s in (7, 8, 9)]
    assert _target_cells(render_results(apart))[9] == "+0.50: not met"
    # a forced run of other options is not this configuration's control
    other = rows + [
        record("dynamic", s, 80.0, options={"mixer.hard_identity": True}) for s in range(3)
    ]
    assert _target_cells(render_results(other))[9] == "not measured"


def test_targets_not_met_and_too_few_seeds_are_said():
    fixed = [record("shuffle", s, v) for s, v in enumerate([80.0, 80.2, 79.8])]
    small = fixed + [record("dynamic", s, v) for s, v in enumerate([80.2, 80.4, 80.0])]
    cells = _target_cells(render_results(small))
    assert cells[6].endswith(": not met") and cells[6].startswith("+0.20")
    assert cells[8] == "not measured"  # no learned runs
    assert "**The accuracy gain (+0.5 points) is not met**" in render_results(small)
    # a gain on two seeds is reported, but it does not meet the target
    two = fixed + [record("dynamic", s, 85.0) for s in range(2)]
    cells = _target_cells(render_results(two))
    assert cells[6].endswith("**met** on 2 seeds (the target needs 3)")
    assert "is not met** by any recorded run" in render_results(two)


def test_targets_label_other_models_and_schedules_as_proxies():
    rows = [record("shuffle", 0, 80.0, model="shufflenet_v2_x0_5")]
    rows += [record("shuffle", 0, 80.0, epochs=4), record("dynamic", 0, 81.0, epochs=4)]
    text = render_results(rows)
    assert _target_cells(text, "shufflenet_v2_x0_5")[4] == "proxy"
    epochs4 = next(line for line in _targets_section(text).splitlines() if "| 4 |" in line)
    assert "| proxy |" in epochs4
    assert "is not met** by any recorded run of the target protocol" in text


def test_sds_target_compares_with_the_replaced_convolutions():
    model = "shufflenet_v2_x0_5"
    rows = [record("shuffle", s, v, model=model) for s, v in enumerate([80.0, 80.2, 79.8])]
    sds = [
        record("shuffle", s, v, model=model, pointwise="sds", params=900)
        for s, v in enumerate([79.5, 79.7, 79.3])
    ]
    cells = _target_cells(render_results(rows + sds), model)
    # shufflenet_v2_x0_5: 28,771 SDS parameters in place of 127,296 (test_macs checks the count)
    assert cells[10] == "-0.50 at 0.23x the parameters: **met**"
    worse = [dict(r, top1_hard=r["top1_hard"] - 1.0) for r in sds]
    assert _target_cells(render_results(rows + worse), model)[10].endswith(": not met")
    other = [dict(r, model="resnet_x") for r in rows + sds]
    assert (
        "parameters of the replaced layers unknown"
        in _target_cells(render_results(other), "resnet_x")[10]
    )


def test_sds_target_takes_the_best_configuration_within_the_parameter_bound():
    model = "shufflenet_v2_x0_5"
    rows = [record("shuffle", s, v, model=model) for s, v in enumerate([80.0, 80.2, 79.8])]

    def sds(top1: float, kwargs: dict | None) -> list[dict]:
        options = {"mixer.pointwise_kwargs": kwargs} if kwargs else {}
        return [
            record("shuffle", s, top1, model=model, pointwise="sds", options=options)
            for s in range(3)
        ]

    default = sds(75.0, None)
    dense = sds(79.5, {"static": "dense"})  # 54,433 parameters in place of 127,296: 0.43x
    wide = sds(80.5, {"static": "dense", "max_group_size": 32})  # 0.68x: above the bound
    # no dynamic part: a grouped 1x1 convolution (a control), never the SDS of the target
    control = sds(81.0, {"static": "dense", "dynamic": False})
    # the identity factors forced: (S + I) x, the permutations never applied (a control too)
    forced = sds(81.0, {"static": "dense", "hard_identity": True})
    every = rows + default + dense + wide + control + forced
    cell = _target_cells(render_results(every), model)[10]
    assert cell == (
        "-0.50 at 0.43x the parameters (`mixer.pointwise_kwargs={'static': 'dense'}`): **met**"
    )
    # nothing within the bound: the best of all, not met
    cell = _target_cells(render_results(rows + wide), model)[10]
    assert cell.startswith("+0.50 at 0.68x the parameters") and cell.endswith(": not met")
    # with fewer seeds than the target, a configuration is taken only when none has enough
    cell = _target_cells(render_results(rows + default + dense[:2]), model)[10]
    assert cell == "-5.00 at 0.23x the parameters: not met"


def test_sds_rows_are_compared_with_the_model_whose_convolutions_they_replace():
    conv = [record("shuffle", s, v) for s, v in enumerate([80.0, 82.0])]
    sds = [record("shuffle", s, v, pointwise="sds") for s, v in enumerate([70.0, 72.0])]
    dense = [
        record("shuffle", s, v, pointwise="sds", options={"mixer.pointwise_kwargs": {"k": 1}})
        for s, v in enumerate([75.0, 77.0])
    ]
    lines = render_results(conv + sds + dense).splitlines()
    rows = [line for line in lines if line.startswith("| shufflenet_v2_x1_0 | shuffle | sds |")]
    assert len(rows) == 2
    # both SDS rows against the 1x1 convolutions (81.00), not the default SDS row
    assert "| -10.00 ± 1.41 |" in rows[0] and "| -5.00 ± 1.41 |" in rows[1]
    # without the standard model of that setting there is nothing to compare with
    alone = render_results(sds)
    row = next(
        line
        for line in alone.splitlines()
        if line.startswith("| shufflenet_v2_x1_0 | shuffle | sds |")
    )
    assert row.strip("|").split("|")[_column(alone, "hard - fixed (")].strip() == "-"


def _table_cell(text: str, key: tuple, column: str = "hard - fixed (") -> str:
    """The cell under the header that starts with ``column`` (by default `hard - fixed`) of the
    table row of the configuration with group key ``key``."""
    _dataset, model, mixer, pointwise, options, epochs, recipe, device, params = key
    start = f"| {model} | {mixer} | {pointwise} | {options} | {epochs} | {recipe or '-'} "
    start += f"| {device} |"
    (row,) = [line for line in text.splitlines() if line.startswith(start)]
    return row.strip("|").split("|")[_column(text, column)].strip()


def _figure_records() -> list[dict]:
    rows = [record("shuffle", s, v) for s, v in enumerate([80.0, 80.2, 79.8])]
    rows += [record("dynamic", s, v) for s, v in enumerate([81.0, 80.5, 80.9])]
    rows.append(record("dynamic", 0, 79.0, options={"mixer.shared": False}))  # one seed
    rows += [record("learned", s, v) for s, v in enumerate([79.5, 80.1])]
    rows.append(record("learned", 7, 79.7))  # a seed the standard model did not run
    sds = {"mixer.pointwise_kwargs": {"static": "dense"}}
    rows += [record("shuffle", s, 70.0 + s, pointwise="sds", options=sds) for s in range(2)]
    # another schedule: the standard model alone, and another with no standard model
    rows.append(record("shuffle", 0, 85.0, epochs=48))
    rows += [record("dynamic", 0, 60.0, epochs=2), record("learned", 0, 61.0, epochs=2)]
    return rows


def test_figure_series_plots_the_tables_hard_minus_fixed():
    from dyshuffle.results import figure_series

    rows = _figure_records()
    text = render_results(rows)
    (fig,) = figure_series(rows)  # the 48- and 2-epoch settings have nothing to compare
    assert fig.setting == ("cifar10", "shufflenet_v2_x1_0", 24, "", "cpu")
    assert fig.name == "hard-minus-fixed__cifar10__shufflenet_v2_x1_0__24ep__cpu.png"
    assert fig.base.key[2] == "shuffle" and len(fig.base.records) == 3
    # every configuration but the standard model, each the table's number
    assert len(fig.rows) == 4
    for row in fig.rows:
        assert _table_cell(text, row.key) == str(row.delta)
        # the filled dots: the differences whose mean the `same seed` cell gives
        paired = _table_cell(text, row.key, "hard - fixed, same seed")
        assert paired.startswith(f"{sum(row.seeds) / len(row.seeds):+.2f}")
        assert paired.endswith(f"({len(row.seeds)})")
    by_label = {row.label: row for row in fig.rows}
    # grouped by kind (dynamic first), best first within one
    assert list(by_label) == [
        "dynamic",
        "dynamic: shared=False",
        "learned",
        "shuffle + sds: static=dense",
    ]
    dyn = by_label["dynamic"]
    assert dyn.delta.diff == pytest.approx(0.8) and dyn.delta.se is not None
    # each seed minus the fixed shuffle at that seed (80.0, 80.2, 79.8), not minus its mean
    assert dyn.seeds == pytest.approx((1.0, 0.3, 1.1)) and dyn.unpaired == ()
    assert by_label["dynamic: shared=False"].delta.se is None  # one seed: no error bar
    assert by_label["shuffle + sds: static=dense"].seeds == pytest.approx((-10.0, -9.2))
    # seed 7, which the standard model did not run, against its mean (80.0), apart
    learned = by_label["learned"]
    assert learned.seeds == pytest.approx((-0.5, -0.1))
    assert learned.unpaired == pytest.approx((-0.3,))
    assert learned.delta.diff == pytest.approx((79.5 + 80.1 + 79.7) / 3 - 80.0)


def test_figures_are_drawn_small_and_written_atomically(tmp_path, monkeypatch):
    import PIL.Image

    from dyshuffle.results import write_figures

    written = write_figures(_figure_records(), tmp_path / "figures")
    (path,) = written.values()
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) < 150_000
    assert list(tmp_path.joinpath("figures").iterdir()) == [path]  # no temporary file left
    # drawn again from the same records: the same bytes
    assert write_figures(_figure_records(), tmp_path / "figures") == written
    assert path.read_bytes() == data

    # written to a temporary file in the same folder, then renamed into place
    import os

    renames = []
    replace = os.replace

    def spy(src, dst):
        renames.append((Path(src).name, Path(dst).name))
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_figures(_figure_records(), tmp_path / "figures")
    monkeypatch.setattr(os, "replace", replace)
    (src, dst), *_ = renames
    assert dst == path.name and src.startswith(f".{path.name}.") and src.endswith(".tmp")

    # a drawing that fails half-way leaves the last figure whole and no temporary file
    def broken(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(PIL.Image.Image, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        write_figures(_figure_records(), tmp_path / "figures")
    assert path.read_bytes() == data
    assert list(tmp_path.joinpath("figures").iterdir()) == [path]


def test_records_and_reports_do_not_make_the_commit_dirty(tmp_path, monkeypatch):
    """A sweep rewrites RESULTS.md and appends to results/ after each run: the next run's record
    names the commit, not a dirty tree; a change of the code (or of a recipe) still does."""
    import shutil
    import subprocess

    from dyshuffle.train.report import git_commit

    if shutil.which("git") is None:
        pytest.skip("no git")
    monkeypatch.delenv("DYSHUFFLE_COMMIT", raising=False)
    repo = tmp_path / "repo"
    for rel in ("src/m.py", "configs/c.yaml", "results/r_runs.jsonl", "RESULTS.md", "docs/D.md"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("0\n")

    def git(*args: str) -> str:
        env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t", "PATH": os.environ["PATH"]}  # fmt: skip
        out = subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "start")
    head = git("rev-parse", "HEAD")
    for rel in ("results/r_runs.jsonl", "RESULTS.md", "docs/D.md"):
        (repo / rel).write_text("1\n")
    assert git_commit(repo / "src") == head  # (asked from a subfolder, as the package does)
    for rel in ("src/m.py", "configs/c.yaml"):
        (repo / rel).write_text("1\n")
        assert git_commit(repo / "src") == head + "-dirty", rel
        git("checkout", "-q", "--", rel)


def _row(text: str, mixer: str) -> str:
    """The first table row of ``mixer``."""
    return next(line for line in text.splitlines() if f"| shufflenet_v2_x1_0 | {mixer} |" in line)


def _header(text: str) -> str:
    """The header line of the first run table."""
    return next(line for line in text.splitlines() if line.startswith("| model |"))


def _assert_columns_line_up(text: str, mixer: str) -> None:
    """Header, rule and the first row of ``mixer`` have the same number of cells."""
    header = _header(text)
    rule = text.splitlines()[text.splitlines().index(header) + 1]
    assert header.count("|") == rule.count("|") == _row(text, mixer).count("|")


def _column(text: str, column: str) -> int:
    """The index of the one column whose header starts with ``column``."""
    names = [c.strip() for c in _header(text).strip("|").split("|")]
    (i,) = [i for i, name in enumerate(names) if name.startswith(column)]
    return i


def _cell(text: str, mixer: str, column: str) -> str:
    """The cell under the header that starts with ``column`` of the first table row of ``mixer``."""
    return _row(text, mixer).strip("|").split("|")[_column(text, column)].strip()


def _identity_cell(text: str, mixer: str) -> str:
    """The `hard - identity` cell of the first table row of ``mixer``."""
    return _cell(text, mixer, "hard - identity")


def test_hard_minus_identity_is_the_mean_of_each_runs_difference():
    """The `hard - identity` column: over the runs that measured both, the mean and spread of
    each run's hard top-1 minus its top-1 with the identity factors forced (not the difference
    of the two means: a run without the measurement counts in neither)."""
    fixed = [record("shuffle", s, 80.0) for s in range(3)]
    dyn = [
        record("dynamic", 0, 81.0, top1_identity=80.0),  # +1.0
        record("dynamic", 1, 82.0, top1_identity=79.0),  # +3.0
        record("dynamic", 2, 90.0),  # recorded before the field: left out of the pairs
    ]
    text = render_results(fixed + dyn)
    assert "| hard - identity (points) |" in text
    assert _identity_cell(text, "dynamic") == "2.00 ± 1.41"
    assert _identity_cell(text, "shuffle") == "-"  # no dynamic layers, nothing forced
    one = render_results(fixed + [dict(dyn[0], top1_identity=81.0)])
    assert _identity_cell(one, "dynamic") == "0.00"  # the identity factors for every image
    _assert_columns_line_up(text, "dynamic")


def test_same_seed_column_pairs_each_seed_with_the_fixed_shuffles_run_at_that_seed():
    """`hard - fixed, same seed`: the mean and sample standard deviation of the per-seed
    differences over the seeds both configurations ran, with their number; the `hard - fixed`
    column beside it stays the difference of the two means over all their seeds."""
    fixed = [record("shuffle", s, v) for s, v in enumerate([80.0, 84.0, 82.0, 90.0])]
    dyn = [record("dynamic", s, v) for s, v in [(0, 81.0), (1, 84.0), (2, 85.0), (7, 99.0)]]
    text = render_results(fixed + dyn)
    # seeds 0-2 pair up: +1, 0, +3 -> mean 4/3, s.d. sqrt(((-1/3)^2 + (4/3)^2 + (5/3)^2) / 2)
    assert _cell(text, "dynamic", "hard - fixed, same seed") == "+1.33 ± 1.53 (3)"
    # seed 7 has no partner; the unpaired column still counts it (87.25 - 84.00)
    assert _cell(text, "dynamic", "hard - fixed (points").startswith("+3.25 ± ")
    assert _cell(text, "shuffle", "hard - fixed, same seed") == "-"  # the standard model
    one = render_results(fixed + dyn[:1])
    assert _cell(one, "dynamic", "hard - fixed, same seed") == "+1.00 (1)"  # no spread
    apart = render_results(fixed + [record("dynamic", 9, 81.0)])
    assert _cell(apart, "dynamic", "hard - fixed, same seed") == "-"  # no seed in common
    _assert_columns_line_up(text, "dynamic")


def test_device_tree_names_its_prepared_commit_and_dirty_once_changed(tmp_path):
    """scripts/gpu_commit.sh: gpu_prepare.sh writes the commit and the sums of the tracked code;
    on the device (no .git) the records name that commit while the tree is unchanged, and the
    commit with ``-dirty`` (once, with a warning) when a file changed or the sums are missing."""
    import shutil
    import subprocess

    if shutil.which("git") is None or shutil.which("sha256sum") is None:
        pytest.skip("no git or sha256sum")
    root = Path(__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    for rel in ("src/m.py", "configs/c.yaml", "sweeps/s.yaml", "pyproject.toml", "docs/D.md"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("0\n")
    (repo / "scripts").mkdir()
    shutil.copy(root / "scripts" / "gpu_commit.sh", repo / "scripts" / "gpu_commit.sh")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": os.environ["PATH"]}  # fmt: skip

    def sh(cwd: Path, script: str, **extra: str) -> subprocess.CompletedProcess:
        script = "set -euo pipefail\n. scripts/gpu_commit.sh\n" + script
        out = subprocess.run(
            ["bash", "-c", script], cwd=cwd, env={**env, **extra}, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return out

    def device(tree: Path, **extra: str) -> tuple[str, str]:
        out = sh(tree, 'gpu_commit_export\necho "$DYSHUFFLE_COMMIT"', **extra)
        return out.stdout.strip(), out.stderr

    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "start"]):
        subprocess.run(["git", *args], cwd=repo, env=env, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, env=env, capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    assert sh(repo, "gpu_commit_write").stderr == ""
    assert (repo / ".gpu" / "COMMIT").read_text().strip() == head
    there = tmp_path / "there"
    shutil.copytree(repo, there, ignore=shutil.ignore_patterns(".git"))
    (there / "docs" / "D.md").write_text("1\n")  # not code: the tree is still the commit
    assert device(there) == (head, "")
    assert device(there, DYSHUFFLE_COMMIT="given")[0] == "given"
    for rel in ("src/m.py", "sweeps/s.yaml", "pyproject.toml"):
        (there / rel).write_text("1\n")
        commit, warning = device(there)
        assert commit == head + "-dirty" and head in warning, rel
        (there / rel).write_text("0\n")
    (there / ".gpu" / "SHA256SUMS").unlink()
    commit, warning = device(there)
    assert commit == head + "-dirty" and "SHA256SUMS" in warning
    # prepared from an uncommitted change: dirty from the start, and dirty only once there
    (repo / "configs" / "c.yaml").write_text("1\n")
    assert head in sh(repo, "gpu_commit_write").stderr
    assert (repo / ".gpu" / "COMMIT").read_text().strip() == head + "-dirty"
    (repo / "src" / "m.py").write_text("1\n")
    assert device(repo)[0] == head + "-dirty"
