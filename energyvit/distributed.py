"""Process groups for `torchrun`: one process per device, DDP over NCCL (GPU) or gloo (CPU), and
how the training loop shares gradients between processes (GradientSync).

A plain `energyvit pretrain` is world size 1 and touches none of torch.distributed.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

BUCKET_MIB = 25  # the most one collective of AllReduceGradients and broadcast_parameters carries (DDP's default)


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


def all_gather(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """(world_size, *values.shape): every rank's `values` (the same shape on each), by rank."""
    if not info.enabled:
        return values[None]
    out = values.new_empty((info.world_size, *values.shape))
    dist.all_gather(list(out.unbind(0)), values.contiguous())
    return out


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks; its gradient is the sum of the ranks' gradients of the
    result (each rank's loss depends on every rank's input through the sum)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        dist.all_reduce(values)
        return values

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def sum_over_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Differentiable all-reduce (sum): the gradient reaches every rank's input."""
    return _SumOverRanks.apply(values) if info.enabled else values


def broadcast_(values: torch.Tensor, info: DistInfo, src: int = 0) -> torch.Tensor:
    """`values` replaced in place by rank `src`'s."""
    if info.enabled:
        dist.broadcast(values, src)
    return values


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# How long the other ranks wait for work on rank 0 alone (the end-of-pretraining evaluation): far
# beyond any evaluation, so only a crash ends the wait (torchrun then stops every rank).
MAIN_ONLY_TIMEOUT = timedelta(hours=24)
T = TypeVar("T")


def run_on_main(info: DistInfo, work: Callable[[], T], timeout: timedelta = MAIN_ONLY_TIMEOUT) -> T | None:
    """`work()` on rank 0 while the other ranks wait for it; its result on rank 0, None elsewhere.

    They wait in a barrier of a gloo group made for this with `timeout`, not of the default group:
    NCCL's default timeout (10 minutes) would end the job during a longer evaluation. Rank 0 enters
    the barrier even when `work` raises (then the others go on, and rank 0 raises its error)."""
    if not info.enabled:
        return work()
    group = dist.new_group(backend="gloo", timeout=timeout)  # collective: every rank arrives here together
    try:
        return work() if info.is_main else None
    finally:
        dist.barrier(group=group)
        dist.destroy_process_group(group)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def ddp_energy_fn(ddp: torch.nn.Module, module: torch.nn.Module):
    """An energy function for one micro-batch's restoration under DDP: the first call runs the
    DDP forward, which arms the gradient all-reduce of the coming backward; later calls (steps
    2..K) run the bare module. DDP aborts on a second forward before its backward, and needs
    none: each parameter's gradient accumulates once per backward however often it was used."""
    calls = 0

    def energy(x: torch.Tensor, keep: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return (ddp if calls == 1 else module)(x, keep, **kwargs)

    return energy


def coalesced(tensors: list[Tensor], collective: Callable[[Tensor], None], bucket_mib: float = BUCKET_MIB) -> None:
    """Run `collective` (in place) on the tensors packed into few flat buffers, one per run of one
    device and dtype of at most bucket_mib (a larger tensor alone), and copy the results back."""
    cap, bucket, size = bucket_mib * 2**20, [], 0

    def flush() -> None:
        if bucket:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            collective(flat)
            torch._foreach_copy_(bucket, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in bucket]), bucket)])

    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (t.device != bucket[0].device or t.dtype != bucket[0].dtype or size + nbytes > cap):
            flush()
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    flush()


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Every rank takes rank `src`'s parameters and buffers, as DDP does when it wraps a module."""
    with torch.no_grad():
        coalesced([t.detach() for t in (*module.parameters(), *module.buffers())], lambda flat: dist.broadcast(flat, src))


class GradientSync(Protocol):
    """How one optimizer step of the training loop shares its gradients between processes."""

    def micro_batch(self, last: bool) -> AbstractContextManager:
        """The context of one micro-batch's forward and backward (last: the step's final one)."""

    def reduce(self) -> None:
        """After the final micro-batch's backward: from here on p.grad holds the mean over ranks."""


class LocalGradients:
    """One process: nothing to share."""

    def micro_batch(self, last: bool) -> AbstractContextManager:
        return nullcontext()

    def reduce(self) -> None:
        pass


class DDPGradients:
    """DistributedDataParallel: its hooks all-reduce during the final micro-batch's backward (the
    others run under no_sync, so the all-reduce happens once per optimizer step)."""

    def __init__(self, ddp: torch.nn.parallel.DistributedDataParallel) -> None:
        self.ddp = ddp

    def micro_batch(self, last: bool) -> AbstractContextManager:
        return nullcontext() if last else self.ddp.no_sync()

    def reduce(self) -> None:
        pass


class AllReduceGradients:
    """The mean over ranks of every trainable gradient, computed after the final micro-batch's
    backward by a few bucketed all-reduces, for steps whose gradients DDP's hooks never see: the
    compiled step (its gradients come out of the compiled graph) and the CUDA-graphed one (a replay
    writes them). As in DDP, each gradient is divided by the world size and then summed over ranks,
    and the gradient tensors stay the same objects (a CUDA graph's static tensors stay static).
    The ranks must start from the same weights: broadcast_parameters, as DDP does."""

    def __init__(self, module: torch.nn.Module, group: dist.ProcessGroup | None = None,
                 bucket_mib: float = BUCKET_MIB) -> None:
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.group, self.bucket_mib = group, bucket_mib
        self.world_size = dist.get_world_size(group)

    def micro_batch(self, last: bool) -> AbstractContextManager:
        return nullcontext()

    def _mean(self, flat: Tensor) -> None:
        flat.div_(self.world_size)
        dist.all_reduce(flat, group=self.group)

    def reduce(self) -> None:
        # the same on every rank (the same model code), so every rank raises, none waits in a collective
        missing = [n for n, p in self.params if p.grad is None]
        if missing:
            raise RuntimeError(f"no gradient for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: the "
                               "gradient all-reduce needs one for every trainable parameter (freeze unused ones)")
        coalesced([p.grad for _, p in self.params], self._mean, self.bucket_mib)
