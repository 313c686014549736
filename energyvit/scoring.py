"""Scores of images under a pretrained model: how far each image, and each patch, lies from the
data the model was trained on. Higher is more unusual for every score here.

- energy: E(x) itself (low for the training data), and with the `norm` or `linear` readout its
  split over the patches (`EnergyViT.patch_energies`).
- restoration: hide patches, restore them by the model's K gradient steps, and measure how far
  the restored pixels are from the true ones (mean squared error per patch, pixel units). The
  patches are hidden in `rounds` seeded masks that partition them, so every patch is hidden
  exactly once (1/rounds of them per round) and restored from the rest of its image (a model
  with encoder_input "visible" splits on each round's hidden patches, as it was trained).
- MAE's reconstruction error (the baseline): the same masks through an MAE checkpoint's encoder
  and decoder, its own loss per hidden patch.

The masks are the same for every image of a call (a function of the seed and the patch grid),
so scores do not depend on how images are batched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from energyvit.methods.mae import MAEBaseline, patchify
from energyvit.model import EnergyViT
from energyvit.restore import restore

DEFAULT_ROUNDS = 4


@dataclass
class Scores:
    energy: Tensor  # (B,) E(x)
    restoration: Tensor  # (B,) mean over patches of patch_restoration
    patch_restoration: Tensor  # (B, grid, grid) restoration error of each patch
    patch_energy: Tensor | None  # (B, grid, grid) E(x) split over patches; None for the cls readout


def rotation_masks(num_patches: int, rounds: int, seed: int = 0) -> Tensor:
    """(rounds, num_patches) bool: a seeded partition of the patches into `rounds` near-equal
    groups; row r hides group r, so every patch is hidden in exactly one round."""
    if not 1 <= rounds <= num_patches:
        raise ValueError(f"rounds must be in 1..{num_patches} (the patches of an image), got {rounds}")
    order = torch.randperm(num_patches, generator=torch.Generator().manual_seed(seed))
    masks = torch.zeros(rounds, num_patches, dtype=torch.bool)
    for r, group in enumerate(order.tensor_split(rounds)):
        masks[r, group] = True
    return masks


def _pixel_mask(hidden: Tensor, grid: int, patch: int) -> Tensor:
    """(L,) bool patch mask -> (1, 1, H, W) float pixel mask."""
    m = hidden.float().view(1, 1, grid, grid)
    return m.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


def patch_mse(a: Tensor, b: Tensor, patch: int) -> Tensor:
    """(B, L) mean squared difference of a and b (B, C, H, W) over each patch's pixels and channels."""
    return patchify(a - b, patch).pow(2).mean(dim=-1)


def restoration_errors(model: EnergyViT, images: Tensor, rounds: int = DEFAULT_ROUNDS, seed: int = 0,
                       fill: str | float = 0.5) -> Tensor:
    """(B, L) error of each patch restored by the model from the rest of its image: hidden under
    `fill` (a pixel value, "noise" drawn from the seed, or "learned": the model's fill patch) in its
    round of `rotation_masks`."""
    cfg = model.cfg
    grid = cfg.img_size // cfg.patch_size
    out = images.new_zeros(images.shape[0], cfg.num_patches)
    generator = torch.Generator().manual_seed(seed)
    for hidden in rotation_masks(cfg.num_patches, rounds, seed):
        mask = _pixel_mask(hidden, grid, cfg.patch_size).to(images)
        if fill == "learned":
            with torch.no_grad():
                hidden_images = model.fill_hidden(images, mask)
        else:
            filler = (torch.rand(images.shape, generator=generator).to(images) if fill == "noise"
                      else torch.full_like(images, float(fill)))
            hidden_images = images * (1 - mask) + filler * mask
        split = (hidden.nonzero().flatten().to(images.device).expand(len(images), -1)
                 if cfg.encoder_input == "visible" else None)
        restored = restore(model, hidden_images, mask.expand(len(images), -1, -1, -1), hidden=split).restored
        out[:, hidden.to(images.device)] = patch_mse(restored, images, cfg.patch_size)[:, hidden.to(images.device)]
    return out


@torch.no_grad()
def mae_errors(mae: MAEBaseline, images: Tensor, rounds: int = DEFAULT_ROUNDS, seed: int = 0) -> Tensor:
    """(B, L) MAE's loss on each patch (its target space: normalized pixels, per patch too with
    norm_pix_loss), predicted from the rest of its image in its round of `rotation_masks`."""
    cfg = mae.encoder.cfg
    out = images.new_zeros(images.shape[0], cfg.num_patches)
    target = mae.targets(images)
    for hidden in rotation_masks(cfg.num_patches, rounds, seed).to(images.device):
        order = torch.cat([(~hidden).nonzero()[:, 0], hidden.nonzero()[:, 0]])  # visible first, as MAE shuffles
        ids_shuffle = order.expand(len(images), -1)
        latent = mae.encode_kept(images, ids_shuffle[:, : int((~hidden).sum())])
        pred = mae.decode(latent, ids_shuffle.argsort(dim=1))
        out[:, hidden] = (pred - target).pow(2).mean(dim=-1)[:, hidden]
    return out


def score(model: EnergyViT, images: Tensor, rounds: int = DEFAULT_ROUNDS, seed: int = 0,
          fill: str | float = 0.5) -> Scores:
    """Energy and restoration scores of pixel-space images (B, C, H, W) in [0, 1] under `model`,
    per image and per patch (see the module's docstring). `fill` should be what the model was
    trained with (`energyvit.checkpoint.load_model` reports it)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            energy = model(images)
            patch_energy = model.patch_energies(images) if model.cfg.energy != "cls" else None
        patch_restoration = restoration_errors(model, images, rounds, seed, fill)
    finally:
        model.train(was_training)
    grid = model.cfg.img_size // model.cfg.patch_size
    as_map = lambda t: None if t is None else t.view(len(images), grid, grid)  # noqa: E731
    return Scores(energy, patch_restoration.mean(dim=1), as_map(patch_restoration), as_map(patch_energy))
