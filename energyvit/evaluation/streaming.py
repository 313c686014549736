"""A classifier scored over a whole dataset in batches, shared by the ranks of a torchrun job.

Each rank reads its ShardSampler share (every image once over all ranks, none twice), batch by
batch, so the split is never held whole in memory; the counts (correct at top-1 and top-5,
summed cross-entropy, images) are summed over ranks, so every rank gets the exact accuracy of
the whole split whatever the number of ranks.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from energyvit.data.pixels import to_float_pixels
from energyvit.distributed import DistInfo, all_reduce_sum
from energyvit.sampling import ShardSampler
from energyvit.training import amp_dtype

EVAL_BATCH = 256  # images per batch (memory only: the result does not depend on it)


def topk_counts(logits: Tensor, labels: Tensor, k: int = 5) -> Tensor:
    """[top-1 correct, top-k correct] of one batch (float64). Top-k is top-C when there are
    only C < k classes (then every image counts)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices.eq(labels[:, None])
    return torch.stack([top[:, 0].sum(), top.any(dim=1).sum()]).double()


@torch.no_grad()
def classify_split(model: nn.Module, dataset: Dataset, batch_size: int = EVAL_BATCH, dist: DistInfo = DistInfo(),
                   device: torch.device | str | None = None, *, num_workers: int = 0,
                   precision: str = "auto") -> dict:
    """Top-1 and top-5 accuracy and mean cross-entropy of `model` (images (B, C, H, W) float in
    [0, 1] -> logits (B, classes); the bare module, not its DDP wrapper) over every image of
    `dataset` (items (image, label, ...), e.g. DataSplits.held_out_all; every label a class).

    Under torchrun every rank calls it with the same dataset and gets the same result. The model
    runs in eval mode (its mode is restored after) under autocast per `precision` (auto: bf16 on
    CUDA, fp32 on the CPU); device: where it runs (default: where its parameters are).
    Returns {"top1", "top5", "loss", "n"}."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = amp_dtype(precision, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda",
                        sampler=ShardSampler(len(dataset), dist.rank, dist.world_size))
    counts = torch.zeros(5, dtype=torch.float64, device=device)  # top-1, top-5, loss sum, images, unlabeled
    was_training = model.training
    model.eval()
    try:
        for x, y, *_ in loader:
            y = torch.as_tensor(y).to(device, torch.long)
            with autocast:
                logits = model(to_float_pixels(x, device))
            logits, labeled = logits.float(), y >= 0
            logits, y = logits[labeled], y[labeled]
            counts[:2] += topk_counts(logits, y)
            counts[2] += F.cross_entropy(logits, y, reduction="sum").double() if len(y) else 0.0
            counts[3] += len(y)
            counts[4] += int((~labeled).sum())
    finally:
        model.train(was_training)
    top1, top5, loss, n, unlabeled = all_reduce_sum(counts, dist).tolist()  # every rank, before raising
    if unlabeled:
        raise ValueError(f"{int(unlabeled)} image(s) without a label: classification needs a labeled dataset")
    if n == 0:
        raise ValueError("no images to classify")
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "n": int(n)}
