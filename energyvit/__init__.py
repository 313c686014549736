"""energyvit: energy-inspired self-supervised pretraining of vision transformers.

One ViT maps an image to a scalar energy (its forward pass) and restores corrupted images by
gradient descent on that energy (its backward pass). Public API:

    model = create_model("vit_nano_patch4", in_chans=1)      # a model by name
    e = model(images)                                        # energies, one per image
    c = corrupt(images, "mim", patch_size=4, mask_ratio=0.5) # a named pretext task
    r = restore(model, c.image, c.update_mask)               # inference: r.steps holds each x_k
    r = restore(model, c.image, c.update_mask, create_graph=True)  # training mode
    loss = restoration_loss(r.restored, images, c.loss_mask)
    loss.backward()
    s = score(model, images)                                 # s.energy, s.restoration, per-patch maps
"""
from __future__ import annotations

import torch
from torch import Tensor

from energyvit.losses import restoration_loss
from energyvit.model import MODEL_ARCHS, EnergyViT, EnergyViTConfig, create_model, model_config
from energyvit.restore import Restoration, restore
from energyvit.scoring import Scores, score
from energyvit.tasks import TASK_NAMES, Corrupted, TaskOptions, build_mixture, build_task

__version__ = "0.1.0"


def corrupt(images: Tensor, task: str, patch_size: int = 16, generator: torch.Generator | None = None,
            **options) -> Corrupted:
    """Corrupt images (B, C, H, W) in [0, 1] with a named task (mim, sort, sr, denoise, colorize).

    options: mask_ratio, mask_fill, restore_fraction (mim: sparse restoration, the patches that enter in
    Corrupted.keep), sort_fraction, sr_factor, noise_sigma, noise_loss_weight (energyvit.tasks.TaskOptions).
    mask_fill="learned" leaves NaN in Corrupted.fill_mask's pixels for a model with a learned fill
    (create_model(..., learned_fill=True)): model.fill_hidden(c.image, c.fill_mask) fills them.
    """
    return build_task(task, patch_size, TaskOptions(**options))(images, generator)


__all__ = [
    "MODEL_ARCHS", "TASK_NAMES", "Corrupted", "EnergyViT", "EnergyViTConfig", "Restoration", "Scores", "TaskOptions",
    "build_mixture", "build_task", "corrupt", "create_model", "model_config", "restoration_loss", "restore", "score",
]
