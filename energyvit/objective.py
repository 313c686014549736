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
from energyvit.restore import bind_keep, restore
from energyvit.tasks import Corrupted

LOSS_REGIONS = ("corrupted", "all")
NEGATIVES = ("corrupted", "restored")


@dataclass(frozen=True)
class EnergyOptions:
    """How the energy method's restoration is trained (the model's own options, readout, K and
    initial step size, live in its config)."""

    langevin_std: float = option(0.0, "Langevin noise in training restoration: x += std * sqrt(2 a_k) * N(0, 1)",
                                 rule=non_negative)
    loss_region: str = option("corrupted", "loss over the task's region (masked or moved patches; the whole image "
                              "for sr, denoise, colorize), or all pixels", choices=LOSS_REGIONS)
    norm_pix_loss: bool = option(False, "per-patch normalized targets (as MAE): each patch's error over its variance")
    contrast_weight: float = option(0.0, "weight of an explicit energy term added to the restoration loss: a hinge "
                                    "pushing E(clean) below E(negative) by the margin, per patch (0: off)",
                                    rule=non_negative)
    contrast_negative: str = option("restored", "the negative of the energy term: the corrupted input or the "
                                    "restored image (detached, as contrastive divergence)", choices=NEGATIVES)
    contrast_margin: float = option(0.0, "margin of the energy term, in energy per patch", rule=non_negative)
    second_order_blocks: int | None = option(None, "truncated second order: the training loss differentiates the "
                                             "restoring gradient through the energy head and the last L encoder "
                                             "blocks only (below them straight through; the gradient's value stays "
                                             "exact; default: every block)", parse=int, rule=non_negative,
                                             metavar="L")

    def __post_init__(self) -> None:
        check_fields(self)


def task_loss(model: EnergyViT, clean: Tensor, corrupted: Corrupted, opts: EnergyOptions,
              generator: torch.Generator | None = None, energy_fn: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Restore in training mode (create_graph) and score against the clean batch.

    energy_fn: what computes E(x) if not the model itself (the DDP wrapper, which syncs gradients).
    With sparse restoration (corrupted.keep) every energy, the explicit term's too, reads only the
    patches that enter."""
    result = restore(model, corrupted.image, corrupted.update_mask, create_graph=True,
                     noise_std=opts.langevin_std, generator=generator, energy_fn=energy_fn, keep=corrupted.keep,
                     exact_blocks=opts.second_order_blocks)
    return restored_loss(model, clean, corrupted.image, result.restored, corrupted.loss_mask, corrupted.keep, opts,
                         energy_fn)


def restored_loss(model: EnergyViT, clean: Tensor, corrupted: Tensor, restored: Tensor, loss_mask: Tensor,
                  keep: Tensor | None, opts: EnergyOptions,
                  energy_fn: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """The training loss of a restored batch: the restoration score over loss_mask, plus the
    explicit energy term when opts.contrast_weight > 0 (the ordinary and the graphed step share it)."""
    loss = score(restored, clean, loss_mask, opts, model.cfg.patch_size)
    if opts.contrast_weight:
        negative = corrupted if opts.contrast_negative == "corrupted" else restored
        loss = loss + opts.contrast_weight * energy_contrast(bind_keep(energy_fn or model, keep), clean, negative,
                                                             opts, entering_patches(model, keep))
    return loss


def entering_patches(model: EnergyViT, keep: Tensor | None) -> int:
    """How many patches enter the energy: keep's n, or all of them."""
    return model.cfg.num_patches if keep is None else keep.shape[1]


def energy_contrast(energy_fn: Callable[[Tensor], Tensor], clean: Tensor, negative: Tensor, opts: EnergyOptions,
                    num_patches: int, weight: Tensor | None = None) -> Tensor:
    """The explicit energy term: the mean over images of relu(margin + (E(clean) - E(negative)) /
    num_patches), num_patches those the energy reads. The negative is detached: only the energies
    train, not the path that made it.
    weight: per-image weights (the compiled step gives its padding rows 0)."""
    gap = (energy_fn(clean) - energy_fn(negative.detach())) / num_patches
    per_image = torch.relu(opts.contrast_margin + gap)
    if weight is None:
        return per_image.mean()
    return (per_image * weight).sum() / weight.sum().clamp_min(1.0)


def score(restored: Tensor, clean: Tensor, loss_mask: Tensor, opts: EnergyOptions, patch_size: int) -> Tensor:
    """The loss of a restored batch under `opts` (region and per-patch normalization)."""
    region = loss_mask if opts.loss_region == "corrupted" else None
    return restoration_loss(restored, clean, region, patch_size if opts.norm_pix_loss else None)
