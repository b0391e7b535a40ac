"""The layers' GPU code path on the CPU, with their Triton kernels replaced by stand-ins.

What a launch-bound GPU pays per layer is the host's part of each call: the operators it
dispatches (``op_count``) and the time of its Python (``host_time``). Both can be measured on
any machine by taking the layers' Triton path on CPU tensors with kernels that compute nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..layers import fused, fused_training

__all__ = ["KernelStub", "gpu_path_without_kernels"]


class KernelStub:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` counts a launch, computes nothing."""

    def __init__(self) -> None:
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            self.launches += 1

        return launch


@contextlib.contextmanager
def gpu_path_without_kernels() -> Iterator[KernelStub]:
    """Inside, the dynamic layers take their Triton paths (the fused inference and training
    kernels) on CPU tensors, the kernels replaced by one :class:`KernelStub`; their outputs are
    left unwritten. Everything is restored on the way out."""
    if fused.triton is None:
        raise RuntimeError("the layers' GPU path needs Triton installed")
    stub = KernelStub()
    saved = (
        fused._hard_shuffle_kernel,
        fused_training._ste_backward_kernel,
        fused._INTERPRETED,
        fused_training.available,
    )
    fused._hard_shuffle_kernel = stub
    fused_training._ste_backward_kernel = stub
    fused._INTERPRETED = True  # (what makes fused.launch take the Triton path on the CPU)
    fused_training.available = lambda device: True
    try:
        yield stub
    finally:
        (
            fused._hard_shuffle_kernel,
            fused_training._ste_backward_kernel,
            fused._INTERPRETED,
            fused_training.available,
        ) = saved
