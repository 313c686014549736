"""How fast one CPU core feeds the model: the `data` suite of `energyvit bench`.

It writes a folder of generated photo-like JPEGs (smooth colour fields, sharp-edged shapes and
sensor noise, quality 90) into a temporary folder and times, in the calling process on one torch
thread, what one DataLoader worker does per image. Rates are per CPU-second of that thread
(time.thread_time), so a machine shared with other jobs measures its cores' speed, not its load;
the wall-clock rate is in each row's `timer`.

- op `decode+train_aug`: read the file, decode, random resized crop + flip (TrainTransform), to a
  tensor; dtype `uint8` (what the datasets yield) or `float32` (uint8 then converted to [0, 1]
  floats, what a worker did before the device took that over); backend `pillow` (full-size
  decode) or `pillow+draft` (reduced-size JPEG decode, decode_reduced); `simplejpeg` when that
  package is installed (its own scaled decode, then the same crop);
- op `decode+eval`: the same with EvalTransform (resize + center crop);
- op `collate`: stacking a batch of samples (default_collate), uint8 vs float32, and pinning it
  (CUDA only; else a row marked unavailable).

`pillow+draft` rows carry in their note the mean absolute difference of their pixels from the
full-size decode's (same images, same crops), in levels of 255, and how many images it decoded
reduced.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from energyvit.data.files import open_image
from energyvit.data.transforms import (EVAL_CROP_FRACTION, EvalTransform, TrainTransform, decode_reduced,
                                       random_hflip, random_resized_crop_params, to_uint8_tensor)

__all__ = ["DataBenchSizes", "DATA_SIZES", "synthetic_photo", "write_jpegs", "measure"]


@dataclass(frozen=True)
class DataBenchSizes:
    images: int  # JPEG files generated per source size
    sources: tuple[tuple[int, int], ...]  # their (width, height): each a set of rows
    size: int  # model input side
    batch: int  # collate rows
    min_time: float  # seconds each rate is measured for (at least one pass over the files)


# "full": ImageNet-like files (ImageNet's average is near 400x350, a long tail larger) and larger
# photos, where the reduced decode applies to most crops at 224
DATA_SIZES = {
    "smoke": DataBenchSizes(images=4, sources=((96, 72),), size=32, batch=4, min_time=0.0),
    "full": DataBenchSizes(images=200, sources=((500, 375), (1200, 900)), size=224, batch=64, min_time=5.0),
}


def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A uint8 (height, width, 3) image with a photo's mix of content: a smooth colour field (a
    few low-frequency waves per channel), sharp-edged ellipses, and fine grain (std 20 levels in
    brightness, 3 in colour): at 500x375 and quality 90 the files average about 100 KiB, near
    ImageNet's average JPEG (about 110 KB), which sets the entropy decoder's share of the work."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        field = np.full_like(x, rng.uniform(60, 190))
        for _ in range(4):
            fx, fy = rng.uniform(0.5, 6.0, 2)
            field += rng.uniform(10, 40) * np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
        img[..., c] = field
    for _ in range(int(rng.integers(3, 8))):
        cx, cy = rng.uniform(0, width / max(width, height)), rng.uniform(0, height / max(width, height))
        rx, ry = rng.uniform(0.03, 0.25, 2)
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
        img[inside] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 20, (height, width, 1)) + rng.normal(0, 3, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write_jpegs(folder: str | os.PathLike, count: int, width: int, height: int, seed: int = 0,
                quality: int = 90) -> list[str]:
    """`count` synthetic_photo JPEGs in `folder` (made if missing); their paths, sorted."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"img{i:05d}.jpg")
        Image.fromarray(synthetic_photo(rng, width, height)).save(path, quality=quality)
        paths.append(path)
    return paths


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rates(samples: dict[str, Callable[[int], object]], count: int, min_time: float) -> dict[str, tuple[float, str]]:
    """{name: (items per CPU-second, how it was timed)}: passes of `sample(i)` for i = 0 ..
    count - 1, the samples taking turns pass by pass (so a change of load on the machine falls on
    all of them alike) until each has had min_time of wall time. Each rate counts the calling
    thread's CPU time (time.thread_time: everything here runs in it, on one core), so other jobs
    do not lower it, and takes the fastest pass, the least disturbed by their cache and memory
    traffic."""
    for sample in samples.values():
        sample(0)  # warm-up: imports, caches
    cpu = {name: [] for name in samples}
    wall = {name: [] for name in samples}
    started = time.perf_counter()
    while not wall[next(iter(samples))] or time.perf_counter() - started < min_time * len(samples):
        for name, sample in samples.items():
            c0, w0 = time.thread_time(), time.perf_counter()
            for i in range(count):
                sample(i)
            cpu[name].append(time.thread_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return {name: (count / min(cpu[name]), f"thread CPU time, fastest of {len(cpu[name])} passes over {count} "
                   f"(wall clock: {count / statistics.median(wall[name]):.1f}/s median pass, other jobs included)")
            for name in samples}


def _pillow_sample(paths: list[str], transform, to_float: bool) -> Callable[[int], torch.Tensor]:
    def sample(i: int) -> torch.Tensor:
        with open_image(paths[i]) as img:
            x = transform(img, torch.Generator().manual_seed(i))
        return x.to(torch.float32).div_(255.0) if to_float else x
    return sample


def _simplejpeg_sample(paths: list[str], size: int) -> Callable[[int], torch.Tensor]:
    """decode+train_aug with simplejpeg's scaled decode (ImportError without it): the crop drawn
    on the original size as TrainTransform draws it, the smallest decode that keeps the crop at
    least `size` pixels a side, then Pillow's resize of the crop box and the flip."""
    import simplejpeg

    def sample(i: int) -> torch.Tensor:
        with open(paths[i], "rb") as f:
            data = f.read()
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        generator = torch.Generator().manual_seed(i)
        top, left, h, w = random_resized_crop_params(width, height, generator)
        factor = max(1, min(w, h) // size)
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=math.ceil(width / factor),
                                     min_height=math.ceil(height / factor))
        sx, sy = arr.shape[1] / width, arr.shape[0] / height
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        img = Image.fromarray(arr).resize((size, size), Image.Resampling.BICUBIC, box=box)
        return random_hflip(to_uint8_tensor(img, 3), generator)
    return sample


def _reduction(path: str, transform, seed: int) -> int:
    """The scale the transform's reduced decode picks for the image at `path` (nothing decoded)."""
    with open_image(path) as img:
        if isinstance(transform, TrainTransform):
            _, _, h, w = random_resized_crop_params(img.width, img.height, torch.Generator().manual_seed(seed),
                                                    transform.scale, transform.ratio)
            return decode_reduced(img, min(w, h) / transform.size)[1]
        return decode_reduced(img, min(img.size) / round(transform.size / EVAL_CROP_FRACTION))[1]


def draft_difference(paths: list[str], full, drafted) -> tuple[float, int]:
    """(mean |drafted - full| in levels of 255 over every pixel of every image, images decoded
    reduced): the transforms `full` and `drafted` (the same but jpeg_draft) on the same crops."""
    total = 0.0
    for i in range(len(paths)):
        a, b = _pillow_sample(paths, full, False)(i), _pillow_sample(paths, drafted, False)(i)
        total += (a.float() - b.float()).abs().mean().item()
    return total / len(paths), sum(_reduction(path, drafted, i) > 1 for i, path in enumerate(paths))


def _collate_ms(batch: int, size: int, dtype: torch.dtype, pin: bool, min_time: float) -> tuple[float, str]:
    """(CPU ms per batch, how timed) of default_collate over `batch` samples, then pin_memory if `pin`."""
    samples = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8).to(dtype) for _ in range(batch)]

    def step(_: int) -> None:
        out = default_collate(samples)
        if pin:
            out.pin_memory()

    rate, how = _rates({"collate": step}, 1, min_time)["collate"]
    return 1e3 / rate, how


def _decode_rows(paths: list[str], sizes: DataBenchSizes, source: str) -> list[dict]:
    rows = []
    for op, make in (("decode+train_aug", lambda d: TrainTransform(sizes.size, 3, jpeg_draft=d)),
                     ("decode+eval", lambda d: EvalTransform(sizes.size, 3, jpeg_draft=d))):
        diff, reduced = draft_difference(paths, make(False), make(True))
        variants = [(draft, dtype) for draft in (False, True)
                    for dtype in (("uint8", "float32") if op == "decode+train_aug" else ("uint8",))]
        samples = {(d, t): _pillow_sample(paths, make(d), t == "float32") for d, t in variants}
        if op == "decode+train_aug":
            try:
                samples[("simplejpeg", "uint8")] = _simplejpeg_sample(paths, sizes.size)
            except ImportError:
                rows.append(dict(suite="data", op=op, backend="simplejpeg", dtype="uint8", img_size=sizes.size,
                                 status="unavailable", note=source,
                                 error="simplejpeg is not installed (optional: pip install simplejpeg)"))
        for (draft, dtype), (rate, how) in _rates(samples, len(paths), sizes.min_time).items():
            backend = draft if draft == "simplejpeg" else "pillow+draft" if draft else "pillow"
            note = source + (f"; vs full decode: mean abs diff {diff:.3f} levels of 255, {reduced} of "
                             f"{len(paths)} decoded reduced" if draft is True else "")
            rows.append(_row(op, backend, dtype, sizes.size, rate, how, note))
    return rows


def measure(sizes: DataBenchSizes, folder: str | None = None) -> list[dict]:
    """Rows of the data suite (keys of energyvit.benchmark.FIELDS). The JPEGs are written into
    `folder`, or a temporary folder removed afterwards."""
    with contextlib.ExitStack() as stack, _one_thread():
        if folder is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="energyvit-data-bench-"))
        rows = []
        for width, height in sizes.sources:
            paths = write_jpegs(os.path.join(folder, f"{width}x{height}"), sizes.images, width, height)
            kib = statistics.mean(os.path.getsize(p) for p in paths) / 1024
            rows += _decode_rows(paths, sizes, f"{sizes.images} JPEGs {width}x{height} q90, {kib:.0f} KiB each on average")
        for dtype in ("uint8", "float32"):
            for pin in (False, True):
                base = dict(suite="data", op="collate+pin" if pin else "collate", backend="default_collate",
                            dtype=dtype, img_size=sizes.size, batch=sizes.batch)
                if pin and not torch.cuda.is_available():
                    rows.append(dict(base, status="unavailable", error="pinning memory needs CUDA"))
                    continue
                ms, how = _collate_ms(sizes.batch, sizes.size, getattr(torch, dtype), pin, max(0.5, sizes.min_time / 5))
                rows.append(dict(base, status="ok", ms=f"{ms:.4f}", images_per_s=f"{sizes.batch / ms * 1e3:.1f}",
                                 timer=f"1 torch thread; {how} batch",
                                 note=f"CPU ms per batch of {sizes.batch} samples"))
        return rows


def _row(op: str, backend: str, dtype: str, size: int, rate: float, how: str, note: str) -> dict:
    return dict(suite="data", op=op, backend=backend, dtype=dtype, img_size=size, batch=1, status="ok",
                ms=f"{1e3 / rate:.4f}", images_per_s=f"{rate:.1f}",
                timer=f"1 torch thread, main process; {how} images", note=f"images per CPU-second; {note}")
