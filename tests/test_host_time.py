"""python3 -m dyshuffle.tools.host_time: host time per mixer call."""

from __future__ import annotations

import pytest

from dyshuffle.layers import fused, fused_training
from dyshuffle.tools.host_time import main

pytest.importorskip("triton")


def test_every_row_is_timed_and_the_kernels_are_restored(capsys):
    kernels = (fused._hard_shuffle_kernel, fused_training._ste_backward_kernel)
    interpreted, available = fused._INTERPRETED, fused_training.available
    assert main(["--calls", "5", "--rounds", "2", "--channels", "48"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    times = {r.split("|")[1].strip(): float(r.split("|")[2]) for r in rows}
    assert {
        "fixed shuffle, inference",
        "dynamic, inference, GPU path (kernel not run)",
        "fixed shuffle, training step",
        "dynamic, fused training step (kernels not run)",
        "dynamic, PyTorch training step",
    } <= set(times)
    assert all(t > 0 for t in times.values())
    assert (fused._hard_shuffle_kernel, fused_training._ste_backward_kernel) == kernels
    assert (fused._INTERPRETED, fused_training.available) == (interpreted, available)


@pytest.mark.parametrize(
    "argv,message", [(["--calls", "0"], "--calls must be"), (["--channels", "47"], "47")]
)
def test_bad_arguments_name_the_value(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
