"""Random erasing of training images (Zhong et al. 2017; timm's `RandomErasing` in "pixel" mode
with one box, as DeiT and MAE's fine-tuning use it), applied to a batch on the device.

Each image, with probability `prob`, gets one box of area fraction in [0.02, 1/3) and aspect
ratio in [0.3, 1/0.3] (log-uniform) at a uniform random place, tried up to 10 times until it fits
inside the image; the box is filled with per-pixel Gaussian noise of the model's input
normalization (mean + std * N(0, 1) per channel: timm fills the normalized image with N(0, 1)).
The box parameters come from a numpy Generator and the noise from a torch Generator on the
batch's device, so the result is a pure function of the seeds (exact resume).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

MIN_AREA, MAX_AREA = 0.02, 1 / 3
MIN_ASPECT = 0.3
ATTEMPTS = 10


def erasing_boxes(batch: int, height: int, width: int, prob: float, rng: np.random.Generator
                  ) -> list[tuple[int, int, int, int] | None]:
    """Per image, the (top, left, box height, box width) to erase, or None."""
    boxes = []
    log_aspect = (math.log(MIN_ASPECT), -math.log(MIN_ASPECT))
    for _ in range(batch):
        box = None
        if rng.random() < prob:
            for _ in range(ATTEMPTS):
                area = height * width * rng.uniform(MIN_AREA, MAX_AREA)
                aspect = math.exp(rng.uniform(*log_aspect))
                h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if 0 < h < height and 0 < w < width:
                    box = (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
                    break
        boxes.append(box)
    return boxes


def random_erase(images: Tensor, prob: float, mean: Tensor, std: Tensor, rng: np.random.Generator,
                 generator: torch.Generator) -> Tensor:
    """`images` (B, C, H, W) with random boxes replaced by noise of mean `mean` and std `std`
    ((1, C, 1, 1) each); a new tensor when any box is erased, `images` itself otherwise."""
    if prob <= 0:
        return images
    boxes = erasing_boxes(images.shape[0], images.shape[-2], images.shape[-1], prob, rng)
    if not any(boxes):
        return images
    images = images.clone()
    for i, box in enumerate(boxes):
        if box is not None:
            top, left, h, w = box
            noise = torch.randn((images.shape[1], h, w), generator=generator, device=images.device,
                                dtype=images.dtype)
            images[i, :, top:top + h, left:left + w] = mean[0] + std[0] * noise
    return images
