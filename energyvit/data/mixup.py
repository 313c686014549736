"""Mixup and CutMix of a training batch, with label-smoothed soft targets (timm's `Mixup` in
"batch" mode, as MAE's fine-tuning uses it), and the soft-target cross-entropy that scores them.

Per batch, with probability `prob`, one of the two is applied to the whole batch, each image
mixed with the batch's mirror image (image i with image B - 1 - i):

- mixup: x = lam * x + (1 - lam) * x_mirror, lam ~ Beta(mixup_alpha, mixup_alpha);
- cutmix: a box of area fraction 1 - lam (lam ~ Beta(cutmix_alpha, cutmix_alpha)) at a uniform
  random center, clipped to the image, is pasted from the mirror; lam is then corrected to the
  area the clipped box leaves.

When both are on, cutmix is chosen with probability `switch_prob`. Targets are the one-hot labels
smoothed (1 - smoothing + smoothing / C on the class, smoothing / C elsewhere), mixed with the
same lam. Every draw comes from the numpy Generator it is given, so a batch's mixing is a pure
function of its seed (exact resume).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def smooth_one_hot(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """(B, num_classes) float targets: 1 - smoothing + smoothing / C on each label, smoothing / C
    elsewhere (each row sums to 1)."""
    off = smoothing / num_classes
    targets = torch.full((len(labels), num_classes), off, device=labels.device)
    return targets.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of -sum_c target_c log softmax(logits)_c (equal to label-smoothed
    cross-entropy when the targets are smoothed one-hot labels)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a cutmix box: sides sqrt(1 - lam) of the image's, centered
    at a uniform random pixel, clipped to the image (so its area may be smaller)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right


class Mixup:
    """Mixup and CutMix of a batch with smoothed soft targets (see the module's docstring).
    With both alphas 0 it only smooths the targets."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, smoothing: float = 0.0) -> None:
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.smoothing = prob, switch_prob, smoothing

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def draw(self, rng: np.random.Generator) -> tuple[float, bool]:
        """(lam, cutmix or not) of one batch; lam 1 leaves it unmixed. The same number of draws
        whatever the outcome."""
        apply, switch = rng.random() < self.prob, rng.random() < self.switch_prob
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or switch)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0
        return (lam, use_cutmix) if apply and self.active else (1.0, False)

    def __call__(self, images: Tensor, labels: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """(mixed images, soft targets (B, num_classes)) of a batch; `images` is not modified."""
        lam, use_cutmix = self.draw(rng)
        mirror = images.flip(0)
        if lam < 1.0 and use_cutmix:
            top, bottom, left, right = cutmix_box(images.shape[-2], images.shape[-1], lam, rng)
            images = images.clone()
            images[..., top:bottom, left:right] = mirror[..., top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (images.shape[-2] * images.shape[-1])
        elif lam < 1.0:
            images = images * lam + mirror * (1.0 - lam)
        targets = smooth_one_hot(labels, self.num_classes, self.smoothing)
        return images, targets * lam + targets.flip(0) * (1.0 - lam)
