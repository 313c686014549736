"""`energyvit finetune`: fine-tune a pretrained encoder end to end as a classifier of the embedded
digits or of any labeled dataset `energyvit pretrain --data_path` reads (MAE's recipe, in
energyvit.evaluation.finetuning), next to the same architecture from random init as a baseline."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from energyvit.checkpoint import atomic_write, load_model, save_checkpoint, save_json
from energyvit.commands.args import add, add_config, add_options, build_options, device_flag, non_negative_int
from energyvit.data.splits import DataOptions, load_splits
from energyvit.evaluation.finetuning import FinetuneOptions, finetune
from energyvit.model import EnergyViT, config_to_dict

HELP = "fine-tune a pretrained encoder end to end as a classifier"
PROG = "energyvit finetune"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint-last.pth of `energyvit pretrain` or an `export` file")
    add_config(p)
    add_options(p, FinetuneOptions)
    add_options(p, DataOptions, defaults={"shift": 1})
    add(p, "--random_init", action="store_true",
        help="baseline: the checkpoint's architecture at random init (seeded), not its weights")
    add(p, "--output_dir", default=None, help="default: 'finetune' beside the checkpoint")
    add(p, "--device", type=device_flag, default="cpu", help="cpu, cuda or cuda:N")
    add(p, "--num_threads", type=non_negative_int, default=0, help="torch CPU threads (0: torch's default)")


def run(args: argparse.Namespace) -> dict:
    options, data_options = build_options(FinetuneOptions, args, PROG), build_options(DataOptions, args, PROG)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(options.seed)
    encoder, _ = load_model(args.checkpoint, need_energy=False)
    if args.random_init:
        encoder = EnergyViT(encoder.cfg)
    data = load_splits(data_options, encoder.cfg.img_size, encoder.cfg.in_chans, gray_to_rgb=True)
    out = Path(args.output_dir) if args.output_dir else Path(args.checkpoint).parent / "finetune"
    print(f"{PROG}: {'random init' if args.random_init else args.checkpoint}, {encoder.cfg.depth} blocks, "
          f"{data.description}, pool {options.pool}, layer decay {options.layer_decay}, drop path {options.drop_path}, "
          f"smoothing {options.smoothing}")
    result = finetune(encoder, data, options, args.device)
    model = result.pop("model")
    atomic_write(out / "log.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in result["history"]).encode()))
    save_checkpoint(out / "checkpoint-finetuned.pth", {
        "model": model.state_dict(), "model_config": config_to_dict(encoder.cfg), "pool": options.pool,
        "num_classes": model.head.out_features, "args": vars(args),
    })
    summary = {"checkpoint": str(args.checkpoint), "random_init": args.random_init, "data": data.description,
               **result}
    save_json(out / "summary.json", summary)
    print(f"held-out top-1 after {options.epochs} epochs: {result['held_out_top1']:.4f}  (wrote {out})")
    return summary
