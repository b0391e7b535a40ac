"""Process-group setup for runs launched by ``torchrun`` (``torch.distributed``, ``env://``).

One process per device: NCCL on CUDA, gloo on CPU. Nothing here starts processes; ``torchrun``
does (``torchrun --nproc_per_node=8 -m dyshuffle.cli train ...``, or with ``--nnodes`` and a
rendezvous endpoint for several machines).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DistInfo", "all_reduce_sum", "average_buffers", "barrier", "broadcast_object", "setup"]


@dataclass
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, its ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda`` (this process's GPU under torchrun)."""
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {choice!r}; valid: auto, cpu, cuda")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available (use --device cpu)")
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def setup(device: str = "auto") -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            init_method="env://",
            **({"device_id": dev} if dev.type == "cuda" else {}),
        )
    return DistInfo(rank, world, local_rank, dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: Tensor, info: DistInfo) -> Tensor:
    """Sum ``t`` over all ranks in place (a no-op in a single process)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def average_buffers(model: nn.Module, info: DistInfo) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over ranks.

    DistributedDataParallel keeps parameters identical, but each rank updates its BatchNorm
    statistics from its own shard; averaging them (like timm's ``distribute_bn``) makes every
    rank evaluate and save the same model.
    """
    if not info.enabled:
        return
    for b in model.buffers():
        if b.is_floating_point():
            dist.all_reduce(b, op=dist.ReduceOp.SUM)
            b.div_(info.world_size)
