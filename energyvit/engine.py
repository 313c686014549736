"""One training step, one training epoch and the restoration evaluation."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from energyvit.distributed import DistInfo, all_ranks_true, all_reduce_sum
from energyvit.losses import restoration_loss
from energyvit.model import EnergyViT
from energyvit.restore import restore
from energyvit.sampling import derive_seed
from energyvit.tasks import Corrupted, TaskMixture

LOSS_REGIONS = ("corrupted", "all")


@dataclass(frozen=True)
class LossOptions:
    region: str = "corrupted"  # the task's region, or the whole image
    norm_pix_patch: int | None = None  # patch size for per-patch normalized targets; None: off
    langevin_std: float = 0.0  # noise added in each restoration step while training

    def __post_init__(self) -> None:
        if self.region not in LOSS_REGIONS:
            raise ValueError(f"unknown loss region {self.region!r}; choose one of {', '.join(LOSS_REGIONS)}")


def task_loss(model: EnergyViT, clean: Tensor, corrupted: Corrupted, opts: LossOptions, generator=None,
              energy_fn: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Restore in training mode (create_graph) and score against the clean batch.

    energy_fn: what computes E(x) if not the model itself (the DDP wrapper, which syncs gradients)."""
    result = restore(model, corrupted.image, corrupted.update_mask, create_graph=True,
                     noise_std=opts.langevin_std, generator=generator, energy_fn=energy_fn)
    region = corrupted.loss_mask if opts.region == "corrupted" else None
    return restoration_loss(result.restored, clean, region, opts.norm_pix_patch)


# (clean images on the training device, seed of this micro-batch) -> (task name, loss)
StepLoss = Callable[[Tensor, int], tuple[str, Tensor]]


def cosine_lr(base_lr: float, step: int, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup, then half-cycle cosine decay to min_lr (MAE's schedule, per step)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the step was not applied."""


@dataclass
class EpochPlan:
    """What one call of train_one_epoch does: optimizer steps [start_step, steps) of `epoch`."""
    epoch: int
    steps: int  # optimizer steps in a full epoch
    start_step: int  # steps of this epoch already done (a resumed run)
    global_step: int  # optimizer steps done before this call, over all epochs
    accum_iter: int = 1
    clip_grad: float | None = None
    amp_dtype: torch.dtype | None = None  # autocast dtype, None for full precision
    seed: int = 0


def train_one_epoch(
    model: torch.nn.Module,
    step_loss: StepLoss,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    plan: EpochPlan,
    lr_at_step: Callable[[int], float],
    task_names: list[str],
    dist: DistInfo = DistInfo(),
    ddp: torch.nn.Module | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_step: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Optimizer steps of one epoch; each step accumulates gradients over plan.accum_iter
    micro-batches from `batches` ((images, labels, skipped files) as the DataLoader yields them).

    Every micro-batch's randomness comes from derive_seed(seed, global step, micro-batch, rank).
    A non-finite loss or gradient norm on any rank raises TrainingDiverged before the optimizer
    step. should_stop() is asked after each step: True ends the epoch early (an interrupt).
    on_step(global_step, step_in_epoch, info) is called after each step.
    Returns the epoch's mean losses (per task and overall, over all ranks), mean gradient norm,
    images, skipped files and whether it stopped early.
    """
    model.train()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    names = {n: i for i, n in enumerate(task_names)}
    n = len(names)
    sums = torch.zeros(2 * n + 1, dtype=torch.float64)  # per-task loss sums and counts, skipped files
    grad_norm_sum, images_seen = 0.0, 0  # the same on every rank: not summed over ranks
    autocast = (torch.autocast(device.type, dtype=plan.amp_dtype) if plan.amp_dtype is not None else nullcontext())
    batch_iter = iter(batches)
    step, global_step, stopped = plan.start_step, plan.global_step, False
    while step < plan.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at_step(global_step)
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for micro in range(plan.accum_iter):
            images, _, skipped = next(batch_iter)
            images = images.to(device, non_blocking=True)
            last = micro == plan.accum_iter - 1
            sync = ddp.no_sync() if ddp is not None and not last else nullcontext()  # all-reduce once per step
            with sync:
                with autocast:
                    name, loss = step_loss(images, derive_seed(plan.seed, global_step, micro, dist.rank))
                (loss / plan.accum_iter).backward()
            losses.append((name, loss.detach().float()))
            sums[2 * n] += int(torch.as_tensor(skipped).sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, plan.clip_grad or math.inf)
        finite = all(torch.isfinite(l).item() for _, l in losses) and math.isfinite(grad_norm.item())
        if not all_ranks_true(finite, dist, device):
            bad = ", ".join(f"{n}: {l.item():.4g}" for n, l in losses)
            raise TrainingDiverged(f"non-finite loss or gradient at epoch {plan.epoch} step {step} "
                                   f"(global step {global_step}; losses {bad}; gradient norm {grad_norm.item():.4g})")
        optimizer.step()
        for name, loss in losses:
            sums[names[name]] += loss.item()
            sums[n + names[name]] += 1
        step_images = images.shape[0] * plan.accum_iter * dist.world_size
        grad_norm_sum, images_seen = grad_norm_sum + grad_norm.item(), images_seen + step_images
        step, global_step = step + 1, global_step + 1
        if on_step is not None:
            on_step(global_step, step, {"loss": sum(l.item() for _, l in losses) / len(losses),
                                        "images": step_images})
        if should_stop():
            stopped = True
            break
    done = step - plan.start_step
    sums = all_reduce_sum(sums.to(device), dist).cpu()
    stats = {f"loss_{t}": (sums[i] / sums[n + i]).item() for t, i in names.items() if sums[n + i] > 0}
    stats["loss"] = (sums[:n].sum() / sums[n:2 * n].sum().clamp_min(1)).item()
    stats["grad_norm"] = grad_norm_sum / max(1, done)
    stats.update(steps=done, images=images_seen, skipped_files=int(sums[2 * n]), stopped=stopped)
    return stats


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of a mean squared error on [0, 1] pixels."""
    return 10.0 * math.log10(1.0 / mse) if mse > 0 else math.inf


def with_psnr(errors: dict[str, float]) -> dict[str, float]:
    """mse_corrupted / mse_restored plus their PSNRs."""
    return errors | {"psnr_corrupted": psnr(errors["mse_corrupted"]), "psnr_restored": psnr(errors["mse_restored"])}


def evaluate_restoration(
    model: EnergyViT, images: Tensor, mixture: TaskMixture, seed: int, batch_size: int = 256, restore_fn=None,
    keep_samples: int = 0,
) -> tuple[dict[str, dict[str, float]], dict[str, tuple[Tensor, list[Tensor], Tensor]]]:
    """Per task, the MSE (and PSNR) of the corrupted input and of the restored output on held-out
    `images`, over each task's loss region, with corruptions drawn from a fixed seed; also mean
    energies of clean, corrupted and restored images.

    restore_fn(image, update_mask) -> Restoration replaces eager inference restoration.
    keep_samples: also return, per task, (corrupted, every restoration step, clean) of the first
    keep_samples images (on the CPU), for pictures."""
    restore_fn = restore_fn or (lambda image, mask: restore(model, image, mask))
    was_training = model.training
    model.eval()
    device = model.pixel_mean.device
    chunks = images.split(batch_size)
    with torch.no_grad():  # the clean images are the same for every task: score them once
        energy_clean = sum(model(x.to(device)).sum().item() for x in chunks)
    results, samples = {}, {}
    for name, task in mixture.tasks.items():
        gen = torch.Generator().manual_seed(seed)
        totals = {"mse_corrupted": 0.0, "mse_restored": 0.0, "energy_corrupted": 0.0, "energy_restored": 0.0}
        for i, clean in enumerate(chunks):
            corrupted = task(clean, gen).to(device)
            clean = clean.to(device)
            result = restore_fn(corrupted.image, corrupted.update_mask)
            with torch.no_grad():
                w = len(clean)
                totals["mse_corrupted"] += w * restoration_loss(corrupted.image, clean, corrupted.loss_mask).item()
                totals["mse_restored"] += w * restoration_loss(result.restored, clean, corrupted.loss_mask).item()
                totals["energy_corrupted"] += result.energies[0].sum().item()
                totals["energy_restored"] += result.energies[-1].sum().item()
            if i == 0 and keep_samples:
                samples[name] = (corrupted.image[:keep_samples].cpu(), [s[:keep_samples].cpu() for s in result.steps],
                                 clean[:keep_samples].cpu())
        results[name] = with_psnr({k: v / len(images) for k, v in totals.items()}
                                  | {"energy_clean": energy_clean / len(images)})
    model.train(was_training)
    return results, samples
