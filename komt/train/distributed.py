"""Data parallelism with torch.distributed: one process per device, started by `torchrun`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; this module is the one place that reads them. Each process
holds the whole model, the LoRA parameters are wrapped in `DistributedDataParallel` (which averages their
gradients across processes during backward), and every process cuts its own share of each global batch
(see `komt.train.batching`), so nothing but gradients and a few scalars crosses processes.
Backend: NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from komt.model.device import requested_device


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def choose_device(requested: str | None, local_rank: int = 0) -> torch.device:
    """`requested` (checked: komt.model.device), else CUDA when available, else the CPU; under torchrun each
    process gets cuda:LOCAL_RANK."""
    device = requested_device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup(requested_device: str | None) -> DistContext:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); otherwise a context of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(requested_device, local_rank)
    if world_size == 1:
        return DistContext(0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


def teardown(ctx: DistContext, finished: bool = False) -> None:
    """Leave the process group. After a `finished` run every process first waits for the others: one that
    tears its gloo connections down while another still does main-process-only work (writing the final
    files) made that peer abort ("terminate called without an active exception", SIGABRT), failing a run
    that had succeeded. After an error there is no barrier: a failed peer would never reach it."""
    if ctx.enabled and dist.is_initialized():
        if finished:
            barrier(ctx)
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """The model as each step calls it: DDP-wrapped when there are several processes."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_sum(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every process's `obj`, in rank order (each process gets the whole list)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's `obj` on every process (used so all processes agree on an error or a resume point)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
