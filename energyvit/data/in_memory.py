"""Image sets held in memory as tensors (the embedded digits, held-out images): the split, its
Dataset view for the training loop, batches, the digits' shift augmentation and pixel statistics."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from energyvit.data.transforms import MIN_PIXEL_STD


@dataclass
class ImageSplit:
    images: Tensor  # (n, C, H, W) float in [0, 1]
    labels: Tensor  # (n,) int64


class SplitDataset(torch.utils.data.Dataset):
    """An in-memory ImageSplit as a Dataset of the training loop: keys are (index, sample seed) from
    energyvit.sampling.EpochSampler; items are (image, label, skipped files = 0). `max_shift` > 0
    translates each image randomly (random_shift), seeded by the key."""

    def __init__(self, split: ImageSplit, max_shift: int = 0) -> None:
        self.split, self.max_shift = split, max_shift

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int, int]:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        image = self.split.images[index]
        if self.max_shift > 0:
            image = random_shift(image[None], self.max_shift, torch.Generator().manual_seed(seed))[0]
        return image, int(self.split.labels[index]), 0


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a (n, C, H, W) tensor, for the model's input normalization."""
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3)).clamp_min(MIN_PIXEL_STD)
    return tuple(mean.tolist()), tuple(std.tolist())


def iterate_batches(split: ImageSplit, batch_size: int, generator: torch.Generator | None = None, drop_last: bool = True):
    """Yield (images, labels) batches, shuffled with `generator` when given."""
    n = len(split.labels)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i : i + batch_size]
        yield split.images[idx], split.labels[idx]


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image by up to `max_shift` pixels in each direction, edges replicated:
    the augmentation of the embedded digits (a random-resized-crop analogue at 16 pixels)."""
    if max_shift <= 0:
        return images
    B, _, H, W = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (B, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + H, dx : dx + W] for i, (dy, dx) in enumerate(offsets)])
