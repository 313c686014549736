"""`energyvit probe`: frozen-feature evaluation of a pretrained encoder on the embedded digits.

Two classifiers of the held-out split from the training split's features:
- the linear probe of energyvit.probe (logistic regression, L2 strength picked on a validation
  fifth of the training split);
- a weighted k-nearest-neighbour vote (the protocol of instance-discrimination papers): features
  are L2-normalized, each of the k most cosine-similar training images votes for its label with
  weight exp(similarity / t).
"""
from __future__ import annotations

import argparse
from argparse import Namespace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from energyvit.checkpoint import load_model, save_json
from energyvit.data import ImageSplit, load_digits
from energyvit.model import EnergyViT
from energyvit.probe import POOLING, extract_features, linear_probe


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


def evaluate(model: EnergyViT, pool: str, knn_k: int, knn_t: float) -> dict:
    train, held_out = digits_for(model)
    train_x, test_x = extract_features(model, train.images, pool), extract_features(model, held_out.images, pool)
    scores = knn_scores(train_x, train.labels, test_x, knn_k, knn_t)
    return {
        "pool": pool, "feature_dim": train_x.shape[1], "n_train": len(train.labels), "n_held_out": len(held_out.labels),
        "linear_probe_acc": linear_probe(train_x, train.labels, test_x, held_out.labels),
        "knn_top1": topk_accuracy(scores, held_out.labels, 1), "knn_top5": topk_accuracy(scores, held_out.labels, 5),
        "knn_k": knn_k, "knn_t": knn_t,
    }


def add_args(p: argparse.ArgumentParser) -> None:
    from energyvit.cli import add, device, positive_int  # here: cli imports this module

    p.add_argument("checkpoint", help="checkpoint-last.pth of `energyvit pretrain` or an `export` file")
    add(p, "--pool", choices=POOLING, default="tokens",
        help="features: all patch tokens concatenated, their mean, or the class token")
    # 20, not ImageNet's 200: the digits have about 150 training images per class
    add(p, "--knn_k", type=positive_int, default=20, help="neighbours of the kNN vote")
    add(p, "--knn_t", type=float, default=0.1, help="temperature of the kNN vote weights")
    add(p, "--output", default=None, help="JSON file (default: probe-POOL.json beside the checkpoint)")
    add(p, "--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    add(p, "--num_threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def run(args: Namespace) -> dict:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model, _ = load_model(args.checkpoint, need_energy=False)
    result = {"checkpoint": str(args.checkpoint), **evaluate(model.to(args.device), args.pool, args.knn_k, args.knn_t)}
    output = Path(args.output) if args.output else Path(args.checkpoint).with_name(f"probe-{args.pool}.json")
    save_json(output, result)
    print(f"probe: {args.pool} features ({result['feature_dim']}-d) of {result['n_train']} train / "
          f"{result['n_held_out']} held-out digits")
    print(f"  linear probe          top-1 {result['linear_probe_acc']:.4f}")
    print(f"  kNN (k={args.knn_k}, t={args.knn_t:g})  top-1 {result['knn_top1']:.4f}  top-5 {result['knn_top5']:.4f}")
    print(f"wrote {output}")
    return result
