"""Pixel batches on their way to the model: the loader hands over uint8 (a quarter of float32's
bytes to collate, pin and copy) or float images, and the device turns them into float [0, 1].

Every consumer of a DataLoader batch (the pretraining loop, fine-tuning, feature extraction)
calls `to_float_pixels`, so a dataset may yield either dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor


def to_float_pixels(images: Tensor, device: torch.device | str) -> Tensor:
    """`images` on `device` as float32 in [0, 1]: uint8 is copied as uint8 and scaled there; a
    floating-point batch (already [0, 1], e.g. the embedded digits) is only moved."""
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"image batches must be uint8 or floating point, got {images.dtype}")
    return images
