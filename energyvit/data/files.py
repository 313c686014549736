"""Datasets of users' own images for pretraining: an ImageFolder tree (one subfolder per class),
a flat folder of unlabeled images (recursive), WebDataset tar shards, CIFAR-10/100 python
batches, and MNIST-style idx files (gzipped or not). `open_dataset` detects the format and
returns a torch Dataset.

Samples are addressed by key `(index, seed)`: the training sampler yields such tuples, and the
sample's augmentation draws from `torch.Generator().manual_seed(seed)`, so it is the same in
the main process and in any DataLoader worker. A plain int index means seed 0. Items are
`(image, label, skipped)`: a uint8 (C, H, W) tensor (the device makes it float [0, 1]:
energyvit.data.pixels.to_float_pixels), the class index (-1 when unlabeled), and how many
unreadable images were passed over to find this sample (the training loop sums it to report
skipped files per epoch).

A corrupt or unreadable image (file or shard member) is logged once and replaced by the next
readable one, so one bad file never stops a long run; setup errors (missing or empty folder,
malformed CIFAR or idx files, no readable shard) fail at once with one message that names the path.
"""
from __future__ import annotations

import copy
import gzip
import io
import logging
import math
import os
import pickle
import re
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from energyvit.data import webdataset
from energyvit.data.transforms import EvalTransform, TrainTransform

__all__ = [
    "IMAGE_EXTENSIONS", "FORMATS", "MAX_DECODE_TRIES", "DecodingDataset", "ImageFileDataset", "ShardDataset",
    "ArrayDataset", "detect_format", "open_dataset",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
FORMATS = ("imagefolder", "flat", "webdataset", "cifar10", "cifar100", "idx")
MAX_DECODE_TRIES = 50  # consecutive unreadable files before a sample fails for good
# What Pillow raises on a corrupt, truncated or unsupported file (UnidentifiedImageError is an
# OSError); DecompressionBombError guards against absurd image sizes.
TOO_LARGE = (Image.DecompressionBombError, Image.DecompressionBombWarning)  # above Image.MAX_IMAGE_PIXELS
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, *TOO_LARGE)


def open_image(source: str | os.PathLike | io.BytesIO, formats: Sequence[str] | None = None) -> Image.Image:
    """The image, opened and not decoded (a transform may set a reduced JPEG decode first): use
    it in a `with` block. One above Image.MAX_IMAGE_PIXELS raises one of TOO_LARGE here: Pillow
    only warns up to twice the limit, and that warning is made an error. `formats` limits the
    decoders Pillow tries."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(source, formats=formats)


def read_image(path: str | os.PathLike) -> Image.Image:
    """The image file, decoded now (inside the caller's error handling); TOO_LARGE as open_image."""
    with open_image(path) as img:  # leaving closes the file only; the decoded pixels stay
        img.load()
    return img


CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
CIFAR_SIDE = 32
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (n, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (n,)
_IDX_IMAGES = re.compile(r"^(?P<prefix>.*?)(?P<split>train|t10k|test)-images[-.]idx3-ubyte(?:\.gz)?$", re.IGNORECASE)
_IDX_SPLITS = {"train": ("train",), "val": ("t10k", "test")}

Transform = Callable[[Image.Image | np.ndarray, torch.Generator], Tensor]
SampleKey = int | tuple[int, int]
Sample = tuple[Tensor, int, int]


class UnreadableImages(ValueError):
    """Too many images in a row could not be decoded: the data, not the program, is at fault."""


class _KeyedDataset(Dataset):
    """What both datasets share: `(index, seed)` keys, class names and a description."""

    def __init__(self, transform: Transform, channels: int, classes: list[str] | None, source: str):
        self.transform, self.channels, self.classes, self.source = transform, channels, classes, source

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def num_images(self) -> int:
        return len(self)

    @property
    def num_classes(self) -> int:
        return 0 if self.classes is None else len(self.classes)

    def _key(self, key: SampleKey) -> tuple[int, int]:
        index, seed = key if isinstance(key, (tuple, list)) else (key, 0)
        index = int(index)  # keys may arrive as numpy ints or 0-dim tensors
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for the {len(self)} images of {self.source or 'the dataset'}")
        return index, int(seed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source or '?'}, {len(self)} images, {self.num_classes} classes)"

    def unaugmented(self) -> _KeyedDataset:
        """The same images through EvalTransform: a shallow copy sharing the file list, shard index
        or arrays (opening the dataset again would walk the folder or load the arrays a second time)."""
        plain = copy.copy(self)
        plain.transform = EvalTransform(self.transform.size, self.channels, self.transform.jpeg_draft)
        return plain


class DecodingDataset(_KeyedDataset):
    """Images decoded on access (files or shard members): an unreadable one is logged (once per
    image and process) and replaced by the next readable one, index (i + 1) % n, (i + 2) % n, ...;
    after MAX_DECODE_TRIES failures in a row the sample raises UnreadableImages naming them."""

    def __init__(self, transform: Transform, channels: int, classes: list[str] | None, source: str):
        super().__init__(transform, channels, classes, source)
        self._warned: set[int] = set()

    def _open(self, index: int) -> Image.Image:
        """Image `index`, opened, not decoded yet (the transform decodes it)."""
        raise NotImplementedError

    def where(self, index: int) -> str:
        """Image `index` named for a message."""
        raise NotImplementedError

    def label(self, index: int) -> int:
        raise NotImplementedError

    def _warn_once(self, index: int, exc: Exception) -> None:
        if index in self._warned:
            return
        self._warned.add(index)
        if isinstance(exc, TOO_LARGE):
            log.warning("skipping image %s: larger than the %d pixels allowed (a guard against decompression bombs; "
                        "--max_image_pixels raises it)", self.where(index), Image.MAX_IMAGE_PIXELS)
        else:
            log.warning("skipping unreadable image %s (%s: %s)", self.where(index), type(exc).__name__, exc)

    def decode(self, index: int, seed: int = 0) -> Tensor:
        """Image `index` through the transform, its random draws seeded by `seed`; one of
        DECODE_ERRORS when it is unreadable (no replacement: for callers that name each image)."""
        with self._open(index) as img:
            return self.transform(img, torch.Generator().manual_seed(seed))

    def __getitem__(self, key: SampleKey) -> Sample:
        index, seed = self._key(key)
        failed: list[int] = []
        for attempt in range(min(MAX_DECODE_TRIES, len(self))):
            i = (index + attempt) % len(self)
            try:
                image = self.decode(i, seed)
            except DECODE_ERRORS as exc:
                self._warn_once(i, exc)
                failed.append(i)
                continue
            return image, self.label(i), len(failed)
        names = [self.where(i) for i in failed]
        listed = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
        raise UnreadableImages(f"{len(names)} images in a row could not be decoded, from index {index} of "
                               f"{self.source or 'the dataset'} (corrupt or not images): {listed}")


class ImageFileDataset(DecodingDataset):
    """Image files decoded with Pillow. `samples` lists (path, label), label -1 when unlabeled."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Transform, channels: int,
                 classes: list[str] | None = None, source: str = ""):
        if not samples:
            raise ValueError(f"no image files given for {source or 'the dataset'}")
        super().__init__(transform, channels, classes, source)
        # one bytes array and one int array instead of a list of tuples: a forked DataLoader
        # worker would otherwise copy the whole list by touching its objects' refcounts
        self._paths = np.array([os.fsencode(path) for path, _ in samples])
        self._labels = np.array([label for _, label in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._labels)

    def path(self, index: int) -> str:
        return os.fsdecode(self._paths[index])

    where = path

    def label(self, index: int) -> int:
        return int(self._labels[index])

    @property
    def targets(self) -> np.ndarray:
        """Every image's label (-1 when unlabeled), read from the file list: nothing is decoded."""
        return self._labels

    def _open(self, index: int) -> Image.Image:
        return open_image(self.path(index))


class ShardDataset(DecodingDataset):
    """The samples of WebDataset tar shards (energyvit.data.webdataset.ShardIndex), each image
    read with one pread and decoded as JPEG, PNG or WebP only (whatever its bytes claim)."""

    def __init__(self, index: webdataset.ShardIndex, transform: Transform, channels: int,
                 classes: list[str] | None = None, source: str = ""):
        if len(index) == 0:
            raise ValueError(f"no samples given for {source or 'the dataset'}")
        super().__init__(transform, channels, classes, source)
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def where(self, index: int) -> str:
        return f"{self.index.shards[self.index.shard[index]]} (member at byte {int(self.index.offset[index])})"

    def label(self, index: int) -> int:
        return int(self.index.label[index])

    @property
    def targets(self) -> np.ndarray:
        """Every sample's label (-1 when unlabeled), from the index: nothing is read."""
        return self.index.label

    def _open(self, index: int) -> Image.Image:
        return open_image(io.BytesIO(webdataset.read_member(self.index, index)), formats=webdataset.PIL_FORMATS)


class ArrayDataset(_KeyedDataset):
    """uint8 images held in memory, (N, H, W) or (N, H, W, C), with optional int labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | Sequence[int] | None, transform: Transform,
                 channels: int, classes: list[str] | None = None, source: str = ""):
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
            raise ValueError(f"images must be uint8 (N, H, W) or (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
        if len(images) == 0:
            raise ValueError(f"no images given for {source or 'the dataset'}")
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int64)
            if labels.shape != (len(images),):
                raise ValueError(f"{len(images)} images but labels of shape {labels.shape}")
        super().__init__(transform, channels, classes, source)
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    @property
    def targets(self) -> np.ndarray:
        """Every image's label (-1 when unlabeled)."""
        return np.full(len(self.images), -1, dtype=np.int64) if self.labels is None else self.labels

    def __getitem__(self, key: SampleKey) -> Sample:
        index, seed = self._key(key)
        label = -1 if self.labels is None else int(self.labels[index])
        return self.transform(self.images[index], torch.Generator().manual_seed(seed)), label, 0


# ---------------------------------------------------------------------------------------------
# Finding files


def _is_image_name(name: str) -> bool:
    # hidden files are skipped: macOS "._x.jpg" metadata would otherwise count as corrupt images
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def iter_image_files(root: str) -> Iterator[str]:
    """Image files below `root`, recursively, in sorted order; symlinked folders are followed,
    each real folder once (so a link loop ends)."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield from (os.path.join(dirpath, name) for name in sorted(filenames) if _is_image_name(name))


def _has_images(root: str) -> bool:
    return next(iter_image_files(root), None) is not None


def _subdirs(path: str) -> list[str]:
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _loose_images(path: str) -> list[str]:
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if e.is_file() and _is_image_name(e.name))


def _no_images_error(path: str) -> ValueError:
    return ValueError(f"no images found under {path} (looked for {', '.join(IMAGE_EXTENSIONS)} files, "
                      "CIFAR-10/100 python batches and MNIST-style idx files)")


def _split_roots(path: str) -> tuple[str, str | None]:
    """(train folder, val folder or None): DIR/train and DIR/val when DIR/train exists (the
    MAE/ImageNet layout), else DIR alone."""
    train = os.path.join(path, "train")
    if not os.path.isdir(train):
        return path, None
    val = os.path.join(path, "val")
    return train, val if os.path.isdir(val) else None


def _is_cifar10(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, name)) for name in (*CIFAR10_TRAIN, CIFAR10_TEST))


def _is_cifar100(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, name)) for name in ("train", "test"))


def _idx_images_file(path: str, split: str) -> str | None:
    """The idx images file of `split` in folder `path` (train-* or t10k-*/test-*), or None.
    The uncompressed copy wins when both it and the .gz are there."""
    names = [n for n in sorted(os.listdir(path))
             if (m := _IDX_IMAGES.match(n)) and m["split"].lower() in _IDX_SPLITS[split]
             and os.path.isfile(os.path.join(path, n))]
    bases = sorted({_strip_gz(n) for n in names})
    if not bases:
        return None
    if len(bases) > 1:
        raise ValueError(f"several idx image sets for the {split} split in {path}: {', '.join(bases)}; "
                         "point to a folder that holds one")
    return os.path.join(path, bases[0] if bases[0] in names else names[0])


def _strip_gz(name: str) -> str:
    return name[:-3] if name.lower().endswith(".gz") else name


def _idx_labels_file(images_file: str) -> str | None:
    base = _strip_gz(os.path.basename(images_file))
    labels = re.sub(r"-images([-.])idx3", r"-labels\1idx1", base, flags=re.IGNORECASE)
    for name in (labels, labels + ".gz"):
        candidate = os.path.join(os.path.dirname(images_file), name)
        if os.path.isfile(candidate):
            return candidate
    return None


def _is_idx(path: str) -> bool:
    return any(_idx_images_file(path, split) is not None for split in _IDX_SPLITS)


_ARRAY_FORMATS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("cifar10", _is_cifar10), ("cifar100", _is_cifar100), ("idx", _is_idx))


def _array_format(path: str) -> str | None:
    return next((fmt for fmt, matches in _ARRAY_FORMATS if matches(path)), None)


def _locate(path: str) -> tuple[str, str]:
    """(format, folder that holds it, or the shard pattern): see `detect_format`."""
    if webdataset.is_pattern(path):
        return "webdataset", path
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset path not found: {path}")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"dataset path must be a folder, not a file: {path}")
    fmt = _array_format(path)
    if fmt is not None:
        return fmt, path
    nested = [(fmt, os.path.join(path, sub)) for sub in _subdirs(path)
              if (fmt := _array_format(os.path.join(path, sub))) is not None]
    if len(nested) > 1:
        raise ValueError(f"several datasets under {path}: "
                         f"{', '.join(f'{where} ({fmt})' for fmt, where in nested)}; pass one of them")
    if nested:
        return nested[0]
    train, _ = _split_roots(path)
    if webdataset.list_shards(train):
        return "webdataset", path
    if not _loose_images(train) and any(_has_images(os.path.join(train, sub)) for sub in _subdirs(train)):
        return "imagefolder", path
    if _has_images(train):
        return "flat", path
    raise _no_images_error(train)


def detect_format(path: str) -> str:
    """The format of the dataset folder `path`, one of FORMATS, checked in this order:

    - "cifar10": data_batch_1..5 and test_batch (in `path`, or in one subfolder such as
      cifar-10-batches-py/);
    - "cifar100": files `train` and `test` (e.g. in cifar-100-python/);
    - "idx": train-images-idx3-ubyte[.gz] and/or t10k-images-idx3-ubyte[.gz], with their
      -labels-idx1-ubyte files (also in one subfolder);
    - "webdataset": `.tar` shards directly in `path` (or `path`/train, with `path`/val the val
      split), or a brace pattern of shard files such as `DIR/shard-{000000..000146}.tar`;
    - "imagefolder": `path` (or `path`/train when it exists) holds no images itself and has
      subfolders with images: one class per subfolder;
    - "flat": image files anywhere below `path` (or `path`/train), unlabeled.

    FileNotFoundError when `path` does not exist, ValueError when it holds no images."""
    return _locate(path)[0]


# ---------------------------------------------------------------------------------------------
# Reading CIFAR and idx files


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches hold (dicts, lists, bytes, numpy arrays): a pickle that
    names any other global fails instead of running code from a data file."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _load_cifar_pickle(path: str) -> dict:
    """A CIFAR python pickle as a dict with str keys (the files' keys are bytes under Python 3)."""
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except OSError:  # an unreadable file is not a malformed one: keep the OS's message
        raise
    except Exception as exc:  # a damaged pickle can raise nearly anything; all mean "malformed"
        raise ValueError(f"{path}: not a readable CIFAR python pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a CIFAR python pickle (holds a {type(obj).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _load_cifar(paths: Sequence[str], label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 32, 32, 3), labels int64 (N,)) of the CIFAR batch files `paths`."""
    images, labels = [], []
    for path in paths:
        batch = _load_cifar_pickle(path)
        if "data" not in batch or label_key not in batch:
            raise ValueError(f"{path}: malformed CIFAR batch: needs keys 'data' and '{label_key}', "
                             f"has {sorted(map(str, batch))}")
        data, batch_labels = np.asarray(batch["data"]), np.asarray(batch[label_key])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * CIFAR_SIDE**2:
            raise ValueError(f"{path}: malformed CIFAR batch: data is {data.dtype} {data.shape}, "
                             f"expected uint8 (N, {3 * CIFAR_SIDE**2})")
        if batch_labels.shape != (len(data),) or not np.issubdtype(batch_labels.dtype, np.integer):
            raise ValueError(f"{path}: malformed CIFAR batch: {len(data)} images but '{label_key}' "
                             f"is {batch_labels.dtype} {batch_labels.shape}")
        if len(batch_labels) and not 0 <= batch_labels.min() <= batch_labels.max() < num_classes:
            raise ValueError(f"{path}: malformed CIFAR batch: labels outside 0..{num_classes - 1}")
        # rows are channel-planar (R plane, G plane, B plane): make them (H, W, C)
        images.append(data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1))
        labels.append(batch_labels.astype(np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _cifar_classes(meta_path: str, key: str, num_classes: int) -> list[str]:
    """Class names from the meta pickle when it is there, else "0", "1", ..."""
    if not os.path.isfile(meta_path):
        return [str(i) for i in range(num_classes)]
    names = _load_cifar_pickle(meta_path).get(key)
    if not isinstance(names, list) or len(names) != num_classes:
        raise ValueError(f"{meta_path}: malformed CIFAR meta file: '{key}' should list {num_classes} names")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


def _read_idx(path: str, magic: int) -> np.ndarray:
    """The uint8 array of an idx file (gzip detected by its magic bytes, not the file name)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt gzip data ({exc})") from exc
    kind = "images" if magic == IDX_IMAGES_MAGIC else "labels"
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated idx {kind} file ({len(raw)} bytes)")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise ValueError(f"{path}: not an idx {kind} file: magic number 0x{found:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx {kind} file ({len(raw)} bytes, header alone is {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise ValueError(f"{path}: idx {kind} file of {len(raw)} bytes, but its header's shape {dims} needs "
                         f"{expected} (truncated or damaged)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# ---------------------------------------------------------------------------------------------
# Opening a split


def _class_names(root: str) -> list[str]:
    """The subfolders of `root` that hold images (empty ones are not classes)."""
    return [sub for sub in _subdirs(root) if _has_images(os.path.join(root, sub))]


def _imagefolder_samples(root: str, classes: list[str]) -> list[tuple[str, int]]:
    loose = _loose_images(root)
    if loose:
        raise ValueError(f"{root} holds images outside class folders ({loose[0]}, ...): an image folder "
                         "has one subfolder per class and every image inside one of them")
    found = _class_names(root)
    if not found:
        raise ValueError(f"no class folders with images under {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{root} has class folders that the training split lacks: {', '.join(unknown[:5])}")
    label = {name: i for i, name in enumerate(classes)}
    return [(path, label[name]) for name in found for path in iter_image_files(os.path.join(root, name))]


def _open_imagefolder(path: str, split: str, transform: Transform, channels: int) -> ImageFileDataset | None:
    train, val = _split_roots(path)
    root = train if split == "train" else val
    if root is None:
        return None
    classes = _class_names(train)  # val labels follow the train split's class list
    return ImageFileDataset(_imagefolder_samples(root, classes), transform, channels, classes,
                            f"imagefolder {root} ({split})")


def _open_flat(path: str, split: str, transform: Transform, channels: int) -> ImageFileDataset | None:
    train, val = _split_roots(path)
    root = train if split == "train" else val
    if root is None:
        return None
    files = list(iter_image_files(root))
    if not files:
        raise _no_images_error(root)
    return ImageFileDataset([(f, -1) for f in files], transform, channels, None, f"flat {root} ({split})")


def _open_cifar10(path: str, split: str, transform: Transform, channels: int) -> ArrayDataset:
    names = CIFAR10_TRAIN if split == "train" else (CIFAR10_TEST,)
    images, labels = _load_cifar([os.path.join(path, n) for n in names], "labels", 10)
    classes = _cifar_classes(os.path.join(path, "batches.meta"), "label_names", 10)
    return ArrayDataset(images, labels, transform, channels, classes, f"cifar10 {path} ({split})")


def _open_cifar100(path: str, split: str, transform: Transform, channels: int) -> ArrayDataset:
    name = "train" if split == "train" else "test"
    images, labels = _load_cifar([os.path.join(path, name)], "fine_labels", 100)
    classes = _cifar_classes(os.path.join(path, "meta"), "fine_label_names", 100)
    return ArrayDataset(images, labels, transform, channels, classes, f"cifar100 {path} ({split})")


def _open_idx(path: str, split: str, transform: Transform, channels: int) -> ArrayDataset | None:
    images_file = _idx_images_file(path, split)
    if images_file is None:
        if split == "train":
            raise FileNotFoundError(f"no train-images-idx3-ubyte[.gz] in {path} (only a test split)")
        return None
    images = _read_idx(images_file, IDX_IMAGES_MAGIC)
    labels_file = _idx_labels_file(images_file)
    labels = classes = None
    if labels_file is not None:
        labels = _read_idx(labels_file, IDX_LABELS_MAGIC).astype(np.int64)
        if len(labels) != len(images):
            raise ValueError(f"{labels_file}: {len(labels)} labels for the {len(images)} images of {images_file}")
        classes = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
    return ArrayDataset(images, labels, transform, channels, classes, f"idx {images_file} ({split})")


def _shard_index(shards: list[str], where: str) -> webdataset.ShardIndex:
    """The index of `shards`, its skipped parts logged; ValueError when no shard has a sample."""
    if not shards:
        raise ValueError(f"no {webdataset.SHARD_SUFFIX} shards in {where}")
    index = webdataset.scan_shards(shards)
    if len(index) == 0:
        detail = f": {'; '.join(index.problems[:3])}" if index.problems else " (no jpg, jpeg, png or webp members)"
        raise ValueError(f"no readable samples in the {len(shards)} shard(s) of {where}{detail}")
    if index.problems:
        log.warning("webdataset %s: %s", where, index.summary())
    return index


def _open_webdataset(path: str, split: str, transform: Transform, channels: int) -> ShardDataset | None:
    if webdataset.is_pattern(path):
        train, val = path, None
    else:
        train, val = _split_roots(path)
    root = train if split == "train" else val
    if root is None:
        return None
    index = _shard_index(webdataset.list_shards(root), root)
    classes = None
    if index.labeled:
        train_index = index if split == "train" else webdataset.scan_shards(webdataset.list_shards(train))
        top = int(train_index.label.max()) if train_index.labeled else -1
        if split == "val" and int(index.label.max()) > top:
            raise ValueError(f"{root} has class {int(index.label.max())}, which the training split ({train}) lacks "
                             f"(its classes are 0..{top})")
        classes = [str(i) for i in range(top + 1)]
    skipped = f", {index.skipped_samples} samples skipped while indexing" if index.skipped_samples else ""
    return ShardDataset(index, transform, channels, classes,
                        f"webdataset {root} ({split}, {len(index.shards)} shards{skipped})")


_OPENERS = {"imagefolder": _open_imagefolder, "flat": _open_flat, "webdataset": _open_webdataset,
            "cifar10": _open_cifar10, "cifar100": _open_cifar100, "idx": _open_idx}


def open_dataset(path: str, split: str, img_size: int, channels: int | None, augment: bool, jpeg_draft: bool = False
                 ) -> ImageFileDataset | ShardDataset | ArrayDataset | None:
    """The `split` ("train" or "val") of the dataset at `path` (format: see `detect_format`),
    as images of img_size x img_size with `channels` channels (None: 1 for idx, else 3),
    augmented (TrainTransform) or not (EvalTransform); jpeg_draft: JPEGs decoded at a reduced
    size where the output allows it (energyvit.data.transforms.decode_reduced).

    val is DIR/val for an image folder with DIR/train, test_batch / `test` for CIFAR, t10k-*
    for idx; None where the dataset has no val split (the caller then holds out part of train).
    The result has `num_images`, `classes` (None if unlabeled), `num_classes` and `source`."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if img_size < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")
    fmt, root = _locate(path)
    if channels is None:
        channels = 1 if fmt == "idx" else 3
    transform = (TrainTransform(img_size, channels, jpeg_draft=jpeg_draft) if augment
                 else EvalTransform(img_size, channels, jpeg_draft=jpeg_draft))
    return _OPENERS[fmt](root, split, transform, channels)
