"""CPU step time of the visible-patch encoder (`--encoder_input visible`) against the default energy
step and MAE's, measured in one process on the same images.

Three training steps (loss + backward, gradients zeroed before each; no optimizer update) of
vit_nano_patch4 at 16 px on seeded random images with mim at mask ratio 0.75:

  default   the energy step `pretrain` runs by default (encoder on every patch, the 2-block head)
  visible   the same model options with --encoder_input visible (encoder once on the visible
            patches, the head K times)
  mae       the MAE baseline on the same encoder (its default decoder, math attention)

The three are interleaved over the timed rounds (so a change of machine load hits all alike) after
warm-up rounds; reported: the median time of each, the ratios of the medians, and the model FLOPs
ratios of energyvit.benchmark.flops. One torch thread by default.

Writes bench/results/visible_encoder_cpu-DATE.json (machine: CPU model, cores, load average, torch
version, date, git commit). Usage: python bench/visible_encoder_cpu.py [--batch 64] [--rounds 30]
[--steps 1] [--chans 3] [--threads 1] [--out FILE]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from energyvit.benchmark import cpu_model, git_commit
from energyvit.benchmark.flops import energy_step_flops, mae_step_flops, visible_step_flops
from energyvit.methods.mae import MAEBaseline
from energyvit.model import EnergyViT, ModelOptions
from energyvit.objective import EnergyOptions, task_loss
from energyvit.tasks import TaskOptions, build_task, mim_patch_counts

ROOT = Path(__file__).resolve().parents[1]
MODEL = "vit_nano_patch4"


def steps(batch: int, restore_steps: int, chans: int):
    """name -> (a step to time, its model FLOPs)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    default_cfg = ModelOptions(model=MODEL, restore_steps=restore_steps).config(chans)
    visible_cfg = ModelOptions(model=MODEL, restore_steps=restore_steps, encoder_input="visible").config(chans)
    clean = torch.rand(batch, chans, default_cfg.img_size, default_cfg.img_size, generator=g)
    corrupted = build_task("mim", default_cfg.patch_size, TaskOptions())(clean, g)
    hidden, _ = mim_patch_counts(default_cfg.num_patches, TaskOptions().mask_ratio)
    default, visible = EnergyViT(default_cfg), EnergyViT(visible_cfg)
    visible.load_state_dict(default.state_dict(), strict=False)  # the same encoder and head weights
    mae = MAEBaseline(default_cfg, mask_ratio=TaskOptions().mask_ratio)
    mae.encoder.load_state_dict(default.state_dict())
    for m in (default, visible):
        for p in m.unused_parameters():
            p.requires_grad_(False)
    for p in mae.encoder.energy_parameters():
        p.requires_grad_(False)
    opts = EnergyOptions()

    def run(module, loss_fn):
        def step():
            for p in module.parameters():
                p.grad = None
            loss_fn().backward()
        return step

    mae_gen = torch.Generator().manual_seed(2)
    return {
        "default": (run(default, lambda: task_loss(default, clean, corrupted, opts)),
                    energy_step_flops(default_cfg, restore_steps, batch)),
        "visible": (run(visible, lambda: task_loss(visible, clean, corrupted, opts)),
                    visible_step_flops(visible_cfg, restore_steps, batch, hidden)),
        "mae": (run(mae, lambda: mae.forward_loss(clean, mae_gen)),
                mae_step_flops(default_cfg, mae.decoder_cfg, mae.num_visible, batch)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=1, help="K, restoration steps")
    p.add_argument("--chans", type=int, default=3, help="image channels (3: shapes, 1: digits)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cases = steps(args.batch, args.steps, args.chans)
    times = {name: [] for name in cases}
    for r in range(args.warmup + args.rounds):
        for name, (step, _) in cases.items():
            t = time.perf_counter()
            step()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    flops = {name: f for name, (_, f) in cases.items()}
    result = {
        "what": f"{MODEL}, 16 px, {args.chans} channel(s), mim 0.75, K={args.steps}, batch {args.batch}: loss + backward",
        "median_ms": {k: 1e3 * v for k, v in median.items()},
        "time_ratio": {"visible/default": median["visible"] / median["default"],
                       "visible/mae": median["visible"] / median["mae"],
                       "default/mae": median["default"] / median["mae"]},
        "flops_ratio": {"visible/default": flops["visible"] / flops["default"],
                        "visible/mae": flops["visible"] / flops["mae"],
                        "default/mae": flops["default"] / flops["mae"]},
        "gflop_per_step": {k: v / 1e9 for k, v in flops.items()},
        "rounds": args.rounds, "threads": args.threads,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average": os.getloadavg(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"visible_encoder_cpu-{_dt.date.today()}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
