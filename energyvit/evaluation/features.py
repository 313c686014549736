"""Frozen features of an encoder: its final normalized tokens pooled one of three ways, streamed
over a dataset, and the raw-pixel baseline next to them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from energyvit.data.pixels import to_float_pixels
from energyvit.data.splits import KeyedSubset
from energyvit.model import EnergyViT

# tokens: all patch tokens concatenated (a linear probe on the spatial feature map); mean: their
# average; cls: the class token.
POOLINGS = ("tokens", "mean", "cls")
RAW_PIXEL_SIZE = 32  # raw-pixel probe baseline: images area-averaged down to at most this size
SUBSET_SEED = 0  # which training images a probe fits on when it cannot take them all


def pool_tokens(h: Tensor, pool: str) -> Tensor:
    """(B, 1 + num_patches, D) tokens -> (B, features) by `pool` (one of POOLINGS)."""
    if pool == "tokens":
        return h[:, 1:].flatten(1)
    if pool == "mean":
        return h[:, 1:].mean(dim=1)
    if pool == "cls":
        return h[:, 0]
    raise ValueError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLINGS)}")


def probe_subset(n: int, limit: int) -> list[int]:
    """The indices, in order, of the `limit` images of n that a probe fits on: all of them, or a
    fixed random subset (a class-sorted folder must not lose its last classes)."""
    if limit >= n:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(SUBSET_SEED))[:limit].sort().values.tolist()


@torch.no_grad()
def features(models: list[EnergyViT], dataset: Dataset, limit: int, pools: tuple[str, ...], num_workers: int,
             batch_size: int = 256) -> tuple[dict[tuple[int, str], Tensor], Tensor, Tensor]:
    """Frozen features {(model index, pooling): (n, features)} of `limit` images of `dataset`
    (probe_subset), their raw pixels (area-averaged to at most RAW_PIXEL_SIZE) and labels,
    computed batch by batch, held on the CPU (for small sets: the experiments' scripts)."""
    subset = KeyedSubset(dataset, probe_subset(len(dataset), limit))
    loader = DataLoader(subset, batch_size=batch_size, num_workers=num_workers)
    device = models[0].pixel_mean.device
    feats: dict[tuple[int, str], list[Tensor]] = {(i, p): [] for i in range(len(models)) for p in pools}
    pixels, labels = [], []
    for x, y, _ in loader:
        x = to_float_pixels(x, device)
        for i, m in enumerate(models):
            h = m.forward_features(x)
            for p in pools:
                feats[(i, p)].append(pool_tokens(h, p).float().cpu())
        pixels.append(raw_pixels(x).cpu())
        labels.append(y)
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(pixels), torch.cat(labels).long()


def raw_pixels(x: Tensor) -> Tensor:
    if x.shape[-1] > RAW_PIXEL_SIZE or x.shape[-2] > RAW_PIXEL_SIZE:
        x = F.interpolate(x, size=(min(x.shape[-2], RAW_PIXEL_SIZE), min(x.shape[-1], RAW_PIXEL_SIZE)), mode="area")
    return x.flatten(1)
