"""`energyvit probe`: frozen-feature evaluation of a pretrained encoder on the embedded digits or
any labeled dataset `energyvit pretrain --data_path` reads (same held-out split as pretraining).

Two classifiers of the held-out split from the training split's features:
- the linear probe of energyvit.probe (logistic regression, L2 strength picked on a validation
  fifth of the training split);
- a weighted k-nearest-neighbour vote (the protocol of instance-discrimination papers): features
  are L2-normalized, each of the k most cosine-similar training images votes for its label with
  weight exp(similarity / t). k=200, t=0.1 by default (the instance-discrimination protocol);
  k is capped at the number of training images.
"""
from __future__ import annotations

import argparse
from argparse import Namespace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from energyvit.checkpoint import load_model, save_json
from energyvit.data import ImageSplit, SplitDataset, load_digits
from energyvit.model import EnergyViT
from energyvit.pretrain_data import features, load_pretrain_data
from energyvit.probe import POOLING, linear_probe


def knn_scores(train_x: Tensor, train_y: Tensor, test_x: Tensor, k: int, t: float, chunk: int = 1024) -> Tensor:
    """Class scores (n_test, num_classes) of the temperature-weighted kNN vote on cosine similarity."""
    if not 1 <= k <= len(train_y):
        raise ValueError(f"knn_k must be in 1..{len(train_y)} (the training images), got {k}")
    if t <= 0:
        raise ValueError(f"knn_t must be > 0, got {t}")
    train_x, test_x = F.normalize(train_x.float(), dim=1), F.normalize(test_x.float(), dim=1)
    num_classes = int(train_y.max()) + 1
    out = []
    for i in range(0, len(test_x), chunk):  # chunks bound the (chunk, n_train) similarity matrix
        sim, idx = (test_x[i : i + chunk] @ train_x.T).topk(k, dim=1)
        votes = F.one_hot(train_y[idx], num_classes).float() * (sim / t).exp().unsqueeze(-1)
        out.append(votes.sum(dim=1))
    return torch.cat(out)


def topk_accuracy(scores: Tensor, labels: Tensor, k: int) -> float:
    k = min(k, scores.shape[1])
    return scores.topk(k, dim=1).indices.eq(labels[:, None]).any(dim=1).float().mean().item()


def digits_for(model: EnergyViT) -> tuple[ImageSplit, ImageSplit]:
    """The embedded digits at the model's size; gray repeated to RGB for a 3-channel model."""
    chans = model.cfg.in_chans
    if chans not in (1, 3):
        raise ValueError(f"the digits are grayscale; a {chans}-channel model cannot take them (1 or 3 channels)")
    train, held_out = load_digits(model.cfg.img_size)
    if chans == 3:
        train, held_out = (ImageSplit(s.images.expand(-1, 3, -1, -1).contiguous(), s.labels) for s in (train, held_out))
    return train, held_out


def probe_splits(model: EnergyViT, args: Namespace) -> tuple[Dataset, ImageSplit, int]:
    """(training images as a dataset, held-out images in memory, DataLoader workers)."""
    if not args.data_path:
        train, held_out = digits_for(model)
        return SplitDataset(train), held_out, 0
    data = load_pretrain_data(Namespace(data_path=args.data_path, shift=0, num_workers=args.num_workers,
                                        eval_images=args.eval_images), model.cfg.img_size, model.cfg.in_chans)
    if not data.labeled:
        raise ValueError(f"{args.data_path} has no labels: the probe needs a labeled dataset")
    return data.train_plain, data.held_out, data.num_workers


def evaluate(model: EnergyViT, pool: str, knn_k: int, knn_t: float, train: Dataset, held_out: ImageSplit,
             probe_images: int = 10000, num_workers: int = 0) -> dict:
    feats, _, train_y = features([model], train, probe_images, (pool,), num_workers)
    test_feats, _, test_y = features([model], SplitDataset(held_out), len(held_out.labels), (pool,), 0)
    train_x, test_x = feats[(0, pool)], test_feats[(0, pool)]
    knn_k = min(knn_k, len(train_y))
    scores = knn_scores(train_x, train_y, test_x, knn_k, knn_t)
    return {
        "pool": pool, "feature_dim": train_x.shape[1], "n_train": len(train_y), "n_held_out": len(test_y),
        "linear_probe_acc": linear_probe(train_x, train_y, test_x, test_y),
        "knn_top1": topk_accuracy(scores, test_y, 1), "knn_top5": topk_accuracy(scores, test_y, 5),
        "knn_k": knn_k, "knn_t": knn_t,
    }


def add_args(p: argparse.ArgumentParser) -> None:
    from energyvit.cli import add, device, positive_int  # here: cli imports this module

    p.add_argument("checkpoint", help="checkpoint-last.pth of `energyvit pretrain` or an `export` file")
    add(p, "--pool", choices=POOLING, default="tokens",
        help="features: all patch tokens concatenated, their mean, or the class token")
    add(p, "--data_path", default=None,
        help="labeled data in any format `pretrain --data_path` reads (default: the embedded digits)")
    add(p, "--knn_k", type=positive_int, default=200, help="neighbours of the kNN vote (at most the training images)")
    add(p, "--knn_t", type=float, default=0.1, help="temperature of the kNN vote weights")
    add(p, "--random_init", action="store_true",
        help="baseline: the checkpoint's architecture at random init (seeded), not its weights")
    add(p, "--seed", type=int, default=0, help="seed of the --random_init weights")
    add(p, "--probe_images", type=positive_int, default=10000, help="training images the classifiers fit on")
    add(p, "--eval_images", type=positive_int, default=512, help="held-out images (with --data_path)")
    add(p, "--num_workers", type=int, default=None, help="DataLoader workers (with --data_path)")
    add(p, "--output", default=None, help="JSON file (default: probe-POOL.json beside the checkpoint)")
    add(p, "--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    add(p, "--num_threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def run(args: Namespace) -> dict:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model, _ = load_model(args.checkpoint, need_energy=False)
    if args.random_init:
        torch.manual_seed(args.seed)
        model = EnergyViT(model.cfg).eval()
    model.to(args.device)
    train, held_out, workers = probe_splits(model, args)
    result = {"checkpoint": str(args.checkpoint), "random_init": args.random_init, "data": args.data_path or "digits",
              **evaluate(model, args.pool, args.knn_k, args.knn_t, train, held_out, args.probe_images, workers)}
    name = f"probe-{args.pool}{'-random-init' if args.random_init else ''}.json"
    output = Path(args.output) if args.output else Path(args.checkpoint).with_name(name)
    save_json(output, result)
    print(f"probe: {args.pool} features ({result['feature_dim']}-d) of {result['n_train']} train / "
          f"{result['n_held_out']} held-out images{' (random init)' if args.random_init else ''}")
    print(f"  linear probe          top-1 {result['linear_probe_acc']:.4f}")
    print(f"  kNN (k={result['knn_k']}, t={args.knn_t:g})  top-1 {result['knn_top1']:.4f}  top-5 {result['knn_top5']:.4f}")
    print(f"wrote {output}")
    return result
