"""Process groups for `torchrun`: one process per device, DDP over NCCL (GPU) or gloo (CPU).

A plain `energyvit pretrain` is world size 1 and touches none of torch.distributed.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR/PORT); returns this process's place and its device (cuda:LOCAL_RANK on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world_size <= 1:
        return DistInfo(), dev
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank), dev


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """DDP without the per-forward buffer broadcast: the model's only buffers are its fixed pixel
    statistics, and restoration runs a forward per step. (torch 2.13 renamed the option.)"""
    ddp_cls = torch.nn.parallel.DistributedDataParallel
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp_cls).parameters
               else {"broadcast_buffers": False})
    return ddp_cls(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def all_ranks_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True only if `flag` holds on every rank (one tiny all-reduce), so ranks stop together."""
    if not info.enabled:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t)
    return t.item() == 0.0


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(values)
    return values


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def ddp_energy_fn(ddp: torch.nn.Module, module: torch.nn.Module):
    """An energy function for one micro-batch's restoration under DDP: the first call runs the
    DDP forward, which arms the gradient all-reduce of the coming backward; later calls (steps
    2..K) run the bare module. DDP aborts on a second forward before its backward, and needs
    none: each parameter's gradient accumulates once per backward however often it was used."""
    calls = 0

    def energy(x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return (ddp if calls == 1 else module)(x)

    return energy
