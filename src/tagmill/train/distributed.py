"""Distributed training state, read from torchrun's environment in one place.

``tagmill train`` runs unchanged under ``torchrun`` (one process per CPU socket / GPU,
on one or many machines). World size 1 is the ordinary single-process run and touches
no torch.distributed API at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tagmill.errors import InputError

#: How long a collective waits for a missing peer before failing; torchrun normally
#: kills the whole group sooner when a rank dies, so this only bounds the worst case.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def from_environment() -> DistContext:
    return DistContext(
        rank=int(os.environ.get("RANK", 0)),
        world=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def start(device_name: str) -> tuple[DistContext, str]:
    """Join the process group torchrun set up; returns the context and the device to use.

    gloo on CPUs, nccl on GPUs (one GPU per local rank).
    """
    ctx = from_environment()
    if not ctx.enabled:
        return ctx, device_name
    use_gpu = device_name != "cpu" and torch.cuda.is_available()
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device_name}: no CUDA GPU is available on this machine")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world))
    if use_gpu and local_world > torch.cuda.device_count():
        # nccl refuses two ranks on one GPU, and cuda:N past the last GPU fails deep in CUDA:
        # say so before any process group exists.
        raise InputError(f"{local_world} processes on this machine but {torch.cuda.device_count()} CUDA GPU(s): "
                         f"nccl needs one GPU per process",
                         hint=f"use --nproc {torch.cuda.device_count()} (one per GPU), or --device cpu for CPU processes")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_gpu else "gloo", timeout=COLLECTIVE_TIMEOUT)
    if use_gpu:
        torch.cuda.set_device(ctx.local_rank)
        return ctx, f"cuda:{ctx.local_rank}"
    return ctx, "cpu"


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` when not distributed)."""
    if not ctx.enabled:
        return [obj]
    gathered: list[Any] = [None] * ctx.world
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_rows(tensor: torch.Tensor, ctx: DistContext) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (N_r, ...), in rank order; ranks may hold different N_r.

    Sent as tensors (padded to the longest share), not pickles: 250k images x 1,280
    features in all_gather_object would be pickled, copied and unpickled on every rank.
    """
    if not ctx.enabled:
        return [tensor]
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl moves GPU tensors only
    counts = torch.tensor([tensor.shape[0]], device=device)
    all_counts = [torch.zeros_like(counts) for _ in range(ctx.world)]
    dist.all_gather(all_counts, counts)
    longest = int(max(c.item() for c in all_counts))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor
    received = [torch.empty_like(padded) for _ in range(ctx.world)]
    dist.all_gather(received, padded)
    return [part[: int(count.item())].cpu() for part, count in zip(received, all_counts)]


def sum_all(values: list[float], ctx: DistContext) -> list[float]:
    """Element-wise sum of ``values`` over all ranks."""
    if not ctx.enabled:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl reduces GPU tensors only
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
