"""The training view of image files for fine-tuning a classifier (MAE's fine-tuning, after
DeiT): random resized crop of 8% to 100% of the image (timm's default; pretraining crops 20% to
100%), bicubic, horizontal flip, then RandAugment when asked. Random erasing, mixup and cutmix
act later, on the batch (energyvit.data.random_erasing, energyvit.data.mixup).

Every draw comes from the sample's own generator (seeded by its key), as with TrainTransform.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from energyvit.data.randaugment import RandAugment
from energyvit.data.splits import KeyedSubset
from energyvit.data.transforms import TrainTransform, to_uint8_tensor

CROP_SCALE = (0.08, 1.0)


class FinetuneTransform:
    """Crop, flip and optional RandAugment of a PIL image (opened, perhaps not decoded yet) or a
    uint8 array -> uint8 (C, H, W). jpeg_draft: JPEGs decoded at a reduced size where the crop
    allows, as pretraining's TrainTransform (whose crop this is)."""

    def __init__(self, size: int, channels: int, randaugment: RandAugment | None = None,
                 scale: tuple[float, float] = CROP_SCALE, jpeg_draft: bool = False) -> None:
        self.size, self.channels, self.randaugment, self.scale = size, channels, randaugment, scale
        self._crop = TrainTransform(size, channels, scale=scale, jpeg_draft=jpeg_draft)

    def __call__(self, img: Image.Image | np.ndarray, generator: torch.Generator) -> Tensor:
        img = self._crop.crop(img, generator)
        if torch.rand(1, generator=generator).item() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            img = self.randaugment(img, generator)
        return to_uint8_tensor(img, self.channels)

    def __repr__(self) -> str:
        return (f"FinetuneTransform(size={self.size}, channels={self.channels}, {self.randaugment}, scale={self.scale}, "
                f"jpeg_draft={self._crop.jpeg_draft})")


def with_transform(dataset: Dataset, transform) -> Dataset:
    """`dataset` (an image-file or array dataset, or a KeyedSubset of one) reading its images
    through `transform` instead: a shallow copy, sharing its file list or arrays."""
    if isinstance(dataset, KeyedSubset):
        return KeyedSubset(with_transform(dataset.dataset, transform), dataset.indices)
    if not hasattr(dataset, "transform"):
        raise ValueError(f"{type(dataset).__name__} has no per-image transform to give the fine-tuning view")
    view = copy.copy(dataset)
    view.transform = transform
    return view
