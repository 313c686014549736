"""The embedded default dataset: scikit-learn's 8x8 handwritten digits (1797 images with labels,
shipped inside scikit-learn, so nothing is downloaded), resized up with bilinear interpolation
and split once into fixed train and held-out parts."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from energyvit.data.in_memory import ImageSplit

DIGITS_HELD_OUT = 297  # 1797 = 1500 train + 297 held out
DIGITS_SPLIT_SEED = 0  # the split never changes with --seed, so runs compare on the same images


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


def load_digits_as(img_size: int, channels: int) -> tuple[ImageSplit, ImageSplit]:
    """The digits for a model of `channels` channels: gray, or gray repeated to RGB."""
    if channels not in (1, 3):
        raise ValueError(f"the digits are grayscale; a {channels}-channel model cannot take them (1 or 3 channels)")
    train, held_out = load_digits(img_size)
    if channels == 3:
        train, held_out = (ImageSplit(s.images.expand(-1, 3, -1, -1).contiguous(), s.labels) for s in (train, held_out))
    return train, held_out
