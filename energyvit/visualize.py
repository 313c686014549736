"""Restoration grids: one row per image, columns corrupted | x_1 .. x_{K-1} | restored | clean.

Pixels are clamped to [0, 1] (NaN shows black) and quantized to uint8. One-channel images stay
grayscale (PNG mode "L"), three-channel ones are RGB. Images smaller than `min_cell` pixels (on
their shorter side) are enlarged by the smallest integer nearest-neighbour factor reaching it, so
16x16 digits become 64x64 cells that can be read without zooming, with sharp pixel edges.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from energyvit.checkpoint import atomic_write

BORDER_VALUE = 128  # mid-gray: stands out from both black and white images


def restoration_grid(
    corrupted: Tensor, steps: list[Tensor], clean: Tensor, max_rows: int = 8, pad: int = 2, min_cell: int = 64
) -> Tensor:
    """uint8 (H, W, C) grid of the first `max_rows` images of the batch.

    corrupted, clean and each of steps: (B, C, H, W) with C 1 or 3, pixels in [0, 1].
    steps: the restoration trajectory [x_0, x_1, ..., x_K] (`Restoration.steps`), K >= 1; x_0 is
    not drawn, the `corrupted` argument stands in its column (usually it is steps[0]).
    Columns (K + 2): corrupted | x_1 | ... | x_{K-1} | restored x_K | clean.
    Layout: cells of (h * s, w * s) pixels, s = ceil(min_cell / min(h, w)) (at least 1), with a
    `pad`-pixel mid-gray border around and between them: grid height is rows * h * s + (rows + 1)
    * pad, width (K + 2) * w * s + (K + 3) * pad.
    """
    if len(steps) < 2:
        raise ValueError(f"steps must hold x_0 and at least one restoration step, got {len(steps)} tensors")
    columns = [corrupted, *steps[1:], clean]
    shape = corrupted.shape
    if len(shape) != 4 or shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (batch, 1 or 3, height, width), got {tuple(shape)}")
    if any(c.shape != shape for c in columns):
        raise ValueError(f"corrupted, steps and clean differ in shape: {[tuple(c.shape) for c in columns]}")
    rows = min(max_rows, shape[0])
    chans, h, w = shape[1:]
    scale = max(1, math.ceil(min_cell / min(h, w)))
    ch, cw = h * scale, w * scale
    grid = torch.full(
        (rows * ch + (rows + 1) * pad, len(columns) * cw + (len(columns) + 1) * pad, chans), BORDER_VALUE, dtype=torch.uint8
    )
    for j, column in enumerate(columns):
        # slice before moving: only the shown rows leave the device
        cells = torch.nan_to_num(column[:rows].detach().float(), nan=0.0).cpu().clamp(0, 1)
        cells = (cells * 255).round().to(torch.uint8)
        cells = cells.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3).permute(0, 2, 3, 1)
        left = pad + j * (cw + pad)
        for i in range(rows):
            top = pad + i * (ch + pad)
            grid[top : top + ch, left : left + cw] = cells[i]
    return grid


def save_png(image_hwc_uint8: Tensor, path: str | Path) -> None:
    """Write a uint8 (H, W, C) image as PNG, mode L for C = 1, RGB for C = 3.

    Atomic: a temporary file beside `path` is renamed over it, so a reader (or a crash) never
    sees a partial image.
    """
    if image_hwc_uint8.dtype != torch.uint8 or image_hwc_uint8.ndim != 3 or image_hwc_uint8.shape[2] not in (1, 3):
        raise ValueError(f"expected a uint8 (H, W, 1 or 3) image, got {image_hwc_uint8.dtype} {tuple(image_hwc_uint8.shape)}")
    array = image_hwc_uint8.cpu().contiguous().numpy()
    # Pillow infers the mode from the array: (H, W) uint8 is L, (H, W, 3) uint8 is RGB
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def save_restoration_grid(
    path: str | Path, corrupted: Tensor, steps: list[Tensor], clean: Tensor, max_rows: int = 8
) -> Tensor:
    """`restoration_grid` saved to `path` as PNG; returns the grid (e.g. for `MetricsLogger.add_image`)."""
    grid = restoration_grid(corrupted, steps, clean, max_rows=max_rows)
    save_png(grid, path)
    return grid


def hot_colors(values: Tensor) -> Tensor:
    """uint8 (..., 3) colors of values in [0, 1] on the 'hot' scale: black, red, yellow, white."""
    v = values.clamp(0, 1)
    rgb = torch.stack([(3 * v).clamp(0, 1), (3 * v - 1).clamp(0, 1), (3 * v - 2).clamp(0, 1)], dim=-1)
    return (rgb * 255).round().to(torch.uint8)


def heatmap_strip(image: Tensor, maps: list[Tensor], scales: list[float], pad: int = 2, min_cell: int = 128) -> Tensor:
    """uint8 (H, W, 3) strip: the image (C, H, W) in [0, 1], then each per-patch map (grid, grid)
    divided by its scale (values at or above it are white), every cell enlarged alike (nearest
    neighbour, so patches stay visible) and separated by mid-gray."""
    c, h, w = image.shape
    scale = max(1, math.ceil(min_cell / min(h, w)))
    ch, cw = h * scale, w * scale
    cells = [(image.detach().float().cpu().clamp(0, 1).expand(3, h, w) * 255).round().to(torch.uint8).permute(1, 2, 0)
             .repeat_interleave(scale, 0).repeat_interleave(scale, 1)]
    for m, s in zip(maps, scales):
        colored = hot_colors(m.detach().float().cpu() / max(s, 1e-12))
        cells.append(colored.repeat_interleave(ch // m.shape[0], 0).repeat_interleave(cw // m.shape[1], 1))
    strip = torch.full((ch + 2 * pad, len(cells) * cw + (len(cells) + 1) * pad, 3), BORDER_VALUE, dtype=torch.uint8)
    for j, cell in enumerate(cells):
        left = pad + j * (cw + pad)
        strip[pad: pad + ch, left: left + cw] = cell
    return strip
