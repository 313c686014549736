"""`energyvit probe`: frozen-feature evaluation of a pretrained encoder on the embedded digits or
any labeled dataset `energyvit pretrain --data_path` reads (same held-out split as pretraining):
a linear probe (`--protocol lbfgs`, the fast one of energyvit.evaluation.probes, or `--protocol
mae`, MAE's of energyvit.evaluation.mae_probe) and the weighted kNN over every training image
(energyvit.evaluation.knn), each scored on every held-out image. Runs under torchrun too (every
rank computes its share; only rank 0 prints and writes)."""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import torch

from energyvit.checkpoint import load_model, save_json
from energyvit.commands.args import CliError, add, add_config, add_options, build_options, device_flag, \
    non_negative_int, positive_float, positive_int
from energyvit.data.splits import DataOptions, load_splits
from energyvit.distributed import DistInfo, init_distributed, shutdown
from energyvit.evaluation.features import POOLINGS
from energyvit.evaluation.mae_probe import MAEProbeOptions, train_mae_probe
from energyvit.evaluation.probes import frozen_scores
from energyvit.model import EnergyViT

HELP = "linear probe and weighted kNN of frozen features"
PROG = "energyvit probe"
PROTOCOLS = ("lbfgs", "mae")
PROBE_IMAGES = 10000
SHIFT = 1  # the digits' augmentation for --protocol mae (what random resized crop and flip are for image files)
# flags that only --protocol mae reads (the feature passes of both read --batch_size, --precision and --seed)
MAE_ONLY = ("epochs", "warmup_epochs", "blr", "lr", "optimizer", "momentum", "weight_decay", "shift")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint-last.pth of `energyvit pretrain` or an `export` file")
    add_config(p)
    add(p, "--protocol", choices=PROTOCOLS, default="lbfgs",
        help="linear probe: lbfgs: logistic regression fit by L-BFGS on the features of up to --probe_images "
             "training images, held in memory (fast; for small data); mae: MAE's (BatchNorm and linear head "
             "trained by SGD or LARS for --epochs over every augmented training image, on the device, DDP under "
             "torchrun)")
    add(p, "--pool", choices=POOLINGS, default=None,
        help="features: all patch tokens concatenated, their mean, or the class token (default: tokens on the "
             "digits, mean otherwise; MAE's ViT-B linear probe: cls)")
    add_options(p, DataOptions, only=("data_path", "eval_images", "shift", "num_workers", "jpeg_draft",
                                      "max_image_pixels"),
                defaults={"shift": SHIFT},
                helps={"eval_images": "held-out images when the data has no validation split (at most; as given to "
                                      "pretrain, for the same split); every held-out image is scored",
                       "shift": "digits augmentation of --protocol mae: random translation by up to this many pixels"})
    add(p, "--knn_k", type=positive_int, default=200, help="neighbours of the kNN vote (at most the training images)")
    add(p, "--knn_t", type=positive_float, default=0.1, help="temperature of the kNN vote weights")
    add(p, "--random_init", action="store_true",
        help="baseline: the checkpoint's architecture at random init (seeded), not its weights")
    add(p, "--probe_images", type=positive_int, default=PROBE_IMAGES,
        help="training images the L-BFGS probe fits on (--protocol lbfgs; their features are held in memory)")
    add_options(p, MAEProbeOptions, helps={
        "seed": "seed of the --random_init weights, and of --protocol mae's data order, augmentation and head init"})
    add(p, "--output", default=None, help="JSON file (default: probe-POOL.json, or probe-mae-POOL.json, beside the "
                                         "checkpoint); --protocol mae also writes its head and optimizer after every "
                                         "epoch to the same name ending in .pth")
    add(p, "--resume", default="", metavar="STATE",
        help="the .pth state of a stopped --protocol mae run to continue (the same flags and checkpoint)")
    add(p, "--device", type=device_flag, default=None,
        help="cpu, cuda or cuda:N (default: cuda if available, else cpu; under torchrun cuda:LOCAL_RANK)")
    add(p, "--num_threads", type=non_negative_int, default=0, help="torch CPU threads (0: torch's default)")


def check_protocol_flags(args: argparse.Namespace, options: MAEProbeOptions, data_options: DataOptions) -> None:
    """A flag the chosen protocol does not read, set to other than its default, is an error."""
    defaults = {f.name: f.default for f in fields(MAEProbeOptions)} | {"shift": SHIFT}
    given = {**{f.name: getattr(options, f.name) for f in fields(MAEProbeOptions)}, "shift": data_options.shift}
    if args.protocol == "lbfgs":
        for name in MAE_ONLY:
            if given[name] != defaults[name]:
                raise CliError(f"{PROG}: error: argument --{name}: applies to --protocol mae only")
        if args.resume:
            raise CliError(f"{PROG}: error: argument --resume: applies to --protocol mae only")
    elif args.probe_images != PROBE_IMAGES:
        raise CliError(f"{PROG}: error: argument --probe_images: applies to --protocol lbfgs only (mae trains on "
                       "every training image)")


def run(args: argparse.Namespace) -> dict:
    options, data_options = build_options(MAEProbeOptions, args, PROG), build_options(DataOptions, args, PROG)
    check_protocol_flags(args, options, data_options)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    dist_info, device = init_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        return _run(args, options, data_options, dist_info, device)
    finally:
        shutdown(dist_info)


def _run(args: argparse.Namespace, options: MAEProbeOptions, data_options: DataOptions, dist_info: DistInfo,
         device: torch.device) -> dict:
    say = print if dist_info.is_main else (lambda *a, **k: None)
    model, _ = load_model(args.checkpoint, need_energy=False)
    if args.random_init:
        torch.manual_seed(args.seed)
        model = EnergyViT(model.cfg)
    model.eval().to(device)
    data = load_splits(data_options, model.cfg.img_size, model.cfg.in_chans, gray_to_rgb=True)
    if not data.labeled:
        raise ValueError(f"{args.data_path} has no labels: the probe needs a labeled dataset")
    pool = args.pool or data.default_probe_pool
    result = {"checkpoint": str(args.checkpoint), "random_init": args.random_init, "data": args.data_path or "digits",
              "protocol": args.protocol}
    name = f"probe-{'mae-' if args.protocol == 'mae' else ''}{pool}{'-random-init' if args.random_init else ''}.json"
    output = Path(args.output) if args.output else Path(args.checkpoint).with_name(name)
    if output.suffix == ".pth":
        raise ValueError(f"--output {output}: the results are JSON, and the .pth name is the probe's state")
    if args.protocol == "mae":
        say(f"{PROG}: MAE linear probe of {pool} features, {data.description}, {options.epochs} epochs, "
            f"{options.optimizer.upper()}, effective batch {options.batch_size * dist_info.world_size} "
            f"({dist_info.world_size} process(es)), lr {options.lr_for(dist_info.world_size):.3g}, on {device}; "
            f"state after each epoch: {output.with_suffix('.pth')}")
        mae = train_mae_probe(model, pool, data, options, dist_info, device, log=say,
                              save_to=output.with_suffix(".pth"), resume_from=args.resume or None)
        result.update(linear_probe_acc=mae["top1"], linear_probe_top5=mae["top5"],
                      mae_probe={k: mae[k] for k in ("lr", "effective_batch", "steps", "history")})
    result.update(frozen_scores(model, pool, args.knn_k, args.knn_t, data, args.probe_images, dist_info, device,
                                options.batch_size, options.precision, linear=args.protocol == "lbfgs"))
    if dist_info.is_main:
        save_json(output, result)
    fit = (f"MAE, {options.epochs} epochs" if args.protocol == "mae"
           else f"L-BFGS, {result['probe_train_images']} images")
    say(f"probe: {pool} features ({result['feature_dim']}-d) of {result['n_train']} train / "
        f"{result['n_held_out']} held-out images{' (random init)' if args.random_init else ''}")
    say(f"  linear probe ({fit})  top-1 {result['linear_probe_acc']:.4f}  top-5 {result['linear_probe_top5']:.4f}")
    say(f"  kNN (k={result['knn_k']}, t={args.knn_t:g})  top-1 {result['knn_top1']:.4f}  top-5 {result['knn_top5']:.4f}")
    say(f"wrote {output}")
    return result
