"""The restoration loss, mean squared error between restored and clean images over a region, and
its peak signal-to-noise ratio."""
from __future__ import annotations

import math

from torch import Tensor


def patch_variance(x: Tensor, patch_size: int, eps: float = 1e-6) -> Tensor:
    """Per-patch variance of the pixels (over channels and the patch), broadcast to (B, 1, H, W)."""
    B, C, H, W = x.shape
    p = patch_size
    patches = x.reshape(B, C, H // p, p, W // p, p)
    var = patches.var(dim=(1, 3, 5), keepdim=True, unbiased=True) + eps  # (B, 1, gh, 1, gw, 1)
    return var.expand(B, 1, H // p, p, W // p, p).reshape(B, 1, H, W)


def restoration_loss(
    restored: Tensor,
    clean: Tensor,
    region: Tensor | None = None,
    norm_pix_patch: int | None = None,
    weight: Tensor | None = None,
) -> Tensor:
    """Mean squared error of `restored` vs `clean`, averaged over the pixels where `region` is 1.

    norm_pix_patch: as MAE's norm_pix_loss, normalize the target per patch of this size. The
    restored image lives in pixel space, so both sides are normalized with the clean patch's
    mean and variance: the error of each patch is divided by its variance (+1e-6).
    weight: (B,) per-image weights of the errors; the average is still over the region's pixels
    (not over the weights), so the loss of an image does not depend on the others of its batch.
    """
    if restored.shape != clean.shape:
        raise ValueError(f"restored {tuple(restored.shape)} and clean {tuple(clean.shape)} differ in shape")
    err = (restored - clean).pow(2)
    if norm_pix_patch is not None:
        err = err / patch_variance(clean, norm_pix_patch)
    if weight is not None:
        err = err * weight.view(-1, *(1,) * (err.ndim - 1))
    if region is None:
        return err.mean()
    region = region.expand_as(err)
    return (err * region).sum() / region.sum().clamp_min(1.0)


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of a mean squared error on [0, 1] pixels."""
    return 10.0 * math.log10(1.0 / mse) if mse > 0 else math.inf


def with_psnr(errors: dict[str, float]) -> dict[str, float]:
    """mse_corrupted / mse_restored plus their PSNRs."""
    return errors | {"psnr_corrupted": psnr(errors["mse_corrupted"]), "psnr_restored": psnr(errors["mse_restored"])}
