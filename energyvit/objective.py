"""The energy method's training objective: restore a corrupted batch through the model's K
gradient steps in training mode (every step in the graph) and score the result against the
clean batch, with the options that shape it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from energyvit.losses import restoration_loss
from energyvit.model import EnergyViT
from energyvit.options import check_fields, non_negative, option
from energyvit.restore import restore
from energyvit.tasks import Corrupted

LOSS_REGIONS = ("corrupted", "all")


@dataclass(frozen=True)
class EnergyOptions:
    """How the energy method's restoration is trained (the model's own options, readout, K and
    initial step size, live in its config)."""

    langevin_std: float = option(0.0, "Langevin noise in training restoration: x += std * sqrt(2 a_k) * N(0, 1)",
                                 rule=non_negative)
    loss_region: str = option("corrupted", "loss over the task's region (masked or moved patches; the whole image "
                              "for sr, denoise, colorize), or all pixels", choices=LOSS_REGIONS)
    norm_pix_loss: bool = option(False, "per-patch normalized targets (as MAE): each patch's error over its variance")

    def __post_init__(self) -> None:
        check_fields(self)


def task_loss(model: EnergyViT, clean: Tensor, corrupted: Corrupted, opts: EnergyOptions,
              generator: torch.Generator | None = None, energy_fn: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Restore in training mode (create_graph) and score against the clean batch.

    energy_fn: what computes E(x) if not the model itself (the DDP wrapper, which syncs gradients)."""
    result = restore(model, corrupted.image, corrupted.update_mask, create_graph=True,
                     noise_std=opts.langevin_std, generator=generator, energy_fn=energy_fn)
    return score(result.restored, clean, corrupted.loss_mask, opts, model.cfg.patch_size)


def score(restored: Tensor, clean: Tensor, loss_mask: Tensor, opts: EnergyOptions, patch_size: int) -> Tensor:
    """The loss of a restored batch under `opts` (region and per-patch normalization)."""
    region = loss_mask if opts.loss_region == "corrupted" else None
    return restoration_loss(restored, clean, region, patch_size if opts.norm_pix_loss else None)
