"""A dataset opened for a run: the training set (augmented, keyed for exact resume), the same
images unaugmented (for probe features), and a held-out set in memory.

Without a data path it is the embedded digits (1500 train / 297 held out). With one, any format
of energyvit.data.files; the held-out images are the dataset's validation split when it has one,
otherwise a fixed part of the training images, removed from training. Pretraining, the probe and
fine-tuning all open their data here, so they see the same split.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from energyvit.data.digits import load_digits_as
from energyvit.data.files import open_dataset
from energyvit.data.in_memory import ImageSplit, SplitDataset, channel_stats
from energyvit.data.loader import default_num_workers
from energyvit.data.pixels import to_float_pixels
from energyvit.data.transforms import estimate_channel_stats
from energyvit.options import check_fields, non_negative, option, positive

HOLD_OUT_SEED = 0  # the held-out part never changes with --seed, so runs compare on the same images


@dataclass(frozen=True)
class DataOptions:
    """Which images a run reads and how many it holds out."""

    data_path: str | None = option(None, "image data: ImageFolder tree (with train/ and val/, or class folders), flat "
                                   "folder, WebDataset .tar shards (a folder, with train/ and val/ or not, or a "
                                   "brace pattern such as 'DIR/shard-{000..146}.tar'), CIFAR-10/100 python batches "
                                   "or MNIST-style idx files (default: the embedded digits)", parse=str, metavar="DIR")
    shift: int = option(0, "digits augmentation: random translation by up to this many pixels", rule=non_negative)
    num_workers: int | None = option(None, "DataLoader worker processes per process (default: 0 for the embedded "
                                     "digits, else min(8, usable CPUs // LOCAL_WORLD_SIZE), at least 1: the CPUs "
                                     "of this process's affinity shared among torchrun's processes on the machine)",
                                     parse=int, rule=non_negative, resumable=True)
    jpeg_draft: bool = option(True, "decode a JPEG at 1/2, 1/4 or 1/8 size (libjpeg's DCT scaling) when its crop "
                              "or resize still gets at least the input size from that: the same crops; 1.5x (train) "
                              "and 1.7x (eval) the images per core on 1200x900 files at 224 px, no change where no "
                              "reduction fits (500x375 files at 224 px); pixels 1.4 to 1.7 levels of 255 from a "
                              "full decode on average (docs/benchmarks.md)")
    eval_images: int = option(512, "held-out images: at most this many are taken out of the training images when "
                              "the data has no validation split, and held in memory (restoration metrics); the "
                              "probes and fine-tuning score every held-out image", rule=positive)
    one_class: str | None = option(None, "keep only this class (its folder name or index) of a labeled dataset, in "
                                   "training and held-out images: the one-class anomaly protocol of `energyvit score`",
                                   parse=str, metavar="CLASS")
    max_image_pixels: int = option(Image.MAX_IMAGE_PIXELS, "image files with more pixels are skipped (Pillow's guard "
                                   "against decompression bombs)", rule=positive, resumable=True)

    def __post_init__(self) -> None:
        check_fields(self)


class KeyedSubset(Dataset):
    """A subset whose keys may be (index, seed) pairs, as the training sampler yields them."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self.dataset[(self.indices[key[0]], key[1])]
        return self.dataset[self.indices[key]]

    @property
    def targets(self) -> np.ndarray:
        return dataset_targets(self.dataset)[self.indices]


def dataset_targets(dataset: Dataset) -> np.ndarray:
    """Every image's label (-1 when unlabeled) without decoding any: the datasets of this package."""
    if isinstance(dataset, SplitDataset):
        return dataset.split.labels.numpy()
    return dataset.targets


@dataclass
class DataSplits:
    train: Dataset  # augmented; keys (index, seed); items (image, label, skipped files)
    train_plain: Dataset  # the same images without augmentation, for probe features
    held_out: ImageSplit  # up to --eval_images of held_out_all in memory (restoration metrics, pictures)
    held_out_all: Dataset  # every held-out image, unaugmented, streamed; items as train's; labels -1 if none
    in_chans: int
    labeled: bool
    num_classes: int  # 0 when unlabeled
    description: str
    num_workers: int
    default_probe_pool: str  # all patch tokens for the small digits, their mean for real images
    classes: list[str]  # class names by label; empty when unlabeled

    @property
    def num_train(self) -> int:
        return len(self.train)

    def pixel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std for a new model's input normalization: over all training digits,
        or over a fixed random sample of up to 1000 unaugmented images from the whole training set
        (decoded here, so only when needed)."""
        if isinstance(self.train_plain, SplitDataset):
            return channel_stats(self.train_plain.split.images)
        return estimate_channel_stats(self.train_plain)


def load_splits(options: DataOptions, img_size: int, channels: int | None, gray_to_rgb: bool = False) -> DataSplits:
    """The data of `options` at img_size; channels None takes the data's own (1 for the digits and
    idx files, 3 otherwise). gray_to_rgb: a 3-channel model may read the gray digits (repeated to
    RGB), as the evaluation tools allow; pretraining refuses that mismatch."""
    if not options.data_path:
        if channels not in (None, 1) and not gray_to_rgb:
            raise ValueError(f"the embedded digits are grayscale; a {channels}-channel model cannot take them")
        train, held_out = load_digits_as(img_size, channels or 1)
        data = DataSplits(SplitDataset(train, options.shift), SplitDataset(train), held_out, SplitDataset(held_out),
                          train.images.shape[1],
                          True, int(train.labels.max()) + 1, f"embedded digits: {len(train.labels)} train / {len(held_out.labels)} held-out images",
                          options.num_workers or 0, "tokens", [str(c) for c in range(int(train.labels.max()) + 1)])
        return keep_class(data, options.one_class) if options.one_class is not None else data

    Image.MAX_IMAGE_PIXELS = options.max_image_pixels  # Pillow's own global; DataLoader workers inherit it
    train = open_dataset(options.data_path, "train", img_size, channels, augment=True, jpeg_draft=options.jpeg_draft)
    plain = train.unaugmented()
    num_classes = train.num_classes
    val = open_dataset(options.data_path, "val", img_size, channels, augment=False, jpeg_draft=options.jpeg_draft)
    n = len(train)
    if val is None:  # hold out a fixed part of the training images
        order = torch.randperm(n, generator=torch.Generator().manual_seed(HOLD_OUT_SEED)).tolist()
        n_hold = min(options.eval_images, max(1, n // 10))
        if n - n_hold < 1:
            raise ValueError(f"{options.data_path} has {n} image(s): too few to hold any out for evaluation")
        val, rest = KeyedSubset(plain, order[:n_hold]), sorted(order[n_hold:])
        train, plain = KeyedSubset(train, rest), KeyedSubset(plain, rest)
        held_note = f"{n_hold} held out of the training images"
    else:
        held_note = f"{min(len(val), options.eval_images)} of {len(val)} validation images held out"
    held_out = load_images(val, options.eval_images)
    in_chans = held_out.images.shape[1]
    labeled = bool((held_out.labels >= 0).all())
    num_workers = options.num_workers if options.num_workers is not None else default_num_workers()
    classes = list(open_dataset_base(train).classes or []) if labeled else []
    data = DataSplits(train, plain, held_out, val, in_chans, labeled, num_classes if labeled else 0,
                      f"{open_dataset_source(options.data_path, train)}: {len(train)} train images, {held_note}",
                      num_workers, "mean", classes)
    return keep_class(data, options.one_class) if options.one_class is not None else data


def class_label(data: DataSplits, name: str) -> int:
    """The label of class `name` (a class name, or its index) of labeled data; ValueError otherwise."""
    if not data.labeled:
        raise ValueError(f"{data.description} has no labels: a class cannot be chosen")
    if name in data.classes:
        return data.classes.index(name)
    if name.isdigit() and int(name) < len(data.classes):
        return int(name)
    shown = ", ".join(data.classes[:20]) + (", ..." if len(data.classes) > 20 else "")
    raise ValueError(f"no class {name!r} in {data.description} (classes: {shown}; or an index 0..{len(data.classes) - 1})")


def keep_class(data: DataSplits, name: str) -> DataSplits:
    """`data` with only the training and held-out images of class `name` (the one-class protocol)."""
    label = class_label(data, name)

    def only(dataset: Dataset) -> KeyedSubset:
        return KeyedSubset(dataset, np.flatnonzero(dataset_targets(dataset) == label).tolist())

    train, plain, held_all = only(data.train), only(data.train_plain), only(data.held_out_all)
    keep = data.held_out.labels == label
    if len(train) == 0 or len(held_all) == 0:
        raise ValueError(f"class {data.classes[label]!r} of {data.description} has {len(train)} training and "
                         f"{len(held_all)} held-out images; the one-class protocol needs both")
    return replace(data, train=train, train_plain=plain, held_out=ImageSplit(data.held_out.images[keep],
                   data.held_out.labels[keep]), held_out_all=held_all,
                   description=f"{data.description}, class {data.classes[label]!r} only ({len(train)} train images)")


def open_dataset_base(dataset: Dataset) -> Dataset:
    return dataset.dataset if isinstance(dataset, KeyedSubset) else dataset


def open_dataset_source(path: str, dataset: Dataset) -> str:
    return getattr(open_dataset_base(dataset), "source", path)


def load_images(dataset: Dataset, limit: int, batch_size: int = 256) -> ImageSplit:
    """Up to `limit` images of `dataset` in memory as float [0, 1] (the restoration metrics and
    pictures read them): a fixed random subset (HOLD_OUT_SEED), so a class-sorted folder still
    gives every class."""
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(HOLD_OUT_SEED))[: min(n, limit)].tolist()
    loader = DataLoader(KeyedSubset(dataset, order), batch_size=batch_size)
    images, labels = zip(*((to_float_pixels(x, "cpu"), y) for x, y, _ in loader))
    return ImageSplit(torch.cat(images), torch.cat(labels).long())
