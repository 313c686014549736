"""One training step, one training epoch and the restoration evaluation."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from energyvit.data import ImageSplit, iterate_batches, random_shift
from energyvit.losses import restoration_loss
from energyvit.model import EnergyViT
from energyvit.restore import restore
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


def task_loss(model: EnergyViT, clean: Tensor, corrupted: Corrupted, opts: LossOptions, generator=None) -> Tensor:
    """Restore in training mode (create_graph) and score against the clean batch."""
    result = restore(model, corrupted.image, corrupted.update_mask, create_graph=True,
                     noise_std=opts.langevin_std, generator=generator)
    region = corrupted.loss_mask if opts.region == "corrupted" else None
    return restoration_loss(result.restored, clean, region, opts.norm_pix_patch)


def cosine_lr(base_lr: float, step: int, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup, then half-cycle cosine decay to min_lr (MAE's schedule, per step)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_one_epoch(
    model: EnergyViT,
    train: ImageSplit,
    mixture: TaskMixture,
    optimizer: torch.optim.Optimizer,
    opts: LossOptions,
    batch_size: int,
    generator: torch.Generator,
    lr_at_step,
    first_step: int,
    clip_grad: float | None = None,
    max_shift: int = 0,
    step_fn=None,
) -> dict:
    """Train one pass over `train`; returns the epoch's mean loss per task and overall.

    step_fn(clean, corrupted) -> loss replaces the eager loss computation (e.g. a compiled step).
    """
    model.train()
    device = model.pixel_mean.device
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    step = first_step
    for images, _ in iterate_batches(train, batch_size, generator):
        images = random_shift(images, max_shift, generator)
        for group in optimizer.param_groups:
            group["lr"] = lr_at_step(step)
        name, corrupted = mixture(images, generator)  # sampled on the CPU: one RNG stream on any device
        images, corrupted = images.to(device), corrupted.to(device)
        loss = step_fn(images, corrupted) if step_fn else task_loss(model, images, corrupted, opts, generator)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step} (task {name})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        sums[name] = sums.get(name, 0.0) + loss.item()
        counts[name] = counts.get(name, 0) + 1
        step += 1
    stats = {f"loss_{n}": sums[n] / counts[n] for n in sums}
    stats["loss"] = sum(sums.values()) / max(1, sum(counts.values()))
    stats["steps"] = step - first_step
    return stats


def evaluate_restoration(
    model: EnergyViT, held_out: ImageSplit, mixture: TaskMixture, seed: int, batch_size: int = 256, restore_fn=None
) -> dict[str, dict[str, float]]:
    """Per task, the MSE of the corrupted input and of the restored output on held-out images,
    over each task's loss region, with corruptions drawn from a fixed seed; also mean energies.

    restore_fn(image, update_mask) -> Restoration replaces eager inference restoration."""
    restore_fn = restore_fn or (lambda image, mask: restore(model, image, mask))
    model.eval()
    device = model.pixel_mean.device
    with torch.no_grad():  # the clean images are the same for every task: score them once
        energy_clean = sum(model(images.to(device)).sum().item()
                           for images, _ in iterate_batches(held_out, batch_size, drop_last=False))
    results = {}
    for name, task in mixture.tasks.items():
        gen = torch.Generator().manual_seed(seed)
        totals = {"mse_corrupted": 0.0, "mse_restored": 0.0, "energy_corrupted": 0.0, "energy_restored": 0.0}
        n = 0
        for images, _ in iterate_batches(held_out, batch_size, drop_last=False):
            corrupted = task(images, gen).to(device)
            images = images.to(device)
            result = restore_fn(corrupted.image, corrupted.update_mask)
            with torch.no_grad():
                w = len(images)
                totals["mse_corrupted"] += w * restoration_loss(corrupted.image, images, corrupted.loss_mask).item()
                totals["mse_restored"] += w * restoration_loss(result.restored, images, corrupted.loss_mask).item()
                totals["energy_corrupted"] += result.energies[0].sum().item()
                totals["energy_restored"] += result.energies[-1].sum().item()
            n += w
        results[name] = {k: v / n for k, v in totals.items()} | {"energy_clean": energy_clean / n}
    model.train()
    return results
