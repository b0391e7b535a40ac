"""The operator count of python3 -m dyshuffle.tools.op_count."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from dyshuffle.models import create_model
from dyshuffle.tools.op_count import count_ops, main


def test_counts_are_repeatable_and_the_dynamic_layers_add_operators():
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    counts = {}
    for mixer in ("shuffle", "dynamic"):
        torch.manual_seed(0)
        model = create_model("shufflenet_v2_x0_5", stem="cifar", num_classes=10, mixer=mixer)
        model = model.to(memory_format=torch.channels_last)
        infer, train = count_ops(model, x, False), count_ops(model, x, True)
        assert count_ops(model, x, False) == infer  # the same call dispatches the same operators
        for top, compute in (infer, train):
            assert 0 < compute <= top
        assert train[1] > 2 * infer[1]  # backward and optimizer step
        counts[mixer] = (infer[1], train[1])
    assert counts["dynamic"][0] >= counts["shuffle"][0] + 16  # 16 layers, >= 1 operator each
    assert counts["dynamic"][1] >= counts["shuffle"][1] + 16


def test_main_prints_one_row_per_mixer_and_rejects_bad_options(capsys):
    argv = ["--model", "shufflenet_v2_x0_5", "--batch", "2", "--mixers", "shuffle", "learned"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| shuffle | 0 |" in out and "| learned | 16 |" in out
    with pytest.raises(SystemExit) as e:
        main(["--mixers", "dynamic:bogus=1"])
    assert e.value.code == 2 and "bogus" in capsys.readouterr().err


def test_extra_operators_are_counted_against_the_fixed_shuffle_in_any_order(capsys):
    argv = ["--model", "shufflenet_v2_x0_5", "--batch", "2", "--mixers"]
    tables = []
    for mixers in (["shuffle", "learned"], ["learned", "shuffle"]):
        assert main([*argv, *mixers]) == 0
        rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
        tables.append({r.split("|")[1].strip(): r for r in rows[1:]})
    assert tables[0] == tables[1]
    assert not tables[0]["learned"].rstrip(" |").endswith("0.0 / 0.0")


def test_accelerator_path_by_default_and_the_cpu_path_on_request(capsys):
    import dyshuffle.layers.dynamic as dynamic_module

    argv = ["--model", "shufflenet_v2_x0_5", "--batch", "2", "--mixers", "dynamic"]

    def infer_ops(extra: list[str]) -> int:
        assert main(argv + extra) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if "| dynamic |" in line)
        return int(row.split("|")[3].split("(")[1].rstrip(") "))

    accelerator, cpu = infer_ops([]), infer_ops(["--cpu-path"])
    # the CPU path pools the two halves apart and writes them to their places: more, smaller
    # operators than the concatenation and one gather
    assert cpu > accelerator
    assert dynamic_module.PARTS_DEVICES == {"cpu"}  # restored


def test_the_profilers_log_lines_stay_off_stderr():
    """PyTorch's profiler library (kineto) logs its start and stop, and without a GPU a failed
    device query, as C++ log lines on stderr: the command silences them, the table is unchanged."""
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    argv = ["--model", "shufflenet_v2_x0_5", "--batch", "2", "--mixers", "shuffle"]
    run = subprocess.run(
        [sys.executable, "-m", "dyshuffle.tools.op_count", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "| shuffle | 0 |" in run.stdout
    # kineto's format: LEVEL:date time pid:tid File.cpp:line] message
    assert not re.search(r"(?m)^[A-Z]+:\S+ \S+ \d+:\d+ \w+\.cpp:\d+\]", run.stderr), run.stderr


def test_fused_training_step_counts_its_kernel_launches():
    """The fused training step: two kernel launches per layer stand for the STE operators, and
    the counting leaves the kernels and their availability as they were."""
    from dyshuffle.layers import fused, fused_training

    pytest.importorskip("triton")
    kernels = (fused._hard_shuffle_kernel, fused_training._ste_backward_kernel)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    counts = {}
    for name, kwargs in (
        ("shuffle", {"mixer": "shuffle"}),
        ("dynamic", {"mixer": "dynamic"}),
        ("fused", {"mixer": "dynamic", "fused_training": True}),
    ):
        torch.manual_seed(0)
        model = create_model("shufflenet_v2_x0_5", stem="cifar", num_classes=10, **kwargs)
        counts[name] = count_ops(model.to(memory_format=torch.channels_last), x, True)[1]
    assert (fused._hard_shuffle_kernel, fused_training._ste_backward_kernel) == kernels
    assert not fused_training.available(torch.device("cpu")) or fused._INTERPRETED
    # 16 layers: the launches are counted (without them the fused step dispatches about as many
    # operators as the fixed shuffle's, which concatenates and shuffles where it reads the parts
    # and writes the permuted channels), and far fewer than the layers' PyTorch step
    assert counts["fused"] >= counts["shuffle"] + 16
    assert counts["fused"] < counts["shuffle"] + 5 * 16 < counts["dynamic"]
