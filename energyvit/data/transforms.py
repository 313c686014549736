"""Image transforms for pretraining on image files and uint8 arrays, written with Pillow and torch.

MAE's pipeline without torchvision: random resized crop (scale 0.2..1, bicubic) and horizontal
flip for training, resize + center crop for evaluation. Every random choice draws from an
explicit `torch.Generator`, never from global state, so a sample's augmentation depends only on
the seed it is given, not on which DataLoader worker runs it (exact resume relies on this).

Outputs are uint8 (C, H, W) pixels: a quarter of float32's bytes to collate, pin and copy; the
device turns a batch into float [0, 1] (energyvit.data.pixels.to_float_pixels), and the model
normalizes internally with the per-channel mean/std of its config (ImageNet's, or
`estimate_channel_stats`).

With `jpeg_draft`, a JPEG file that is not decoded yet is decoded at 1/2, 1/4 or 1/8 of its size
(libjpeg's DCT scaling, Pillow's `Image.draft`) when the region the output is resized from stays
at least the output size: the largest such reduction. The random crop is drawn on the original
size first, so the generator's draws (and with them exact resume) are the same either way; the
pixels differ slightly from a full-size decode (docs/benchmarks.md measures by how much).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "EVAL_CROP_FRACTION", "convert_mode", "random_resized_crop_params", "decode_reduced",
    "random_resized_crop", "resize_center_crop", "to_uint8_tensor", "random_hflip", "TrainTransform", "EvalTransform",
    "estimate_channel_stats",
]

MIN_PIXEL_STD = 0.05  # floor of the per-channel std the model divides by (real images: about 0.2 to 0.3)
EVAL_CROP_FRACTION = 0.875  # MAE/DeiT eval: resize to size / 0.875 (224 -> 256), crop the center
DRAFT_SCALES = (8, 4, 2)  # the reductions libjpeg decodes at (Pillow's JPEG draft mode)
STATS_SEED = 0  # which images estimate_channel_stats samples: fixed, so every run of a dataset agrees
_MODES = {1: "L", 3: "RGB"}

ImageLike = Image.Image | np.ndarray  # a PIL image, or a uint8 array (H, W) / (H, W, C)


def _target_mode(channels: int) -> str:
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return _MODES[channels]


def convert_mode(img: Image.Image, channels: int) -> Image.Image:
    """`img` as mode "L" (channels=1) or "RGB" (channels=3), from any Pillow mode."""
    target = _target_mode(channels)
    if img.mode == target:
        return img
    if img.mode == "I" or img.mode.startswith("I;16"):
        # 16-bit grayscale (Pillow opens it as I;16 or I): its own convert clips at 255 instead of scaling
        depth8 = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(depth8), 0, 255).astype(np.uint8))
    elif img.mode == "F":  # float images are taken to hold [0, 1] pixels
        img = Image.fromarray(np.clip(np.rint(np.asarray(img) * 255.0), 0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow warns when converting such palettes straight to RGB
    return img.convert(target)


def _array_channels(arr: np.ndarray) -> int:
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 array of shape (H, W) or (H, W, C), got {arr.dtype} {arr.shape}")
    return 1 if arr.ndim == 2 else arr.shape[2]


def _as_image(img: ImageLike) -> Image.Image:
    if isinstance(img, Image.Image):
        return img
    squeeze = _array_channels(img) == 1 and img.ndim == 3
    return Image.fromarray(img[..., 0] if squeeze else img)


def random_resized_crop_params(
    width: int,
    height: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) of a random resized crop: torchvision's
    RandomResizedCrop.get_params (same draws from the generator), so the crops match it."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    # no sample fit: the largest central crop whose aspect ratio lies within `ratio`
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def decode_reduced(img: Image.Image, max_scale: float) -> tuple[Image.Image, int]:
    """(`img`, scale): a JPEG opened and not decoded yet is set to decode at 1/scale of its size,
    scale the largest of DRAFT_SCALES at most `max_scale` (1 when none is, or for any other image,
    which is returned as it is). A pixel (x, y) of the original lies at (x / scale, y / scale) of
    the reduced image, which is ceil(width / scale) x ceil(height / scale)."""
    scale = next((s for s in DRAFT_SCALES if s <= max_scale), 1)
    if scale == 1:
        return img, 1
    # Pillow picks the largest reduction with (width // w, height // h) both at least it: exactly
    # `scale` for (width // scale, height // scale), as width and height are at least scale here
    width = img.width
    drafted = img.draft(img.mode, (width // scale, img.height // scale))
    if drafted is None:  # not a JPEG, already decoded, or a layout libjpeg cannot scale
        return img, 1
    return img, round(width / drafted[1][2])  # its box: (0, 0, width / chosen scale, height / chosen scale)


def _crop_resize(img: Image.Image, box: tuple[int, int, int, int], size: int, scale: int) -> Image.Image:
    """The region `box` (left, top, right, bottom) of the original image, resized to size x size
    (bicubic); `img` is that original decoded at 1/scale (decode_reduced)."""
    if scale == 1:
        return img.crop(box).resize((size, size), Image.Resampling.BICUBIC)
    return img.resize((size, size), Image.Resampling.BICUBIC, box=tuple(c / scale for c in box))


def random_resized_crop(
    img: Image.Image,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """A random crop of `img` (area fraction in `scale`, aspect ratio in `ratio`), resized to
    size x size with bicubic interpolation. Defaults are MAE's."""
    top, left, h, w = random_resized_crop_params(img.width, img.height, generator, scale, ratio)
    return _crop_resize(img, (left, top, left + w, top + h), size, 1)


def resize_center_crop(img: Image.Image, size: int, scale: int = 1,
                       original_size: tuple[int, int] | None = None) -> Image.Image:
    """Evaluation view: shorter side resized (bicubic) to round(size / 0.875), then the central
    size x size crop. An image that is already size x size is returned unchanged. `img` may be
    an image of `original_size` decoded at 1/scale (decode_reduced): the view is then the one of
    the original's geometry, resampled from the reduced pixels."""
    w, h = original_size or img.size
    if scale == 1 and img.size == (size, size):
        return img
    short = round(size / EVAL_CROP_FRACTION)
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    box = None if scale == 1 else (0.0, 0.0, w / scale, h / scale)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, box=box)
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)
    return img.crop((left, top, left + size, top + size))


def to_uint8_tensor(img: ImageLike, channels: int) -> Tensor:
    """uint8 (channels, H, W) from a PIL image of any mode or a uint8 array (H, W) / (H, W, C);
    arrays that already have `channels` channels skip Pillow."""
    _target_mode(channels)
    if isinstance(img, np.ndarray) and _array_channels(img) == channels:
        arr = np.array(img, dtype=np.uint8)  # a copy: torch wants a writable array
    else:
        arr = np.array(convert_mode(_as_image(img), channels), dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def random_hflip(x: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """`x` (..., H, W) mirrored left-right with probability p (one draw from the generator)."""
    return x.flip(-1) if torch.rand(1, generator=generator).item() < p else x


class TrainTransform:
    """MAE's training augmentation: random resized crop, horizontal flip (p=0.5), uint8 tensor.
    jpeg_draft: decode JPEG files at a reduced size where the crop allows (decode_reduced)."""

    def __init__(self, size: int, channels: int, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), jpeg_draft: bool = False):
        _target_mode(channels)
        self.size, self.channels, self.scale, self.ratio, self.jpeg_draft = size, channels, scale, ratio, jpeg_draft

    def __call__(self, img: ImageLike, generator: torch.Generator) -> Tensor:
        """`img` may be an image file opened and not decoded yet: it is decoded here."""
        return random_hflip(to_uint8_tensor(self.crop(img, generator), self.channels), generator)

    def crop(self, img: ImageLike, generator: torch.Generator) -> Image.Image:
        """The random resized crop alone, in the target mode (fine-tuning adds its own steps after it)."""
        img = _as_image(img)
        # the crop is drawn on the original size, before any reduced decode: the same draws either way
        top, left, h, w = random_resized_crop_params(img.width, img.height, generator, self.scale, self.ratio)
        img, reduced = decode_reduced(img, min(w, h) / self.size) if self.jpeg_draft else (img, 1)
        img = convert_mode(img, self.channels)
        return _crop_resize(img, (left, top, left + w, top + h), self.size, reduced)

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.size}, channels={self.channels}, scale={self.scale}, ratio={self.ratio}, "
                f"jpeg_draft={self.jpeg_draft})")


class EvalTransform:
    """Deterministic evaluation view: resize + center crop, uint8 tensor. jpeg_draft: as TrainTransform."""

    def __init__(self, size: int, channels: int, jpeg_draft: bool = False):
        _target_mode(channels)
        self.size, self.channels, self.jpeg_draft = size, channels, jpeg_draft

    def __call__(self, img: ImageLike, generator: torch.Generator | None = None) -> Tensor:
        """`generator` is accepted and unused, so datasets call both transforms the same way."""
        if isinstance(img, np.ndarray) and img.shape[:2] == (self.size, self.size):
            return to_uint8_tensor(img, self.channels)  # arrays already at size (CIFAR at 32) skip Pillow
        img = _as_image(img)
        original = img.size
        max_scale = min(original) / round(self.size / EVAL_CROP_FRACTION)
        img, reduced = decode_reduced(img, max_scale) if self.jpeg_draft else (img, 1)
        img = convert_mode(img, self.channels)
        return to_uint8_tensor(resize_center_crop(img, self.size, reduced, original), self.channels)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, channels={self.channels}, jpeg_draft={self.jpeg_draft})"


def estimate_channel_stats(dataset, max_images: int = 1000, seed: int = STATS_SEED
                           ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel pixel mean and std (pixels in [0, 1]) over a fixed random sample of up to
    `max_images` images drawn from the whole of `dataset` (every image when it has no more), so a
    class-sorted folder counts every class, not its first. Items are `(image, ...)`, uint8 or float
    [0, 1]; use an eval-transform dataset so the result is deterministic. The std is clamped to
    >= MIN_PIXEL_STD: a nearly constant channel would otherwise be scaled up a hundredfold or more
    by the model's normalization, and with it any noise a task puts there."""
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot estimate channel statistics of an empty dataset")
    chosen = (range(n) if n <= max_images  # sorted: files are read in the dataset's order
              else torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].sort().values.tolist())
    total = total_sq = None
    pixels = 0
    for i in chosen:
        x = dataset[i][0]
        x = x.to(torch.float64).div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float64)
        x = x.flatten(1)
        if total is None:
            total, total_sq = torch.zeros(x.shape[0], dtype=torch.float64), torch.zeros(x.shape[0], dtype=torch.float64)
        total += x.sum(1)
        total_sq += x.square().sum(1)
        pixels += x.shape[1]
    mean = total / pixels
    std = (total_sq / pixels - mean.square()).clamp_min(0.0).sqrt().clamp_min(MIN_PIXEL_STD)
    return tuple(mean.tolist()), tuple(std.tolist())
