"""The epochs of a training job (pretraining, fine-tuning), from where it stands to the last.

What both jobs share lives here: one persistent training loader whose sampler moves to each
epoch (energyvit.data.loader), the per-step lr schedule, a stop asked by a signal (the run saves
where it stopped, mid-epoch included, and says how to continue), a mid-epoch checkpoint on a
timer, the progress line and the metrics log on rank 0, and a non-finite loss reported with the
last good checkpoint. What differs is the job's: its checkpoint, and what it does at the end of
an epoch (save, evaluate, log, print), given as `Job.end_epoch`.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from energyvit.checkpoint import save_checkpoint
from energyvit.data.loader import training_loader
from energyvit.distributed import DistInfo, GradientSync, all_ranks_true, barrier
from energyvit.metrics import MetricsLogger
from energyvit.progress import Progress
from energyvit.resume import LAST_CHECKPOINT
from energyvit.runtime import StopRequest
from energyvit.sampling import EpochSampler
from energyvit.training import EpochPlan, StepLoss, TrainingDiverged, cosine_lr, train_one_epoch


@dataclass
class RunContext:
    """The run's tools, as a job's hooks get them."""
    dist: DistInfo
    device: torch.device
    out: Path  # the output folder
    logger: MetricsLogger | None  # rank 0's
    say: Callable[..., None]  # print on rank 0, nothing elsewhere
    stopping: Callable[[], bool]  # whether a stop was asked on any rank (a collective: every rank calls it)

    @property
    def main(self) -> bool:  # rank 0, which writes files
        return self.dist.is_main


@dataclass
class EpochEnd:
    """What a job's end_epoch gets: the finished epoch's numbers and the run's tools."""
    run: RunContext
    epoch: int
    global_step: int
    seconds: float  # the epoch's training time
    stats: dict  # train_one_epoch's


class Job(Protocol):
    """A training job as the epoch loop drives it (energyvit.pretrain.Training, energyvit.finetune.Finetuning)."""
    options: object  # .train (TrainOptions fields), .run (checkpoint_minutes, tensorboard, wandb, wandb_project), flat()
    optimizer: torch.optim.Optimizer
    lr: float
    steps_per_epoch: int
    epoch: int  # where the job stands: the epoch to run next,
    step_in_epoch: int  # its optimizer steps already done,
    global_step: int  # and the optimizer steps done in all
    autocast_dtype: torch.dtype | None

    def checkpoint(self, epoch: int, step_in_epoch: int, global_step: int) -> dict:
        """The checkpoint of the position (epoch, steps of it done, steps done in all)."""

    def end_epoch(self, end: EpochEnd) -> None:
        """After an epoch's last step, on every rank: save its checkpoint (rank 0), evaluate, log, print."""


@dataclass
class Steps:
    """What one epoch's optimizer steps train: the module, the micro-batch loss, the images."""
    module: nn.Module
    step_loss: StepLoss
    loss_names: list[str]
    grad_sync: GradientSync
    images: Dataset
    num_images: int
    num_workers: int


def run_epochs(job: Job, steps: Steps, dist_info: DistInfo, device: torch.device, out: Path, prog: str,
               before: Callable[[RunContext], None] | None = None) -> None:
    """The epochs from the job's position to the last; `before(run)` runs first (on every rank).
    Raises KeyboardInterrupt after saving when stopped by a signal, and
    TrainingDiverged (naming the last good checkpoint) on a non-finite loss."""
    train_opts, run_opts = job.options.train, job.options.run
    main = dist_info.is_main
    say = print if main else (lambda *a, **k: None)
    ckpt_path = out / LAST_CHECKPOINT
    total, warmup = train_opts.epochs * job.steps_per_epoch, train_opts.warmup_epochs * job.steps_per_epoch
    min_lr = getattr(train_opts, "min_lr", 0.0)
    wandb = {"project": run_opts.wandb_project, "config": job.options.flat()} if run_opts.wandb else None
    logger = MetricsLogger(out, run_opts.tensorboard, job.global_step or None, wandb) if main else None
    if logger is not None and logger.tensorboard_note:
        say(f"{prog}: {logger.tensorboard_note}")
    progress = Progress(total, first_step=job.global_step, desc=prog.split()[-1]) if main else None
    epoch, last_save = job.epoch, time.monotonic()

    def on_step(global_step: int, step_in_epoch: int, info: dict) -> None:
        nonlocal last_save
        if progress is not None:
            progress.update(global_step, info["images"], loss=info["loss"])
        minutes = run_opts.checkpoint_minutes
        if main and minutes and time.monotonic() - last_save > 60 * minutes and step_in_epoch < job.steps_per_epoch:
            save_checkpoint(ckpt_path, job.checkpoint(epoch, step_in_epoch, global_step))
            last_save = time.monotonic()

    try:
        with StopRequest(prog) as stop:
            stopping = lambda: not all_ranks_true(not stop.requested, dist_info, device)  # noqa: E731
            run = RunContext(dist_info, device, out, logger, say, stopping)
            if before is not None:
                before(run)
            step_in_epoch, global_step = job.step_in_epoch, job.global_step
            per_step = train_opts.batch_size * train_opts.accum_iter
            # one loader for the whole run (its workers persist); the sampler moves to each epoch
            sampler = EpochSampler(steps.num_images, per_step, train_opts.seed, epoch, dist_info.rank,
                                   dist_info.world_size, start_step=step_in_epoch)
            loader = training_loader(steps.images, train_opts.batch_size, sampler, steps.num_workers, device)
            while epoch < train_opts.epochs:
                t0 = time.perf_counter()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                sampler.set_epoch(epoch, step_in_epoch)
                plan = EpochPlan(epoch, job.steps_per_epoch, step_in_epoch, global_step, train_opts.accum_iter,
                                 train_opts.clip_grad, job.autocast_dtype, train_opts.seed)
                stats = train_one_epoch(steps.module, steps.step_loss, loader, job.optimizer, plan,
                                        lambda s: cosine_lr(job.lr, s, total, warmup, min_lr), steps.loss_names,
                                        dist_info, steps.grad_sync, should_stop=stopping, on_step=on_step)
                global_step += stats["steps"]
                step_in_epoch += stats["steps"]
                if stats["stopped"] and step_in_epoch < job.steps_per_epoch:
                    if main:
                        save_checkpoint(ckpt_path, job.checkpoint(epoch, step_in_epoch, global_step))
                    say(f"{prog}: stopped at epoch {epoch} step {step_in_epoch}/{job.steps_per_epoch}; "
                        f"continue with --resume {ckpt_path}", flush=True)
                    raise KeyboardInterrupt
                job.end_epoch(EpochEnd(run, epoch, global_step, time.perf_counter() - t0, stats))
                last_save = time.monotonic()  # end_epoch saved the epoch
                barrier(dist_info)
                epoch, step_in_epoch = epoch + 1, 0
                if stopping():  # asked after the epoch's last step
                    say(f"{prog}: stopped after epoch {epoch}; continue with --resume {ckpt_path}", flush=True)
                    raise KeyboardInterrupt
    except TrainingDiverged as e:
        raise TrainingDiverged(f"{e}; stopped without applying it. Last good checkpoint: "
                               f"{ckpt_path if ckpt_path.exists() else 'none yet'}") from None
    finally:
        if progress is not None:
            progress.close()
        if logger is not None:
            logger.close()
