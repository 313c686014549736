"""Datasets. The embedded default is scikit-learn's 8x8 handwritten digits (1797 images with
labels, shipped inside scikit-learn, so nothing is downloaded), resized up with bilinear
interpolation and split once into fixed train and held-out parts."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DIGITS_HELD_OUT = 297  # 1797 = 1500 train + 297 held out
DIGITS_SPLIT_SEED = 0  # the split never changes with --seed, so runs compare on the same images


@dataclass
class ImageSplit:
    images: Tensor  # (n, C, H, W) float in [0, 1]
    labels: Tensor  # (n,) int64


def load_digits(img_size: int = 16) -> tuple[ImageSplit, ImageSplit]:
    """(train, held_out) digits as 1-channel images in [0, 1], resized to img_size."""
    from sklearn.datasets import load_digits as sk_load_digits

    raw = sk_load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if img_size != 8:
        images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
        images = images.clamp_(0.0, 1.0)
    labels = torch.tensor(raw.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    test, train = order[:DIGITS_HELD_OUT], order[DIGITS_HELD_OUT:]
    return ImageSplit(images[train], labels[train]), ImageSplit(images[test], labels[test])


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
    std = images.std(dim=(0, 2, 3)).clamp_min(1e-3)
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
