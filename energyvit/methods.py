"""The two pretraining methods behind `energyvit pretrain --method`, with one interface for the
training loop: what is trained, the micro-batch loss, per-epoch and final held-out metrics, and
what the checkpoint holds beyond the encoder.

- energy: the project's method (energyvit.model, restore, tasks).
- mae: the MAE baseline (energyvit.mae) on the same encoder, for comparisons.

Both expose `encoder`, an EnergyViT with timm key names, which the probe, finetune and export
tools read from the checkpoint's "model" entry.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from energyvit.distributed import ddp_energy_fn
from energyvit.engine import LossOptions, StepLoss, evaluate_restoration, task_loss, with_psnr
from energyvit.losses import restoration_loss
from energyvit.model import EnergyViT
from energyvit.sampling import derive_seed, seeded_generator
from energyvit.tasks import TaskMixture

METHODS = ("energy", "mae")
Samples = dict[str, tuple[Tensor, list[Tensor], Tensor]]  # per task: corrupted, steps, clean (for grids)


class EnergyMethod:
    name = "energy"

    def __init__(self, model: EnergyViT, mixture: TaskMixture, opts: LossOptions) -> None:
        self.encoder = self.module = model
        self.mixture, self.opts = mixture, opts
        self.task_names = mixture.names
        # The norm and cls energies read the residual stream before the final LayerNorm, so that
        # norm never gets a gradient; freezing it says so (DDP needs a gradient for every
        # trainable parameter) and changes nothing else.
        if model.cfg.energy != "linear":
            model.norm.requires_grad_(False)

    def step_loss(self, ddp: nn.Module | None = None, step_fn=None) -> StepLoss:
        """Sample a task, corrupt, restore through K steps, score. The task is drawn on the CPU and
        the corruption on the images' device, both from the seed, so a resumed run repeats them.
        step_fn(clean, corrupted, generator) -> loss replaces the eager loss (the compiled step)."""
        model, mixture, opts = self.module, self.mixture, self.opts

        def step_loss(images: Tensor, seed: int) -> tuple[str, Tensor]:
            name = mixture.sample(seeded_generator(seed))
            generator = seeded_generator(derive_seed(seed, 1), images.device)
            corrupted = mixture.tasks[name](images, generator)
            if step_fn is not None:
                return name, step_fn(images, corrupted, generator)
            energy_fn = ddp_energy_fn(ddp, model) if ddp is not None else None
            return name, task_loss(model, images, corrupted, opts, generator, energy_fn)

        return step_loss

    def evaluate(self, images: Tensor, seed: int, keep_samples: int = 0, restore_fn=None) -> tuple[dict, Samples]:
        """Per task: held-out MSE/PSNR of corrupted and restored images, energies; grid samples."""
        return evaluate_restoration(self.module, images, self.mixture, seed, restore_fn=restore_fn,
                                    keep_samples=keep_samples)

    def record(self) -> dict:
        return {"step_sizes": [round(a, 6) for a in self.module.step_sizes.tolist()]}

    def checkpoint_extra(self) -> dict:
        return {}

    def load_extra(self, state: dict) -> None:
        pass


class MAEMethod:
    name = "mae"

    def __init__(self, encoder: EnergyViT, mask_ratio: float, norm_pix_loss: bool) -> None:
        from energyvit.mae import MAEBaseline

        self.module = MAEBaseline(encoder.cfg, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss)
        self.module.encoder.load_state_dict(encoder.state_dict())  # the same initial encoder as the energy method
        self.encoder = self.module.encoder
        self.task_names = ["mae"]
        for p in (self.encoder.restore_log_step, *(self.encoder.energy_head or nn.Identity()).parameters()):
            p.requires_grad_(False)  # MAE never uses the energy parameters

    def step_loss(self, ddp: nn.Module | None = None, step_fn=None) -> StepLoss:
        if step_fn is not None:
            raise ValueError("--compile applies to the energy method only")
        forward = ddp if ddp is not None else self.module

        def step_loss(images: Tensor, seed: int) -> tuple[str, Tensor]:
            return "mae", forward(images, seeded_generator(seed, images.device))

        return step_loss

    @torch.no_grad()
    def evaluate(self, images: Tensor, seed: int, keep_samples: int = 0, restore_fn=None) -> tuple[dict, Samples]:
        """Held-out MSE over the hidden patches (pixel units) of MAE's prediction, next to filling
        them with the per-channel mean pixel; grid samples show input with hidden patches at the
        mean | prediction pasted in | clean."""
        was_training = self.module.training
        self.module.eval()
        device = self.encoder.pixel_mean.device
        gen = torch.Generator(device=device).manual_seed(seed)
        totals = {"mse_corrupted": 0.0, "mse_restored": 0.0}
        samples: Samples = {}
        for i, clean in enumerate(images.split(256)):
            clean = clean.to(device)
            pred, mask = self.module.reconstruct(clean, gen)
            masked = clean * (1 - mask) + self.encoder.pixel_mean * mask
            pasted = clean * (1 - mask) + pred.clamp(0, 1) * mask
            totals["mse_corrupted"] += len(clean) * restoration_loss(masked, clean, mask).item()
            totals["mse_restored"] += len(clean) * restoration_loss(pasted, clean, mask).item()
            if i == 0 and keep_samples:
                samples["mae"] = (masked[:keep_samples].cpu(), [masked[:keep_samples].cpu(), pasted[:keep_samples].cpu()],
                                  clean[:keep_samples].cpu())
        self.module.train(was_training)
        return {"mae": with_psnr({k: v / len(images) for k, v in totals.items()})}, samples

    def record(self) -> dict:
        return {}

    def checkpoint_extra(self) -> dict:
        return {"mae": self.module.state_dict()}

    def load_extra(self, state: dict) -> None:
        self.module.load_state_dict(state["mae"])
