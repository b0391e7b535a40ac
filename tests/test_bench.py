"""``dyshuffle bench`` (issue 5): what it writes and how it computes, never how fast anything is."""

from __future__ import annotations

import datetime
import html
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from dyshuffle import bench
from dyshuffle.layers import DynamicShuffle
from dyshuffle.macs import count_macs, count_params
from dyshuffle.models import create_model


def close(a: float, b: float, rel: float = 1e-4) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run of the whole command: layers and a model, both modes, CSV and markdown."""
    out = tmp_path_factory.mktemp("bench")
    md = out / "BENCH.md"
    md.write_text("# Benchmarks\n\nhand-written text that must survive\n")
    argv = [
        "--device", "cpu", "--threads", "1", "--part", "layer", "model",
        "--layer-shapes", "24x4", "--models", "shufflenet_v2_x0_5", "--stems", "cifar",
        "--batch", "2", "--repeats", "2", "--warmup", "1", "--min-block-ms", "0",
        "--out-dir", str(out), "--markdown", str(md), "--plot", str(out / "ratios.png"), "-q",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    (path,) = out.glob("*.csv")
    return path, bench.read_csv(path), md


def test_csv_name_says_device_precision_layout_and_torch(tiny_run):
    path, rows, _ = tiny_run
    version = re.sub(r"[^A-Za-z0-9._-]+", "-", torch.__version__)
    assert path.name == f"cpu-1threads_fp32_channels_last_torch{version}.csv"
    assert re.fullmatch(r"[A-Za-z0-9._-]+", path.name)
    assert {r["device"] for r in rows} == {"cpu"}
    assert {r["precision"] for r in rows} == {"fp32"}
    assert {r["layout"] for r in rows} == {"channels_last"}
    assert {r["torch"] for r in rows} == {torch.__version__}
    (date,) = {r["date"] for r in rows}  # the day it ran, also in the markdown's command line
    assert datetime.date.fromisoformat(date) >= datetime.date(2026, 1, 1)


def test_csv_columns_and_every_configuration(tiny_run):
    path, rows, _ = tiny_run
    header = path.read_text().splitlines()[0].split(",")
    assert header == bench.COLUMNS
    layer = {(r["variant"], r["mode"]) for r in rows if r["part"] == "layer"}
    model = {(r["variant"], r["mode"]) for r in rows if r["part"] == "model"}
    assert layer == {(v, m) for v in bench.LAYER_VARIANTS for m in bench.MODES}
    assert model == {(v, m) for v in bench.MODEL_VARIANTS for m in bench.MODES}
    for r in rows:
        assert r["note"] == ""
        assert int(r["batch"]) == 2 and int(r["repeats"]) == 2
        lat = float(r["latency_ms"])
        assert float(r["latency_p25_ms"]) <= lat <= float(r["latency_p75_ms"])
        assert close(float(r["throughput_per_s"]), 2 / (lat / 1e3))
        if r["mode"] == "train":
            # a fixed shuffle saves nothing for backward: zero for the lone layer
            lone_shuffle = r["part"] == "layer" and r["variant"] in ("fixed", "fixed_native")
            assert float(r["train_mem_mb"]) == 0 if lone_shuffle else float(r["train_mem_mb"]) > 0
            assert r["mem_method"] == "saved_tensors+params+grads+optimizer_state"
        else:
            assert r["train_mem_mb"] == "" and r["train_mem_ratio"] == ""


def test_ratios_are_ratios_of_the_measured_values(tiny_run):
    _, rows, _ = tiny_run
    fixed = {
        (r["part"], r["target"], r["batch"], r["mode"]): r for r in rows if r["variant"] == "fixed"
    }
    checked = 0
    for r in rows:
        ref = fixed[(r["part"], r["target"], r["batch"], r["mode"])]
        for col, ratio in bench.RATIOS.items():
            value, base = r[col], ref[col]
            if value == "" or base == "" or float(base) == 0:
                assert r[ratio] == ""
                continue
            assert close(float(r[ratio]), float(value) / float(base)), (r["variant"], col)
            checked += 1
        if r["variant"] == "fixed":
            assert float(r["latency_ratio"]) == 1.0 and float(r["latency_ratio_paired"]) == 1.0
    assert checked > 20


def test_parameters_and_macs_come_from_the_counters(tiny_run):
    _, rows, _ = tiny_run
    for variant, kwargs in [
        ("fixed", {}),
        ("dynamic", {"mixer": "dynamic"}),
        ("static_dynamic", {"pointwise": "sds"}),
    ]:
        model = create_model("shufflenet_v2_x0_5", num_classes=10, stem="cifar", **kwargs).eval()
        (row, *_) = [r for r in rows if r["part"] == "model" and r["variant"] == variant]
        assert int(row["params"]) == count_params(model)
        assert int(row["macs"]) == count_macs(model, (1, 3, 32, 32))
    layer = {r["variant"]: r for r in rows if r["part"] == "layer" and r["mode"] == "infer"}
    assert int(layer["conv1x1"]["params"]) == 24 * 24
    assert int(layer["conv1x1"]["macs"]) == 24 * 24 * 4 * 4
    assert int(layer["fixed"]["params"]) == 0 and layer["dynamic"]["params_ratio"] == ""


def test_the_run_draws_its_figure(tiny_run):
    path, rows, _ = tiny_run
    png = path.parent / "ratios.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    series = bench.ratio_series([(path.stem, rows)])
    assert {(s.mode, s.variant) for s in series} == {
        (m, v) for m in bench.MODES for v in ("fixed_native", "dynamic", "static_dynamic")
    }
    assert all(s.batches == [2] and s.conditions["threads"] == "1" for s in series)


def test_markdown_section_is_written_once_and_keeps_the_rest(tiny_run, tmp_path):
    path, rows, md = tiny_run
    text = md.read_text()
    assert "hand-written text that must survive" in text
    assert text.count(f"<!-- bench:{path.stem} -->") == 1
    assert "dyshuffle bench --device cpu" in text and "| part | target |" in text
    # the summary line of the model is the ratio of the two measured latencies, as printed
    lat = {(r["variant"], r["mode"]): float(r["latency_ms"]) for r in rows if r["part"] == "model"}
    want = lat[("dynamic", "infer")] / lat[("fixed", "infer")]
    line = next(x for x in text.splitlines() if x.startswith("| shufflenet_v2_x0_5 cifar | 2 |"))
    assert line.split("|")[3].strip().split()[0] == f"{want:.2f}"
    # regenerating from the CSV replaces the section instead of appending another
    assert bench.main(["--from-csv", str(path), "--markdown", str(md)]) == 0
    again = md.read_text()
    assert again.count(f"<!-- bench:{path.stem} -->") == 1
    assert again.count("| layer | C24 4x4 | 2 | infer | dynamic |") == 1


def test_from_csv_shows_the_numbers_the_run_showed(tmp_path, monkeypatch, capsys):
    """The CSV keeps 6 significant digits; the run's own table must not show more (102.350123
    ms is 102.35 in the CSV, which the table gives as 102.3; 1,063,171.4 samples/s are
    1.06317e+06), so that ``--from-csv`` regenerates the section the run printed."""

    def measured(cfg, precision, layout, on_rows=None):
        common = dict(device="cpu", device_name="test cpu", torch=torch.__version__,
                      precision=precision, layout=layout, threads=1, compile=cfg.compile,
                      cpu_env="", commit=cfg.commit, date="2026-12-06", command=cfg.command,
                      part="model",
                      target="shufflenet_v2_x0_5 cifar", batch=32, repeats=8, note="")  # fmt: skip
        rows = [
            dict(
                common,
                variant=variant,
                mode="infer",
                latency_ms=lat,
                latency_p25_ms=lat * 0.99,
                latency_p75_ms=lat * 1.01,
                throughput_per_s=tput,
                params=341_000,
                macs=43.7e6,
                latency_ratio_paired=lat / 102.350123,
            )
            for variant, lat, tput in [("fixed", 102.350123, 1_063_171.4), ("dynamic", 117.55, 3e5)]
        ]
        return bench.add_ratios(rows)

    monkeypatch.setattr(bench, "run_benchmark", measured)
    argv = ["--device", "cpu", "--threads", "1", "--part", "model", "--variants", "fixed",
            "dynamic", "--out-dir", str(tmp_path), "-q"]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    live = capsys.readouterr().out
    (path,) = tmp_path.glob("*.csv")
    assert bench.main(["--from-csv", str(path)]) == 0
    again = capsys.readouterr().out

    assert again.strip() and again.strip() == live.strip()  # the command line with its date too
    assert re.search(r"^Command: `.*` \(commit .*, 2026-12-06\)$", again, re.M)
    assert "| fixed | 102.3 (101.3-103.4) | 1.00 | 1,063,170 |" in again


def test_saved_tensor_bytes_counts_each_storage_once_and_skips_parameters():
    x = torch.randn(8, 16, requires_grad=True)
    assert bench.saved_tensor_bytes(lambda: (x * x).sum().backward()) == x.numel() * 4
    lin = nn.Linear(16, 4, bias=False)
    with_w = bench.saved_tensor_bytes(lambda: lin(x).sum().backward())
    without_w = bench.saved_tensor_bytes(lambda: lin(x).sum().backward(), exclude=lin.parameters())
    assert with_w == (8 * 16 + 4 * 16) * 4 and without_w == 8 * 16 * 4


def test_time_round_robin_interleaves_and_repeats():
    calls: list[str] = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = bench.time_round_robin(
        fns, device=torch.device("cpu"), warmup=2, repeats=3, min_block_s=0.0
    )
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t > 0 for v in times.values() for t in v)
    # warm-up and calibration of each, then a, b, a, b, a, b
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a", "b"] * 3


def test_a_variant_that_raises_is_reported_and_the_others_are_measured(monkeypatch, capsys):
    """A kernel that does not compile on the device costs its own rows only, not the run."""
    calls: list[str] = []

    def broken():
        raise RuntimeError("no kernel for this device\nmore detail")

    fns = {"a": lambda: calls.append("a"), "bad": broken, "b": lambda: calls.append("b")}
    with pytest.raises(RuntimeError):  # without a failures dict the exception propagates
        bench.time_round_robin(fns, device=torch.device("cpu"), warmup=1, repeats=1)
    failures: dict[str, str] = {}
    times = bench.time_round_robin(
        fns, device=torch.device("cpu"), warmup=1, repeats=2, failures=failures
    )
    assert failures == {"bad": "RuntimeError: no kernel for this device"}
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "bad": 0, "b": 2}

    forward = DynamicShuffle.forward

    def fails_in_training(self, *args):
        if self.training:
            raise RuntimeError("training kernel failed")
        return forward(self, *args)

    monkeypatch.setattr(DynamicShuffle, "forward", fails_in_training)
    cfg = bench.BenchConfig(
        parts=("layer",), layer_shapes=("16x4",), layer_variants=("fixed", "dynamic"),
        batches=(2,), warmup=1, repeats=2, min_block_ms=0.0, threads=None, verbose=False,
    )  # fmt: skip
    rows = {(r["mode"], r["variant"]): r for r in bench.run_benchmark(cfg, "fp32", "channels_last")}
    assert rows["train", "dynamic"]["note"] == "failed: RuntimeError: training kernel failed"
    assert rows["train", "dynamic"].get("latency_ms") is None
    assert rows["train", "fixed"]["latency_ms"] > 0 and rows["infer", "dynamic"]["latency_ms"] > 0
    assert "bench: dynamic C16 4x4 b=2 train failed: RuntimeError" in capsys.readouterr().err


def test_partial_rows_are_handed_out_after_each_mode():
    """A run stopped while the training step compiles keeps the inference rows before it."""
    seen: list[list[tuple[str, str]]] = []
    cfg = bench.BenchConfig(
        parts=("layer",), layer_shapes=("16x4",), layer_variants=("fixed", "dynamic"),
        batches=(2,), warmup=1, repeats=2, min_block_ms=0.0, threads=None, verbose=False,
    )  # fmt: skip
    rows = bench.run_benchmark(
        cfg,
        "fp32",
        "channels_last",
        on_rows=lambda rs: seen.append([(r["mode"], r["variant"]) for r in rs]),
    )
    assert seen == [
        [("infer", "fixed"), ("infer", "dynamic")],
        [("infer", "fixed"), ("infer", "dynamic"), ("train", "fixed"), ("train", "dynamic")],
    ]
    assert len(rows) == 4 and all(r["params"] is not None for r in rows)


def test_add_ratios_edge_cases():
    rows = [
        dict(part="model", target="t", batch=1, mode="infer", variant="fixed", latency_ms=2.0,
             params=0, macs=10),
        dict(part="model", target="t", batch=1, mode="infer", variant="dynamic", latency_ms=3.0,
             params=5, macs=11),
        dict(part="model", target="u", batch=1, mode="infer", variant="dynamic", latency_ms=3.0),
    ]  # fmt: skip
    out = bench.add_ratios(rows)
    assert out[1]["latency_ratio"] == 1.5 and out[1]["macs_ratio"] == 1.1
    assert out[1]["params_ratio"] is None  # the fixed value is zero
    assert out[2]["latency_ratio"] is None  # no fixed shuffle in that group


def test_variant_options():
    assert bench.split_variant("dynamic:reduction=16,tau=0.5,init=random") == (
        "dynamic",
        None,
        {"reduction": 16, "tau": 0.5, "init": "random"},
    )
    # true / false / none are values, not strings (bool("false") would be True)
    assert bench.split_variant("static_dynamic:dynamic=false,static=dense")[2] == {
        "dynamic": False,
        "static": "dense",
    }
    assert bench.split_variant("dynamic:shared=True,logit_cap=none")[2] == {
        "shared": True,
        "logit_cap": None,
    }
    assert not bench._build_layer("static_dynamic:dynamic=false", 64).dynamic
    layer = bench._build_layer("dynamic:reduction=8", 64)
    assert layer.hidden == 8
    with pytest.raises(ValueError, match="not loaded"):
        bench.split_variant("dynamic@abc")
    with pytest.raises(ValueError, match="only dynamic"):
        bench.split_variant("conv1x1:groups=2")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variants", "nope"], "unknown variant 'nope'; valid names: fixed, .*conv1x1"),
        (["--batch", "32", "0"], "--batch must be at least 1, got 0"),
        (["--repeats", "0"], "--repeats must be at least 1, got 0"),
        (["--warmup", "-1"], "--warmup must be at least 0, got -1"),
        (["--threads", "0"], "--threads must be at least 1, got 0"),
        (
            ["--models", "shufflenet_v2_x1_O"],
            "unknown model 'shufflenet_v2_x1_O'.*shufflenet_v2_x1_0",
        ),
        (["--from-csv", "missing.csv"], "--from-csv 'missing.csv' does not exist"),
        (["--plot", "fig.jpg"], r"--plot 'fig.jpg': the name must end in .png, .svg, .pdf"),
        (["--part", "layer", "--plot", "f.png"], "--plot 'f.png' draws whole models"),
    ],
)
def test_bad_arguments_are_usage_errors_that_name_the_value(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cpu", "--out-dir", str(tmp_path), *args])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written
    with pytest.raises(ValueError, match="CHANNELSxSIZE"):
        bench._parse_shape("116-28")


@pytest.mark.parametrize(
    "args, device, expected",
    [
        ([], "cpu", ([1, 32, 256], 2, 10)),
        ([], "cuda", ([1, 32, 256, 1024], 2, 10)),
        (["--quick"], "cpu", ([1, 32], 1, 5)),
        (["--quick", "--repeats", "20", "--batch", "256"], "cpu", ([256], 1, 20)),
        (["--warmup", "0", "--batch", "8"], "cuda", ([8], 0, 10)),
    ],
)
def test_quick_sets_only_what_is_not_given(args, device, expected):
    assert bench._schedule(bench._parser().parse_args(args), device) == expected


def test_gpu_path_needs_only_torch(tmp_path):
    """scripts/gpu_bench.sh runs on a bare machine: nothing beyond torch on the benchmark's path."""
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    code = (
        "import sys\n"
        "for m in ('yaml', 'matplotlib', 'sklearn', 'timm', 'tensorboard', 'tqdm', 'onnx',\n"
        "          'onnxruntime', 'onnxscript', 'hypothesis', 'torchmetrics', 'PIL'):\n"
        "    sys.modules[m] = None  # as if not installed\n"
        f"sys.path.insert(0, {str(src)!r})\n"
        "from dyshuffle import bench\n"
        "model = bench._build_model('dynamic', 'shufflenet_v2_x0_5', 'cifar')\n"
        "print(bench._counts(model, (1, 3, 32, 32))[0] > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


# --- the --plot figure -------------------------------------------------------------------------


def _synthetic_run(**conditions) -> list[dict]:
    """Whole-model and layer rows of a small run, with latencies that give known ratios."""
    common = dict(device="cpu", device_name="test cpu", torch="2.0.0", precision="fp32",
                  layout="channels_last", threads=2, compile="none", cpu_env="", note="",
                  commit="abc1234", command="dyshuffle bench --test", repeats=8)  # fmt: skip
    common.update(conditions)
    rows = []
    for t, target in enumerate(["shufflenet_v2_x0_5 cifar", "shufflenet_v2_x1_0 imagenet"]):
        for b, batch in enumerate([1, 32, 256]):
            for m, mode in enumerate(bench.MODES):
                for v, variant in enumerate(["fixed", "dynamic", "static_dynamic"]):
                    if (target, batch, variant) == ("shufflenet_v2_x1_0 imagenet", 32, "fixed"):
                        continue  # no fixed shuffle here: no ratio, no point
                    lat = 10.0 * (1 + t) * (1 + b) * (1 + m) * (1 + v * (0.07 * (3 - b) + 0.2 * m))
                    rows.append(dict(common, part="model", target=target, batch=batch, mode=mode,
                                     variant=variant, latency_ms=lat, latency_p25_ms=0.9 * lat,
                                     latency_p75_ms=1.2 * lat, params=1000 + v, macs=5000,
                                     latency_ratio_paired=1 + 0.01 * v))  # fmt: skip
    rows.append(dict(common, part="layer", target="C24 4x4", batch=1, mode="infer",
                     variant="dynamic", latency_ms=99.0))  # fmt: skip
    return bench.add_ratios(rows)


def test_plot_draws_the_ratios_of_the_summary_table(tmp_path, monkeypatch):
    """The plotted points are the summary table's ratios (same computation), one line per
    mixer, model and stem in each mode's panel; missing fixed values leave the point out."""
    path = bench.write_csv(_synthetic_run(), tmp_path / "run.csv")
    md, png = tmp_path / "BENCH.md", tmp_path / "figures" / "run.png"
    drawn: dict[str, list[list[float]]] = {}
    panel = bench._ratio_panel

    def spy(ax, mode, *args):
        panel(ax, mode, *args)
        drawn[mode] = [[float(y) for y in line.get_ydata()] for line in ax.get_lines()]

    monkeypatch.setattr(bench, "_ratio_panel", spy)
    assert bench.main(["--from-csv", str(path), "--plot", str(png), "--markdown", str(md)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000
    assert [p.name for p in png.parent.iterdir()] == ["run.png"]  # no temporary file left

    series = bench.ratio_series([("run", bench.read_csv(path))])
    assert {(s.mode, s.variant, s.target) for s in series} == {
        (m, v, t)
        for m in bench.MODES
        for v in ("dynamic", "static_dynamic")
        for t in ("shufflenet_v2_x0_5 cifar", "shufflenet_v2_x1_0 imagenet")
    }
    table = {}  # (target, batch) -> (infer, train) of the dynamic summary table, as printed
    text = md.read_text()
    block = text[text.index("| model | batch | infer dynamic/fixed") :].split("\n\n")[0]
    for line in block.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[(cells[0], int(cells[1]))] = tuple((c.split() or [""])[0] for c in cells[2:4])
    checked = 0
    for s in series:
        assert s.ratio in drawn[s.mode]  # this very line is in its mode's panel
        if s.target == "shufflenet_v2_x1_0 imagenet":
            assert s.batches == [1, 256]  # batch 32 has no fixed shuffle
        for b, r, lo, hi in zip(s.batches, s.ratio, s.low, s.high):
            lat = {
                row["variant"]: row
                for row in bench.read_csv(path)
                if (row["part"], row["target"], row["batch"], row["mode"])
                == ("model", s.target, str(b), s.mode)
            }
            assert r == float(lat[s.variant]["latency_ms"]) / float(lat["fixed"]["latency_ms"])
            assert close(lo, 0.9 / 1.2 * r) and close(hi, 1.2 / 0.9 * r)
            if s.variant == "dynamic":
                assert f"{r:.2f}" == table[(s.target, b)][bench.MODES.index(s.mode)]
                checked += 1
    assert checked == 2 * 2 * 3 - 2  # every dynamic line of the table but the two without fixed
    assert table[("shufflenet_v2_x1_0 imagenet", 32)] == ("", "")


def test_plot_keeps_runs_and_conditions_apart(tmp_path):
    """Two runs of different devices and precisions: lines of each, conditions common to both in
    the title, the others in the legend."""
    import matplotlib

    cpu = bench.write_csv(_synthetic_run(), tmp_path / "cpu_fp32.csv")
    gpu = bench.write_csv(
        _synthetic_run(
            device="cuda",
            device_name="NVIDIA H200",
            precision="bf16",
            threads="",
            torch="2.0.0",
            compile="reduce-overhead",
        ),  # fmt: skip
        tmp_path / "cuda_bf16.csv",
    )
    svg = tmp_path / "both.svg"
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text as text, to read it back
        assert bench.main(["--from-csv", str(cpu), str(gpu), "--plot", str(svg)]) == 0
    text = html.unescape(svg.read_text())
    series = bench.ratio_series([("a", bench.read_csv(cpu)), ("b", bench.read_csv(gpu))])
    assert {(s.source, s.conditions["device"]) for s in series} == {("a", "cpu"), ("b", "cuda")}
    for phrase in ("channels_last, torch 2.0.0", "test cpu (cpu, 2 threads)", "NVIDIA H200 (cuda)",
                   "bf16 (autocast)", "fp32", "torch.compile reduce-overhead", "eager",
                   "target <= 1.10", "target <= 1.35", "ShuffleNetV2 0.5x, CIFAR stem",
                   "ShuffleNetV2 1.0x, ImageNet stem", "static_dynamic"):  # fmt: skip
        assert phrase in text, phrase


def test_plot_without_model_rows_writes_nothing(tmp_path, monkeypatch, capsys):
    rows = [r for r in _synthetic_run() if r["part"] == "layer"]
    path = bench.write_csv(rows, tmp_path / "layers.csv")
    png = tmp_path / "f.png"
    assert bench.main(["--from-csv", str(path), "--plot", str(png)]) == 1
    assert "no whole-model rows" in capsys.readouterr().err and not png.exists()
    # a failed write keeps the previous figure and leaves no temporary file
    png.write_bytes(b"old")
    from matplotlib.figure import Figure

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", fail)
    model = bench.write_csv(_synthetic_run(), tmp_path / "model.csv")
    with pytest.raises(RuntimeError, match="disk full"):
        bench.plot_latency_ratios([("m", bench.read_csv(model))], png)
    assert png.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png", "layers.csv", "model.csv"]


def test_ref_layers_of_a_commit_have_its_cpu_kernel_and_agree(monkeypatch):
    """`--ref COMMIT` loads that commit's layers with the sources they build (the C kernel), so a
    `dynamic@COMMIT` inference is timed on its own kernel, not on the PyTorch fallback; its
    custom operators do not replace the current ones (compiled, each runs its own kernel)."""
    from dyshuffle.layers import DynamicShuffle, fused_cpu

    ref = bench.load_ref_layers("HEAD")
    assert ref.fused_cpu.available() == fused_cpu.available()
    layer = DynamicShuffle(116).eval()
    old = ref.DynamicShuffle(116).eval()
    old.load_state_dict(layer.state_dict())
    x = torch.randn(4, 116, 8, 8).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(old(x), layer(x))
    if not fused_cpu.available():
        return
    calls = []
    for tag, module in (("current", fused_cpu), ("ref", ref.fused_cpu)):
        real = module.launch
        monkeypatch.setattr(
            module, "launch", lambda *a, real=real, tag=tag, **k: calls.append(tag) or real(*a, **k)
        )
    for tag, m in (("current", layer), ("ref", old)):
        calls.clear()
        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
        assert calls and set(calls) == {tag}, (tag, calls)
        assert torch.equal(out, layer(x))


def test_every_table_of_the_benchmarks_page_is_its_csv_rendered(tmp_path):
    """Each ``bench:NAME`` block of docs/BENCHMARKS.md is what ``--from-csv
    results/bench/NAME.csv`` writes: no number on the page that its CSV does not hold."""
    repo = Path(__file__).resolve().parents[1]
    page = (repo / "docs" / "BENCHMARKS.md").read_text()
    names = re.findall(r"^<!-- bench:(\S+) -->$", page, re.M)
    assert len(names) >= 20 and len(set(names)) == len(names)
    copy = tmp_path / "BENCHMARKS.md"
    copy.write_text(page)
    for name in names:
        rows = bench.read_csv(repo / "results" / "bench" / f"{name}.csv")
        bench.update_markdown(copy, name, bench.markdown_section(name, rows))
    assert copy.read_text() == page
