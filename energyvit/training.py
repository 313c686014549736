"""The generic pretraining loop: optimizer parameter groups, the lr schedule, and one epoch of
optimizer steps over a method's micro-batch loss (any method of energyvit.methods)."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from energyvit.data.pixels import to_float_pixels
from energyvit.distributed import DistInfo, GradientSync, LocalGradients, all_ranks_true, all_reduce_sum
from energyvit.options import check_fields, non_negative, option, positive
from energyvit.sampling import derive_seed

PRECISIONS = ("auto", "bf16", "fp32")


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` (one of PRECISIONS) on `device`, None for full fp32:
    auto is bf16 on CUDA (where supported) and fp32 on the CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return torch.bfloat16 if precision == "bf16" else None

# A micro-batch's loss: (clean images on the training device, their labels there (-1 where
# unlabeled, None for batches without; pretraining ignores them), seed of this micro-batch) ->
# (name of what was trained, e.g. the task, loss)
StepLoss = Callable[[Tensor, Tensor, int], tuple[str, Tensor]]


@dataclass(frozen=True)
class TrainOptions:
    """Optimization of a pretraining run."""

    batch_size: int = option(64, "images per process per micro-batch", rule=positive)
    accum_iter: int = option(1, "micro-batches per optimizer step (effective batch = batch_size x accum_iter x "
                             "processes)", rule=positive)
    epochs: int = option(200, "training epochs", rule=positive, resumable=True)
    warmup_epochs: int = option(2, "epochs of linear lr warmup", rule=non_negative)
    blr: float = option(4e-3, "base lr: lr = blr * effective batch / 256", rule=positive)
    lr: float | None = option(None, "absolute lr (overrides --blr)", parse=float, rule=positive)
    weight_decay: float = option(0.05, "AdamW weight decay", rule=non_negative)
    clip_grad: float | None = option(None, "clip the global gradient norm to this (default: off)", parse=float,
                                     rule=positive)
    precision: str = option("auto", "auto: bf16 autocast on CUDA, fp32 on the CPU", choices=PRECISIONS)
    seed: int = option(0, "seed of the weights, data order, augmentation and corruptions")

    def __post_init__(self) -> None:
        check_fields(self)

    def lr_for(self, processes: int) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size * self.accum_iter * processes / 256


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float | None = None,
                 layer_of: Callable[[str], int] | None = None) -> list[dict]:
    """AdamW parameter groups. No weight decay on biases, norms, tokens and step sizes (1-d, or a
    leading dimension of 1), as MAE. With layer_decay, layer_of(name) gives each parameter's depth
    (0 = embeddings .. L = the last layer) and its group an `lr_scale` of layer_decay ** (L - depth),
    for the caller to apply (fine-tuning's layer-wise lr decay). Groups in order of (depth, decay)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    layer = {n: layer_of(n) if layer_of is not None else 0 for n, _ in named}
    top = max(layer.values(), default=0)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in named:
        decay = not (p.ndim <= 1 or p.shape[0] == 1)
        key = (layer[name], decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0}
            if layer_decay is not None:
                groups[key]["lr_scale"] = layer_decay ** (top - layer[name])
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def cosine_lr(base_lr: float, step: int, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup, then half-cycle cosine decay to min_lr (MAE's schedule, per step)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class LossTrend:
    """Training that goes wrong with finite numbers: the epoch loss rising `epochs` times in a row
    to well above the best epoch so far (a diverging lr, say) gives a warning."""

    def __init__(self, epochs: int = 3, factor: float = 1.2) -> None:
        self.epochs, self.factor, self.losses = epochs, factor, []

    def check(self, loss: float) -> list[str]:
        self.losses.append(loss)
        recent = self.losses[-self.epochs - 1:]
        rising = len(recent) == self.epochs + 1 and all(b > a for a, b in zip(recent, recent[1:]))
        if rising and loss > self.factor * min(self.losses):
            return [f"the training loss rose for {self.epochs} epochs in a row, to {loss:.4g} (best {min(self.losses):.4g});"
                    " the lr may be too high (--blr)"]
        return []


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
    grad_sync: GradientSync = LocalGradients(),
    should_stop: Callable[[], bool] = lambda: False,
    on_step: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Optimizer steps of one epoch; each step accumulates gradients over plan.accum_iter
    micro-batches from `batches` ((images, labels, skipped files) as the DataLoader yields them),
    then shares them between ranks through `grad_sync` (DDP's hooks, or an explicit all-reduce).

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
        for group in optimizer.param_groups:  # lr_scale: fine-tuning's layer-wise decay
            group["lr"] = lr_at_step(global_step) * group.get("lr_scale", 1.0)
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for micro in range(plan.accum_iter):
            images, labels, skipped = next(batch_iter)
            images = to_float_pixels(images, device)
            labels = torch.as_tensor(labels).to(device, non_blocking=True) if labels is not None else None
            with grad_sync.micro_batch(last=micro == plan.accum_iter - 1):
                with autocast:
                    name, loss = step_loss(images, labels, derive_seed(plan.seed, global_step, micro, dist.rank))
                (loss / plan.accum_iter).backward()
            losses.append((name, loss.detach().float()))
            sums[2 * n] += int(torch.as_tensor(skipped).sum())
        grad_sync.reduce()  # the mean gradient over ranks: clipped and checked the same on every rank
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
