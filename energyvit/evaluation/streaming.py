"""Evaluation passes over a dataset on the device, shared by the ranks of a torchrun job.

Each rank reads its ShardSampler share of the images (every image once over all ranks, none
twice), batch by batch, so no split is ever held whole in host memory. What is summed (correct
predictions, losses, counts) is all-reduced, so an accuracy is exact whatever the number of
ranks; features stay on the rank that computed them, or are gathered in the dataset's order.
Forward passes run under bf16 autocast on CUDA by default (precision "auto"); features and
logits come out in float32.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from energyvit.data.pixels import to_float_pixels
from energyvit.data.splits import KeyedSubset
from energyvit.distributed import DistInfo, all_gather, all_reduce_sum
from energyvit.sampling import ShardSampler
from energyvit.training import amp_dtype

EVAL_BATCH = 256  # images per batch of an evaluation pass (memory only: results do not depend on it)

# images (B, C, H, W) float [0, 1] on the device -> named feature sets, each (B, features)
FeatureFn = Callable[[Tensor], dict[str, Tensor]]


def shard_loader(dataset: Dataset, batch_size: int, dist: DistInfo, device: torch.device,
                 num_workers: int = 0) -> DataLoader:
    """Batches (images, labels, skipped files) of this rank's share of `dataset`, in order."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), dist.rank, dist.world_size),
                      num_workers=num_workers, pin_memory=device.type == "cuda")


def autocast(device: torch.device, precision: str):
    dtype = amp_dtype(precision, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.no_grad()
def shard_features(feature_fn: FeatureFn, dataset: Dataset, dist: DistInfo, device: torch.device,
                   batch_size: int = EVAL_BATCH, num_workers: int = 0,
                   precision: str = "auto") -> tuple[dict[str, Tensor], Tensor]:
    """`feature_fn`'s features (float32) and the labels of this rank's share of `dataset`, on
    `device`: rows for images rank, rank + world_size, ... (ShardSampler's order)."""
    feats: dict[str, list[Tensor]] = {}
    labels = []
    for x, y, _ in shard_loader(dataset, batch_size, dist, device, num_workers):
        with autocast(device, precision):
            out = feature_fn(to_float_pixels(x, device))
        for name, f in out.items():
            feats.setdefault(name, []).append(f.float())
        labels.append(torch.as_tensor(y).to(device, torch.long))
    if not labels:  # more ranks than images: an empty share, with the shapes of the others'
        probe = dataset[0][0][None]
        with autocast(device, precision):
            out = feature_fn(to_float_pixels(probe, device))
        return {n: f.float()[:0] for n, f in out.items()}, torch.empty(0, dtype=torch.long, device=device)
    return {n: torch.cat(f) for n, f in feats.items()}, torch.cat(labels)


def gather_shards(rows: Tensor, total: int, dist: DistInfo) -> Tensor:
    """The shards of a ShardSampler pass over `total` images (rank r holds the rows of images r,
    r + world_size, ...) put together in the images' order, on every rank."""
    if not dist.enabled:
        return rows
    per_rank = -(-total // dist.world_size)
    padded = torch.cat([rows, rows.new_zeros((per_rank - len(rows), *rows.shape[1:]))])
    gathered = all_gather(padded, dist)  # (world, per_rank, ...): row i of rank r is image r + i * world
    return gathered.transpose(0, 1).reshape(per_rank * dist.world_size, *rows.shape[1:])[:total]


@torch.no_grad()
def subset_features(feature_fn: FeatureFn, dataset: Dataset, indices: list[int], dist: DistInfo,
                    device: torch.device, batch_size: int = EVAL_BATCH, num_workers: int = 0,
                    precision: str = "auto") -> tuple[dict[str, Tensor], Tensor]:
    """Features and labels of the images `indices` of `dataset`, in that order, on every rank (on
    `device`); each rank computes its share. For small sets: they are held whole."""
    local, labels = shard_features(feature_fn, KeyedSubset(dataset, indices), dist, device, batch_size, num_workers,
                                   precision)
    n = len(indices)
    return {k: gather_shards(v, n, dist) for k, v in local.items()}, gather_shards(labels, n, dist)


def accuracy_counts(logits: Tensor, labels: Tensor, loss: bool = True) -> Tensor:
    """[top-1 correct, top-5 correct, summed cross-entropy, images, unlabeled images] of a batch
    of logits, or of any class scores with loss=False (its entry then 0); float64, to be summed over
    batches and ranks. Top-5 is top-C with fewer than 5 classes."""
    labeled = labels >= 0
    logits, y = logits[labeled], labels[labeled]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, float64 kept
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(y[:, None])
    ce = F.cross_entropy(logits, y, reduction="sum") if loss and len(y) else logits.new_zeros(())
    return torch.stack([top[:, 0].sum().double(), top.any(dim=1).sum().double(), ce.double(),
                        labels.new_tensor(len(y), dtype=torch.float64),
                        labels.new_tensor(int((~labeled).sum()), dtype=torch.float64)])


def reduce_counts(counts: Tensor, dist: DistInfo) -> dict:
    """{"top1", "top5", "loss", "n"} over all ranks from summed accuracy_counts. Unlabeled images
    are a ValueError on every rank (counted first, so no rank is left waiting)."""
    counts = all_reduce_sum(counts.clone(), dist).cpu()
    top1, top5, loss, n, unlabeled = counts.tolist()
    if unlabeled:
        raise ValueError(f"{int(unlabeled)} held-out image(s) have no label: classification needs a labeled dataset")
    if n == 0:
        raise ValueError("no held-out images to classify")
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "n": int(n)}


@torch.no_grad()
def classify_split(model: nn.Module, dataset: Dataset, batch_size: int = EVAL_BATCH, dist: DistInfo = DistInfo(),
                   device: torch.device | str | None = None, *, num_workers: int = 0,
                   precision: str = "auto") -> dict:
    """Top-1 and top-5 accuracy and mean cross-entropy of a classifier over every image of `dataset`.

    model: any module mapping images (B, C, H, W), float in [0, 1] on `device`, to logits
        (B, num_classes); the bare module, not its DDP wrapper. It runs in eval mode (its mode is
        restored afterwards) under autocast per `precision` (one of energyvit.training.PRECISIONS:
        auto is bf16 on CUDA, fp32 on the CPU).
    dataset: items (image, label, ...) as energyvit's datasets yield them (DataSplits.held_out_all);
        every label must be a class index (>= 0).
    dist: under torchrun, every rank calls this with the same dataset: each classifies its
        ShardSampler share and the counts are summed over ranks, so each image counts once and every
        rank returns the same exact result.
    device: where the model runs (default: the device of its first parameter).

    Returns {"top1", "top5", "loss", "n"}: accuracies in [0, 1] (top-5 is top-C for C < 5 classes),
    the mean cross-entropy, and the number of images.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    counts = torch.zeros(5, dtype=torch.float64, device=device)
    try:
        for x, y, _ in shard_loader(dataset, batch_size, dist, device, num_workers):
            with autocast(device, precision):
                logits = model(to_float_pixels(x, device))
            counts += accuracy_counts(logits, torch.as_tensor(y).to(device, torch.long))
    finally:
        model.train(was_training)
    return reduce_counts(counts, dist)
