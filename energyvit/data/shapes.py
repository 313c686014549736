"""Procedural labeled scenes: one object of ten shape classes among clutter, as an ImageFolder tree.

Each image holds one labeled object (disc, ring, square, triangle, star, cross, crescent, arrow,
heart, ell) at a random position, size, rotation (up to 45 degrees either way) and aspect, filled
with a random texture (solid, stripes, checker, dots, gradient, smooth noise) in random colors,
over a darker textured background. Distractors (small shapes and cut-off fragments of the other
classes, thick lines, in any colors) lie behind it or in front of it, where they may hide part of
it, never more than 1 - min_visible of it. Colors and textures carry no label information: only
the object's shape does.

The defaults are calibrated (experiments/calibrate_shapes.py) so that a linear probe on raw
pixels or on a random-init ViT's mean-pooled features sits far below the ceiling, yet above
chance, and a few minutes of self-supervised pretraining on one CPU core visibly improves on
them. The object is lighter than its background (object_contrast) and turns by at most 45
degrees: with colors of either polarity or full rotations both baselines fall to near chance.

    energyvit shapes DIR                          # DIR/train/<class>/*.png, DIR/val/<class>/*.png
    energyvit pretrain --data_path DIR ...

The tree is written into a hidden temporary folder beside DIR and renamed to DIR at the end, so an
interrupted run never leaves a dataset that looks complete. Every image is a function of (seed,
split, class, index) alone: the same seed gives the same files. This module depends on numpy and
Pillow only.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("disc", "ring", "square", "triangle", "star", "cross", "crescent", "arrow", "heart", "ell")
TEXTURES = ("solid", "stripes", "checker", "dots", "gradient", "noise")
SPLITS = ("train", "val")
SUPERSAMPLE = 4  # shapes are drawn on a 4x finer grid and box-averaged: anti-aliased edges

DEFAULTS = dict(
    train_per_class=1000, val_per_class=200, size=32, seed=0,
    min_scale=0.45, max_scale=0.8,  # object diameter as a fraction of the image side
    max_aspect=1.5,  # the object is stretched along one axis by up to this factor
    max_rotation=45.0,  # the object turns by up to this many degrees either way (distractors: any angle)
    clutter=6,  # distractors per image: between clutter // 2 and clutter
    front_fraction=0.5,  # share of the distractors drawn over the object (occluders)
    min_visible=0.6,  # an occluder that would hide more of the object than 1 - this is left out
    texture_contrast=1.0,  # 0: every texture is flat; 1: its two colors are independent
    object_contrast=0.5,  # background channels lie in [0, 1 - this], the object's in [this, 1]
)


# ---------------------------------------------------------------------------------------------
# Shapes: inside tests on canonical coordinates (u, v), each shape roughly filling the unit disc


def _star(u, v, points=5, inner=0.45):
    """A star polygon: fold the angle into one spike, then test the side of its edge."""
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    sector = 2 * math.pi / points
    phi = np.abs(np.mod(theta, sector) - sector / 2) - sector / 2  # 0 at a tip, -sector/2 between
    x, y = r * np.cos(phi), r * np.abs(np.sin(phi))
    bx, by = inner * math.cos(sector / 2), inner * math.sin(sector / 2)  # the valley next to tip (1, 0)
    return (bx - 1) * y - by * (x - 1) >= 0


def _triangle(u, v):
    inside = np.ones(u.shape, dtype=bool)
    for k in range(3):  # equilateral, vertices on the unit circle: three half-planes at distance 1/2
        a = -math.pi / 2 + math.pi / 3 + k * 2 * math.pi / 3
        inside &= u * math.cos(a) + v * math.sin(a) <= 0.5
    return inside


def _heart(u, v):
    x, y = 1.2 * u, 0.1 - 1.2 * v  # the classic curve (x^2 + y^2 - 1)^3 = x^2 y^3, y pointing up
    t = x * x + y * y - 1
    return t * t * t <= x * x * y * y * y  # products, not powers: several times faster in numpy


SHAPES = {
    "disc": lambda u, v: u * u + v * v <= 1,
    "ring": lambda u, v: (u * u + v * v <= 1) & (u * u + v * v >= 0.55**2),
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.72,
    "triangle": _triangle,
    "star": _star,
    "cross": lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95)),
    "crescent": lambda u, v: (u * u + v * v <= 1) & ((u - 0.5) ** 2 + v * v >= 0.8**2),
    "arrow": lambda u, v: (((u >= -0.95) & (u <= 0.15) & (np.abs(v) <= 0.2))
                           | ((u >= 0.05) & (np.abs(v) <= 0.9 * (0.95 - u)))),
    "heart": _heart,
    "ell": lambda u, v: (((u >= -0.75) & (u <= -0.2) & (np.abs(v) <= 0.9))
                         | ((u >= -0.75) & (u <= 0.75) & (v >= 0.35) & (v <= 0.9))),
}
assert tuple(SHAPES) == CLASSES


def _shape_mask(kind, X, Y, cx, cy, radius, angle, aspect):
    """Pixels of shape `kind` centered at (cx, cy), of `radius`, rotated and stretched by `aspect`."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = X - cx, Y - cy
    stretch = math.sqrt(aspect)
    u = (c * dx + s * dy) / (radius * stretch)
    v = (c * dy - s * dx) * stretch / radius
    return SHAPES[kind](u, v)


def _random_shape_mask(kind, X, Y, rng, cx, cy, radius, max_aspect):
    return _shape_mask(kind, X, Y, cx, cy, radius, rng.uniform(0, 2 * math.pi), rng.uniform(1, max_aspect))


# ---------------------------------------------------------------------------------------------
# Textures: a pattern in [0, 1] mixes two colors


def _smooth_noise(X, Y, rng, size):
    """Value noise: a coarse random grid, bilinearly interpolated."""
    cells = int(rng.integers(2, 6))
    grid = rng.random((cells + 1, cells + 1))
    gx, gy = X / size * cells, Y / size * cells
    ix, iy = np.minimum(gx.astype(int), cells - 1), np.minimum(gy.astype(int), cells - 1)
    fx, fy = gx - ix, gy - iy
    top = grid[iy, ix] * (1 - fx) + grid[iy, ix + 1] * fx
    bottom = grid[iy + 1, ix] * (1 - fx) + grid[iy + 1, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _pattern(kind, X, Y, rng, size):
    angle = rng.uniform(0, math.pi)
    a = X * math.cos(angle) + Y * math.sin(angle)
    b = Y * math.cos(angle) - X * math.sin(angle)
    period = rng.uniform(0.1, 0.25) * size  # coarse enough to survive downscaling to half the size
    phase = rng.random(2)
    if kind == "solid":
        return np.zeros_like(X)
    if kind == "stripes":
        return (np.mod(a / period + phase[0], 1) < 0.5).astype(float)
    if kind == "checker":
        return (np.floor(a / period + phase[0]) + np.floor(b / period + phase[1])) % 2
    if kind == "dots":
        fa, fb = np.mod(a / period + phase[0], 1) - 0.5, np.mod(b / period + phase[1], 1) - 0.5
        return (fa * fa + fb * fb < rng.uniform(0.05, 0.15)).astype(float)
    if kind == "gradient":  # spans the points given: the layer's own extent
        return a if a.size == 0 else (a - a.min()) / max(np.ptp(a), 1e-6)
    return _smooth_noise(X, Y, rng, size)


def _fill(X, Y, rng, size, contrast, lo=0.0, hi=1.0):
    """(..., 3) colors at the points (X, Y) of a random texture in two random colors with channels
    in [lo, hi], the second pulled towards the first by `contrast` (0: one flat color). Callers
    pass only the points a layer covers: far cheaper than texturing the whole canvas for each
    small distractor."""
    c1 = rng.uniform(lo, hi, 3)
    c2 = c1 + contrast * (rng.uniform(lo, hi, 3) - c1)
    t = _pattern(TEXTURES[rng.integers(len(TEXTURES))], X, Y, rng, size)[..., None]
    return c1 * (1 - t) + c2 * t


# ---------------------------------------------------------------------------------------------
# Scenes


def _distractor_mask(label, X, Y, rng, size, object_radius, max_aspect):
    """A small shape of another class, a cut-off fragment of one, or a thick line segment."""
    kind = ("piece", "fragment", "line")[rng.integers(3)]
    cx, cy = rng.uniform(0, size, 2)
    if kind == "line":
        length, width = rng.uniform(0.3, 0.8) * size, rng.uniform(0.03, 0.08) * size
        angle = rng.uniform(0, math.pi)
        along = (X - cx) * math.cos(angle) + (Y - cy) * math.sin(angle)
        across = (Y - cy) * math.cos(angle) - (X - cx) * math.sin(angle)
        return (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2)
    other = CLASSES[(CLASSES.index(label) + 1 + rng.integers(len(CLASSES) - 1)) % len(CLASSES)]
    if kind == "piece":
        return _random_shape_mask(other, X, Y, rng, cx, cy, rng.uniform(0.25, 0.5) * object_radius, max_aspect)
    # fragment: a larger shape, cut by a line near its center, one side kept
    mask = _random_shape_mask(other, X, Y, rng, cx, cy, rng.uniform(0.5, 0.8) * object_radius, max_aspect)
    cut = rng.uniform(0, 2 * math.pi)
    return mask & ((X - cx) * math.cos(cut) + (Y - cy) * math.sin(cut) >= rng.uniform(-0.2, 0.3) * object_radius)


def render(label: str, rng: np.random.Generator, *, size: int, min_scale: float, max_scale: float,
           max_aspect: float, max_rotation: float, clutter: int, front_fraction: float, min_visible: float,
           texture_contrast: float, object_contrast: float) -> np.ndarray:
    """One scene with an object of class `label`: a uint8 (size, size, 3) array. The parameters
    are those of DEFAULTS."""
    n = size * SUPERSAMPLE
    Y, X = np.mgrid[0:n, 0:n]
    X, Y = (X + 0.5) / SUPERSAMPLE, (Y + 0.5) / SUPERSAMPLE  # pixel-center coordinates in output pixels
    X, Y = X.astype(np.float32), Y.astype(np.float32)

    canvas = _fill(X, Y, rng, size, texture_contrast, hi=1 - object_contrast)
    radius, aspect = rng.uniform(min_scale, max_scale) * size / 2, rng.uniform(1, max_aspect)
    reach = min(radius * math.sqrt(aspect), size / 2)  # the stretched object's bounding circle stays inside
    cx, cy = rng.uniform(reach, size - reach, 2)
    angle = math.radians(rng.uniform(-max_rotation, max_rotation))
    obj = _shape_mask(label, X, Y, cx, cy, radius, angle, aspect)
    obj_fill = _fill(X[obj], Y[obj], rng, size, texture_contrast, lo=object_contrast)

    count = int(rng.integers(clutter // 2, clutter + 1))
    in_front = int(rng.binomial(count, front_fraction))
    for _ in range(count - in_front):
        mask = _distractor_mask(label, X, Y, rng, size, radius, max_aspect)
        canvas[mask] = _fill(X[mask], Y[mask], rng, size, texture_contrast)
    canvas[obj] = obj_fill
    visible, area = obj, obj.sum()
    for _ in range(in_front):
        mask = _distractor_mask(label, X, Y, rng, size, radius, max_aspect)
        fill = _fill(X[mask], Y[mask], rng, size, texture_contrast)
        still_visible = visible & ~mask
        if still_visible.sum() < min_visible * area:
            continue  # it would hide too much: the label must stay recognizable
        canvas[mask] = fill
        visible = still_visible
    out = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.rint(out * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Writing the tree

LIMITS = {  # name: (type, lowest, highest or None)
    "train_per_class": (int, 1, None), "val_per_class": (int, 1, None), "size": (int, 8, 1024), "seed": (int, 0, None),
    "min_scale": (float, 0.05, 1.0), "max_scale": (float, 0.05, 1.0), "max_aspect": (float, 1.0, 4.0),
    "max_rotation": (float, 0.0, 180.0),
    "clutter": (int, 0, 100), "front_fraction": (float, 0.0, 1.0), "min_visible": (float, 0.0, 1.0),
    "texture_contrast": (float, 0.0, 1.0), "object_contrast": (float, 0.0, 0.5),
}


def limit_text(name: str) -> str:
    kind, lo, hi = LIMITS[name]
    what = "an integer" if kind is int else "a number"
    return f"must be {what} >= {lo}" if hi is None else f"must be {what} between {lo} and {hi}"


def check_value(name: str, value) -> None:
    kind, lo, hi = LIMITS[name]
    ok = isinstance(value, (int, np.integer)) if kind is int else isinstance(value, (int, float, np.number))
    if isinstance(value, bool) or not ok or not (lo <= value and (hi is None or value <= hi)):  # NaN fails too
        raise ValueError(f"{name} {limit_text(name)}, got {value!r}")


def check_params(params: dict) -> None:
    """ValueError naming the first parameter outside LIMITS, or a scale range that is empty."""
    for name, value in params.items():
        check_value(name, value)
    if params["min_scale"] > params["max_scale"]:
        raise ValueError(f"min_scale ({params['min_scale']}) must not exceed max_scale ({params['max_scale']})")


def _image_rng(seed: int, split: str, label: int, index: int) -> np.random.Generator:
    """Each image's own stream: it depends on nothing but its address, not on generation order."""
    return np.random.default_rng([seed, SPLITS.index(split), label, index])


def _write_tree(root: Path, params: dict) -> int:
    scene = {k: v for k, v in params.items() if k not in ("train_per_class", "val_per_class", "seed")}
    count = 0
    for split in SPLITS:
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(params[f"{split}_per_class"]):
                pixels = render(name, _image_rng(params["seed"], split, label, i), **scene)
                Image.fromarray(pixels).save(folder / f"{i:05d}.png", format="PNG")
                count += 1
    return count


def generate(output_dir: str | os.PathLike, overwrite: bool = False, **params) -> dict:
    """Write DIR/train/<class>/NNNNN.png and DIR/val/<class>/NNNNN.png (plus DIR/shapes.json, the
    parameters) and return a summary. Parameters not given take DEFAULTS. An existing non-empty
    `output_dir` is an error unless `overwrite`; it is replaced only once the new tree is complete."""
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown parameters: {', '.join(unknown)}")
    params = {**DEFAULTS, **params}
    check_params(params)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (overwrite to replace it)")

    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"  # hidden: no reader takes it for a dataset
    shutil.rmtree(partial, ignore_errors=True)
    try:
        count = _write_tree(partial, params)
        summary = {"classes": list(CLASSES), "images": count, **params}
        (partial / "shapes.json").write_text(json.dumps(summary, indent=1) + "\n")
        if out.exists():  # move the old tree aside first: a crash here leaves it, not a mix
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            partial.rename(out)
            shutil.rmtree(old)
        else:
            partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"output_dir": str(out), "seconds": time.perf_counter() - start, **summary}
