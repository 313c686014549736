"""The DataLoader of a training run, built once and reused every epoch: persistent worker
processes (no re-fork and no cold start per epoch), a few batches prefetched per worker, pinned
memory on CUDA. Its sampler is told each epoch's position (EpochSampler.set_epoch) before the
epoch is iterated, so the order stays a pure function of (seed, epoch, step) and a resumed run
reads what an uninterrupted one does.
"""
from __future__ import annotations

import os
import signal

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

MAX_DEFAULT_WORKERS = 8
PREFETCH_BATCHES = 4  # per worker: rides out a slow image or two without starving the step


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what a job scheduler granted), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def local_world_size() -> int:
    """Processes of this run on this machine: torchrun's LOCAL_WORLD_SIZE, 1 outside torchrun."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def default_num_workers() -> int:
    """DataLoader workers per process reading files: the usable CPUs shared among the processes
    of this machine, at most MAX_DEFAULT_WORKERS and at least 1."""
    return max(1, min(MAX_DEFAULT_WORKERS, usable_cpus() // local_world_size()))


def _ignore_stop_signals(worker_id: int) -> None:
    """Ctrl-C and SIGTERM reach every process of the foreground group or job: the main process
    finishes its step and saves (energyvit.pretrain.StopRequest), so its workers keep serving
    batches instead of dying with it (or running the main process's handler, which they inherit
    when forked). They end when the main process shuts them down or exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def training_loader(dataset: Dataset, batch_size: int, sampler: Sampler, num_workers: int,
                    device: torch.device | str) -> DataLoader:
    """A DataLoader for every epoch of a run: batches of `batch_size` keys from `sampler` (the
    last partial batch dropped), `num_workers` persistent worker processes (0: the main process
    reads), pinned batches on CUDA."""
    workers = num_workers > 0
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
                      pin_memory=torch.device(device).type == "cuda", persistent_workers=workers,
                      prefetch_factor=PREFETCH_BATCHES if workers else None,
                      worker_init_fn=_ignore_stop_signals if workers else None)
