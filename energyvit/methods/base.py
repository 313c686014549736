"""What the training loop needs of a pretraining method, written down as a Protocol.

A method owns the module it trains, the encoder that the probe, finetune and export tools read
(an EnergyViT with timm key names, saved as the checkpoint's "model"), the micro-batch loss, its
held-out evaluation and what its checkpoint holds beyond the encoder.
"""
from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from energyvit.model import EnergyViT
from energyvit.training import StepLoss

# per task: (corrupted, every step [x_0 .. x_K], clean) of a few held-out images, for pictures
Samples = dict[str, tuple[Tensor, list[Tensor], Tensor]]


class PretrainingMethod(Protocol):
    name: str  # "energy" or "mae": the checkpoint's "method"
    module: nn.Module  # what the optimizer trains (wrapped in DDP under torchrun)
    encoder: EnergyViT  # the pretrained encoder
    task_names: list[str]  # the names step_loss reports, for per-task losses

    def step_loss(self, ddp: nn.Module | None = None) -> StepLoss:
        """The loss of one micro-batch from its images and seed, labels unused (ddp: `module` wrapped
        in DDP)."""

    def evaluate(self, images: Tensor, seed: int, keep_samples: int = 0) -> tuple[dict, Samples]:
        """Held-out metrics per task (MSE and PSNR of corrupted and restored images, ...), with
        corruptions from `seed`, and `keep_samples` images per task for pictures."""

    def record(self) -> dict:
        """Extra per-epoch log entries (e.g. the step sizes)."""

    def warnings(self) -> list[str]:
        """What looks wrong in the method's own state after an epoch (e.g. collapsed step sizes)."""

    def checkpoint_extra(self) -> dict:
        """Checkpoint entries beyond the encoder (e.g. MAE's decoder)."""

    def load_extra(self, state: dict) -> None:
        """Restore what checkpoint_extra saved."""
