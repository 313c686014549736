"""`energyvit probe`: frozen-feature evaluation of a pretrained encoder on the embedded digits or
any labeled dataset `energyvit pretrain --data_path` reads (same held-out split as pretraining),
by the linear probe and the weighted kNN of energyvit.evaluation.probes."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from energyvit.checkpoint import load_model, save_json
from energyvit.commands.args import add, add_config, add_options, build_options, device_flag, non_negative_int, positive_float, \
    positive_int
from energyvit.data.splits import DataOptions, load_splits
from energyvit.evaluation.features import POOLINGS
from energyvit.evaluation.probes import frozen_scores
from energyvit.model import EnergyViT

HELP = "linear probe and weighted kNN of frozen features"
PROG = "energyvit probe"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint-last.pth of `energyvit pretrain` or an `export` file")
    add_config(p)
    add(p, "--pool", choices=POOLINGS, default="tokens",
        help="features: all patch tokens concatenated, their mean, or the class token")
    add_options(p, DataOptions, only=("data_path", "eval_images", "num_workers", "jpeg_draft", "max_image_pixels"))
    add(p, "--knn_k", type=positive_int, default=200, help="neighbours of the kNN vote (at most the training images)")
    add(p, "--knn_t", type=positive_float, default=0.1, help="temperature of the kNN vote weights")
    add(p, "--random_init", action="store_true",
        help="baseline: the checkpoint's architecture at random init (seeded), not its weights")
    add(p, "--seed", type=int, default=0, help="seed of the --random_init weights")
    add(p, "--probe_images", type=positive_int, default=10000, help="training images the classifiers fit on")
    add(p, "--output", default=None, help="JSON file (default: probe-POOL.json beside the checkpoint)")
    add(p, "--device", type=device_flag, default="cpu", help="cpu, cuda or cuda:N")
    add(p, "--num_threads", type=non_negative_int, default=0, help="torch CPU threads (0: torch's default)")


def run(args: argparse.Namespace) -> dict:
    data_options = build_options(DataOptions, args, PROG)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model, _ = load_model(args.checkpoint, need_energy=False)
    if args.random_init:
        torch.manual_seed(args.seed)
        model = EnergyViT(model.cfg).eval()
    model.to(args.device)
    data = load_splits(data_options, model.cfg.img_size, model.cfg.in_chans, gray_to_rgb=True)
    if not data.labeled:
        raise ValueError(f"{args.data_path} has no labels: the probe needs a labeled dataset")
    result = {"checkpoint": str(args.checkpoint), "random_init": args.random_init, "data": args.data_path or "digits",
              **frozen_scores(model, args.pool, args.knn_k, args.knn_t, data.train_plain, data.held_out,
                              args.probe_images, data.num_workers)}
    name = f"probe-{args.pool}{'-random-init' if args.random_init else ''}.json"
    output = Path(args.output) if args.output else Path(args.checkpoint).with_name(name)
    save_json(output, result)
    print(f"probe: {args.pool} features ({result['feature_dim']}-d) of {result['n_train']} train / "
          f"{result['n_held_out']} held-out images{' (random init)' if args.random_init else ''}")
    print(f"  linear probe          top-1 {result['linear_probe_acc']:.4f}")
    print(f"  kNN (k={result['knn_k']}, t={args.knn_t:g})  top-1 {result['knn_top1']:.4f}  top-5 {result['knn_top5']:.4f}")
    print(f"wrote {output}")
    return result
