"""The energy method (energyvit.model, restore, tasks, objective) behind the training loop's
PretrainingMethod interface: sample a task, corrupt, restore through K steps, score; held-out
restoration metrics per task."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from energyvit.distributed import ddp_energy_fn
from energyvit.losses import restoration_loss, with_psnr
from energyvit.methods.base import Samples
from energyvit.model import EnergyViT
from energyvit.objective import EnergyOptions, task_loss
from energyvit.restore import VisibleEncoderEnergy, restore
from energyvit.sampling import derive_seed, seeded_generator
from energyvit.tasks import TaskMixture
from energyvit.training import StepLoss


class EnergyMethod:
    name = "energy"

    def __init__(self, model: EnergyViT, mixture: TaskMixture, opts: EnergyOptions, compiled: bool = False,
                 eval_mixture: TaskMixture | None = None) -> None:
        """compiled: the training step and the evaluation's restoration run through torch.compile
        (energyvit.compiled; eager fallback with a warning where this torch cannot).
        eval_mixture: the tasks of the held-out evaluation, if not the training ones (pretrain's
        sparse restoration is evaluated on every hidden patch, with every patch entering)."""
        self.encoder = self.module = model
        self.mixture, self.opts = mixture, opts
        self.eval_mixture = eval_mixture or mixture
        self.task_names = mixture.names
        # DDP (and AllReduceGradients) need a gradient for every trainable parameter: freeze what the
        # readout never uses
        for p in model.unused_parameters():
            p.requires_grad_(False)
        self.step_fn = self.restore_fn = None
        if compiled:
            from energyvit.compiled import compiled_restore, compiled_train_step  # torch.compile only when asked

            self.step_fn, self.restore_fn = compiled_train_step(model, opts), compiled_restore(model)

    def step_loss(self, ddp: nn.Module | None = None) -> StepLoss:
        """Sample a task, corrupt, restore through K steps, score. The task is drawn on the CPU and
        the corruption on the images' device, both from the seed, so a resumed run repeats them."""
        model, mixture, opts, step_fn = self.module, self.mixture, self.opts, self.step_fn
        if step_fn is not None and ddp is not None:  # pretrain syncs them with distributed.AllReduceGradients
            raise ValueError("the compiled or graphed step makes its gradients outside DDP's hooks: DDP cannot "
                             "all-reduce them")
        if ddp is not None and model.cfg.encoder_input == "visible":  # pretrain: AllReduceGradients
            raise ValueError("the visible/hidden split runs the encoder outside the energy's forward: DDP cannot "
                             "all-reduce its gradients")

        def step_loss(images: Tensor, labels: Tensor, seed: int) -> tuple[str, Tensor]:
            name = mixture.sample(seeded_generator(seed))
            generator = seeded_generator(derive_seed(seed, 1), images.device)
            corrupted = mixture.tasks[name](images, generator)
            if step_fn is not None:
                return name, step_fn(images, corrupted, generator)
            energy_fn = ddp_energy_fn(ddp, model) if ddp is not None else None
            return name, task_loss(model, images, corrupted, opts, generator, energy_fn)

        return step_loss

    def evaluate(self, images: Tensor, seed: int, keep_samples: int = 0) -> tuple[dict, Samples]:
        """Per task: held-out MSE/PSNR of corrupted and restored images, energies; grid samples."""
        return evaluate_restoration(self.module, images, self.eval_mixture, seed, restore_fn=self.restore_fn,
                                    keep_samples=keep_samples)

    def record(self) -> dict:
        record = {"step_sizes": [round(a, 6) for a in self.module.step_sizes.tolist()]}
        patch = self.module.mask_fill_patch
        if patch is not None:  # --mask_fill learned: where its pixels went (0.5 each at init)
            record["mask_fill_patch"] = {k: round(getattr(patch, k)().item(), 6) for k in ("min", "mean", "max")}
        return record

    def warnings(self) -> list[str]:
        """Step sizes that collapsed: a_k below 1% of its initial value hardly moves the image any
        more, so the restoration (and what it teaches the model) has stopped."""
        init = self.module.cfg.step_size_init
        small = [f"a_{k + 1} = {a:.3g}" for k, a in enumerate(self.module.step_sizes.tolist()) if a < 0.01 * init]
        if small:
            return [f"step sizes collapsed towards 0 ({', '.join(small)}, from {init:g}): restoration has stopped "
                    "moving the image; the lr may be too high (--blr)"]
        return []

    def checkpoint_extra(self) -> dict:
        return {}

    def load_extra(self, state: dict) -> None:
        pass


def evaluate_restoration(
    model: EnergyViT, images: Tensor, mixture: TaskMixture, seed: int, batch_size: int = 256, restore_fn=None,
    keep_samples: int = 0,
) -> tuple[dict[str, dict[str, float]], Samples]:
    """Per task, the MSE (and PSNR) of the corrupted input and of the restored output on held-out
    `images`, over each task's loss region, with corruptions drawn from a fixed seed; also mean
    energies of clean, corrupted and restored images.

    restore_fn(image, update_mask) -> Restoration replaces eager inference restoration (not for a
    sparse task's corruptions, restored eagerly with their kept patches, nor for a model with
    encoder_input "visible" on mim, restored eagerly with the split, whose clean energy is then
    E(clean; V, H) of the same split).
    keep_samples: also return, per task, (corrupted, every restoration step, clean) of the first
    keep_samples images (on the CPU), for pictures.
    A task with a learned fill (Corrupted.fill_mask) is measured on the model's filled image."""
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
        split_clean = None  # E(clean; V, H) summed, when the task's corruptions are split
        for i, clean in enumerate(chunks):
            corrupted = task(clean, gen).to(device)
            clean = clean.to(device)
            image = corrupted.image
            if corrupted.fill_mask is not None:
                with torch.no_grad():
                    image = model.fill_hidden(image, corrupted.fill_mask)
            if corrupted.hidden is not None and model.cfg.encoder_input == "visible":
                result = restore(model, image, corrupted.update_mask, hidden=corrupted.hidden)
                with torch.no_grad():
                    split = VisibleEncoderEnergy(model, image, corrupted.hidden, grad=False)
                    split_clean = (split_clean or 0.0) + split(clean).sum().item()
            elif corrupted.keep is None:
                result = restore_fn(image, corrupted.update_mask)
            else:  # a sparse task (pretrain evaluates a full one instead): eager, the kept patches entering
                result = restore(model, image, corrupted.update_mask, keep=corrupted.keep)
            with torch.no_grad():
                w = len(clean)
                totals["mse_corrupted"] += w * restoration_loss(image, clean, corrupted.loss_mask).item()
                totals["mse_restored"] += w * restoration_loss(result.restored, clean, corrupted.loss_mask).item()
                totals["energy_corrupted"] += result.energies[0].sum().item()
                totals["energy_restored"] += result.energies[-1].sum().item()
            if i == 0 and keep_samples:
                samples[name] = (image[:keep_samples].cpu(), [s[:keep_samples].cpu() for s in result.steps],
                                 clean[:keep_samples].cpu())
        clean_total = energy_clean if split_clean is None else split_clean
        results[name] = with_psnr({k: v / len(images) for k, v in totals.items()}
                                  | {"energy_clean": clean_total / len(images)})
    model.train(was_training)
    return results, samples
