"""What the pretraining job reads: the training set (augmented, keyed for exact resume), the same
images unaugmented for probe features, a held-out set in memory, and the probe evaluation.

Without --data_path it is the embedded digits (1500 train / 297 held out). With it, any format of
energyvit.datasets; the held-out images are the dataset's validation split when it has one,
otherwise a fixed part of the training images, removed from training.
"""
from __future__ import annotations

import os
from argparse import Namespace
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from energyvit.data import ImageSplit, SplitDataset, channel_stats, load_digits
from energyvit.model import EnergyViT
from energyvit.probe import POOLING, linear_probe, pool_tokens

HOLD_OUT_SEED = 0  # the held-out part never changes with --seed, so runs compare on the same images
RAW_PIXEL_SIZE = 32  # raw-pixel probe baseline: images area-averaged down to at most this size


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


@dataclass
class PretrainData:
    train: Dataset  # augmented; keys (index, seed); items (image, label, skipped files)
    train_plain: Dataset  # the same images without augmentation, for probe features
    held_out: ImageSplit  # in memory; labels are -1 when the data has none
    in_chans: int
    labeled: bool
    description: str
    num_workers: int
    default_probe_pool: str  # all patch tokens for the small digits, their mean for real images

    @property
    def num_train(self) -> int:
        return len(self.train)

    def pixel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std for a new model's input normalization: over all training digits,
        or over up to 1000 unaugmented training images (decoded here, so only when needed)."""
        if isinstance(self.train_plain, SplitDataset):
            return channel_stats(self.train_plain.split.images)
        from energyvit.datasets import estimate_channel_stats

        return estimate_channel_stats(self.train_plain)


def load_pretrain_data(args: Namespace, img_size: int, channels: int | None) -> PretrainData:
    """The data of `energyvit pretrain`; channels None takes the data's own (1 for the digits and
    idx files, 3 otherwise)."""
    if not args.data_path:
        train, held_out = load_digits(img_size)
        if channels not in (None, 1):
            raise ValueError(f"the embedded digits are grayscale; a {channels}-channel model cannot take them")
        return PretrainData(SplitDataset(train, args.shift), SplitDataset(train), held_out, 1, True,
                            f"embedded digits: {len(train.labels)} train / {len(held_out.labels)} held-out images",
                            args.num_workers or 0, "tokens")

    from energyvit.datasets import open_dataset

    train = open_dataset(args.data_path, "train", img_size, channels, augment=True)
    plain = train.unaugmented()
    val = open_dataset(args.data_path, "val", img_size, channels, augment=False)
    n = len(train)
    if val is None:  # hold out a fixed part of the training images
        order = torch.randperm(n, generator=torch.Generator().manual_seed(HOLD_OUT_SEED)).tolist()
        n_hold = min(args.eval_images, max(1, n // 10))
        if n - n_hold < 1:
            raise ValueError(f"{args.data_path} has {n} image(s): too few to hold any out for evaluation")
        val, rest = KeyedSubset(plain, order[:n_hold]), sorted(order[n_hold:])
        train, plain = KeyedSubset(train, rest), KeyedSubset(plain, rest)
        held_note = f"{n_hold} held out of the training images"
    else:
        held_note = f"{min(len(val), args.eval_images)} of {len(val)} validation images held out"
    held_out = load_images(val, args.eval_images)
    in_chans = held_out.images.shape[1]
    labeled = bool((held_out.labels >= 0).all())
    num_workers = args.num_workers if args.num_workers is not None else min(8, os.cpu_count() or 1)
    return PretrainData(train, plain, held_out, in_chans, labeled,
                        f"{open_dataset_source(args.data_path, train)}: {len(train)} train images, {held_note}",
                        num_workers, "mean")


def open_dataset_source(path: str, dataset: Dataset) -> str:
    base = dataset.dataset if isinstance(dataset, KeyedSubset) else dataset
    return getattr(base, "source", path)


def load_images(dataset: Dataset, limit: int, batch_size: int = 256) -> ImageSplit:
    """Up to `limit` images of `dataset` in memory: a fixed random subset (HOLD_OUT_SEED), so a
    class-sorted folder still gives every class."""
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(HOLD_OUT_SEED))[: min(n, limit)].tolist()
    loader = DataLoader(KeyedSubset(dataset, order), batch_size=batch_size)
    images, labels = zip(*((x, y) for x, y, _ in loader))
    return ImageSplit(torch.cat(images), torch.cat(labels).long())


@torch.no_grad()
def features(models: list[EnergyViT], dataset: Dataset, limit: int, pools: tuple[str, ...], num_workers: int,
             batch_size: int = 256) -> tuple[dict[tuple[int, str], Tensor], Tensor, Tensor]:
    """Frozen features {(model index, pooling): (n, features)} of the first `limit` images of
    `dataset`, their raw pixels (area-averaged to at most RAW_PIXEL_SIZE) and labels, streamed."""
    subset = KeyedSubset(dataset, list(range(min(limit, len(dataset)))))
    loader = DataLoader(subset, batch_size=batch_size, num_workers=num_workers)
    device = models[0].pixel_mean.device
    feats: dict[tuple[int, str], list[Tensor]] = {(i, p): [] for i in range(len(models)) for p in pools}
    pixels, labels = [], []
    for x, y, _ in loader:
        for i, m in enumerate(models):
            h = m.forward_features(x.to(device))
            for p in pools:
                feats[(i, p)].append(pool_tokens(h, p).float().cpu())
        pixels.append(raw_pixels(x))
        labels.append(y)
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(pixels), torch.cat(labels).long()


def raw_pixels(x: Tensor) -> Tensor:
    if x.shape[-1] > RAW_PIXEL_SIZE or x.shape[-2] > RAW_PIXEL_SIZE:
        x = F.interpolate(x, size=(min(x.shape[-2], RAW_PIXEL_SIZE), min(x.shape[-1], RAW_PIXEL_SIZE)), mode="area")
    return x.flatten(1)


def probe_accuracies(model: EnergyViT, data: PretrainData, pool: str, seed: int, probe_images: int = 10000) -> dict:
    """Linear-probe accuracy on the held-out images of the model's frozen features, of the same
    architecture at random init (seeded), and of the raw pixels, each fit on (up to probe_images)
    unaugmented training images. `pool` gives the headline numbers; on the embedded digits
    `probe_by_pool` also holds every pooling."""
    if not data.labeled:
        return {"probe_acc": None, "probe_acc_random_init": None, "probe_acc_raw_pixels": None,
                "probe_pool": pool, "probe_note": "the data has no labels"}
    pools = POOLING if data.default_probe_pool == "tokens" else (pool,)  # every pooling is cheap at digit size
    torch.manual_seed(seed)
    random_model = EnergyViT(model.cfg).to(model.pixel_mean.device).eval()
    was_training = model.training
    model.eval()
    models = [model, random_model]
    train_f, train_px, train_y = features(models, data.train_plain, probe_images, pools, data.num_workers)
    held = SplitDataset(data.held_out)
    test_f, test_px, test_y = features(models, held, len(held), pools, 0)
    model.train(was_training)
    by_pool = {p: {key: linear_probe(train_f[(i, p)], train_y, test_f[(i, p)], test_y)
                   for i, key in enumerate(("pretrained", "random_init"))} for p in pools}
    return {"probe_acc": by_pool[pool]["pretrained"], "probe_acc_random_init": by_pool[pool]["random_init"],
            "probe_acc_raw_pixels": linear_probe(train_px, train_y, test_px, test_y), "probe_pool": pool,
            "probe_by_pool": by_pool, "probe_train_images": len(train_y), "probe_held_out_images": len(test_y)}
