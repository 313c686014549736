"""Sets of images to score one by one (`energyvit score`): files and folders given by path, the
embedded held-out digits, or the held-out images of any dataset `--data_path` reads.

Each image is decoded on its own and keeps its name: an unreadable file is skipped and counted,
never replaced by its neighbour as the training datasets do (a score belongs to its file).
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from energyvit.data.digits import load_digits_as
from energyvit.data.files import DECODE_ERRORS, DecodingDataset, iter_image_files, read_image
from energyvit.data.pixels import to_float_pixels
from energyvit.data.splits import KeyedSubset, dataset_targets
from energyvit.data.transforms import EvalTransform

DIGITS = "digits"  # the name that stands for the embedded held-out digits


class ScoreSet(Dataset):
    """Named images: item i is (image (C, H, W) or None when unreadable, i)."""

    def __init__(self, names: list[str], load: Callable[[int], Tensor], labels: list[int] | None = None) -> None:
        self.names, self._load = names, load
        self.labels = labels if labels is not None else [-1] * len(names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[Tensor | None, int]:
        try:
            return self._load(i), i
        except DECODE_ERRORS:
            return None, i

    def subset(self, keep: list[int]) -> ScoreSet:
        """The images `keep` (indices into this set), in that order."""
        return ScoreSet([self.names[i] for i in keep], lambda j: self._load(keep[j]), [self.labels[i] for i in keep])


def files_set(paths: list[str], size: int, channels: int) -> ScoreSet:
    """Image files, and every image file below each folder (recursively, sorted); ValueError for a
    path that does not exist or a folder without images."""
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = list(iter_image_files(path))
            if not found:
                raise ValueError(f"no image files under {path}")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    transform = EvalTransform(size, channels)
    return ScoreSet(files, lambda i: transform(read_image(files[i])))


def digits_set(size: int, channels: int, split: str = "held_out") -> ScoreSet:
    """The embedded digits' held-out images, or their training images (split "train")."""
    images = load_digits_as(size, channels)[split == "held_out"]
    return ScoreSet([f"{DIGITS}/{split}/{i}" for i in range(len(images.labels))], lambda i: images.images[i],
                    images.labels.tolist())


def dataset_set(dataset: Dataset, name: str) -> ScoreSet:
    """The images of a dataset of energyvit.data (a split, or a KeyedSubset of one), named by file
    path (or shard and member) where they are files (or shard members), else `name[index]`."""
    base, indices = (dataset.dataset, dataset.indices) if isinstance(dataset, KeyedSubset) else \
        (dataset, list(range(len(dataset))))
    labels = dataset_targets(dataset).tolist()
    if isinstance(base, DecodingDataset):  # files or shard members: each decoded itself, never a neighbour
        return ScoreSet([base.where(j) for j in indices], lambda i: base.decode(indices[i]), labels)
    return ScoreSet([f"{name}[{j}]" for j in indices], lambda i: base[indices[i]][0], labels)


def named_set(spec: str, size: int, channels: int, split: str = "held_out") -> ScoreSet:
    """`digits` (their `split`), or an image file or folder."""
    return digits_set(size, channels, split) if spec == DIGITS else files_set([spec], size, channels)


def _readable(batch: list[tuple[Tensor | None, int]]) -> tuple[Tensor | None, list[int], int]:
    kept = [(x, i) for x, i in batch if x is not None]
    images = torch.stack([x for x, _ in kept]) if kept else None
    return images, [i for _, i in kept], len(batch) - len(kept)


def batches(images: ScoreSet, batch_size: int, num_workers: int, device: torch.device):
    """(float pixels on `device`, indices into the set, unreadable images skipped) per batch; a
    batch whose images were all unreadable yields only its count, with images None."""
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=_readable)
    for x, indices, skipped in loader:
        yield (to_float_pixels(x, device) if x is not None else None), indices, skipped
