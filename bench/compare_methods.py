"""Energy pretraining vs the MAE baseline vs random init on the embedded digits, under one probe
and one fine-tune protocol, over several seeds.

Per seed: `energyvit pretrain` (energy, the defaults) and `energyvit pretrain --method mae` (the
same encoder, data, batch size, schedule and epochs; MAE_EPOCHS adds an MAE run given about the
energy run's wall time instead), then on each checkpoint and on the same architecture at random
init: `energyvit probe` (linear probe and weighted kNN, k=200, t=0.1; tokens and mean pooling) and
`energyvit finetune` (its defaults). Reports mean and spread over seeds; writes a JSON file with
the machine, torch version, date and git commit.

    python bench/compare_methods.py --seeds 0 1 2 --num_threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from energyvit.bench import cpu_model, git_commit, mean_std

ROOT = Path(__file__).resolve().parents[1]
POOLS = ("tokens", "mean")


def energyvit(*args: str, threads: int) -> float:
    """Run one energyvit command quietly; returns its wall time in seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "energyvit", *args, "--num_threads", str(threads)], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def evaluate(ckpt: Path, out: Path, seed: int, threads: int, random_init: bool = False) -> dict:
    extra = ["--random_init", "--seed", str(seed)] if random_init else []
    result = {}
    for pool in POOLS:
        path = out / f"probe-{pool}.json"
        energyvit("probe", str(ckpt), "--pool", pool, "--output", str(path), *extra, threads=threads)
        probe = json.loads(path.read_text())
        result[f"linear_{pool}"], result[f"knn_{pool}"] = probe["linear_probe_acc"], probe["knn_top1"]
    energyvit("finetune", str(ckpt), "--seed", str(seed), "--output_dir", str(out / "finetune"), *extra,
              threads=threads)
    result["finetune"] = json.loads((out / "finetune" / "summary.json").read_text())["held_out_top1"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num_threads", type=int, default=2)
    p.add_argument("--mae_epochs", type=int, default=0,
                   help="also an MAE run with this many epochs (about the energy run's wall time); 0: none")
    p.add_argument("--work_dir", default="/tmp/energyvit_compare")
    p.add_argument("--out", default=str(ROOT / "bench/results/compare_methods_digits.json"))
    args = p.parse_args()
    methods = {"energy": [], "mae": []} | ({f"mae_{args.mae_epochs}ep": ["--epochs", str(args.mae_epochs)]}
                                           if args.mae_epochs else {})
    runs: dict[str, list[dict]] = {name: [] for name in [*methods, "random_init"]}
    for seed in args.seeds:
        for name, flags in methods.items():
            out = Path(args.work_dir) / f"{name}_seed{seed}"
            wall = energyvit("pretrain", "--method", name.split("_")[0], "--seed", str(seed), "--output_dir", str(out),
                             "--no-tensorboard", "--grid_rows", "0", *flags, threads=args.num_threads)
            row = {"pretrain_wall_s": wall, **evaluate(out / "checkpoint-last.pth", out, seed, args.num_threads)}
            runs[name].append(row)
            if name == "energy":
                rand = Path(args.work_dir) / f"random_init_seed{seed}"
                runs["random_init"].append(evaluate(out / "checkpoint-last.pth", rand, seed, args.num_threads,
                                                    random_init=True))
            print(f"seed {seed} {name:<12} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "pretrain_wall_s")
                  + f"  ({wall:.0f} s pretraining)", flush=True)
        print(f"seed {seed} random_init  " + "  ".join(f"{k} {v:.4f}" for k, v in runs["random_init"][-1].items()),
              flush=True)
    summary = {name: {key: mean_std([r[key] for r in rows]) for key in rows[0]} for name, rows in runs.items()}
    results = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                           "python": platform.python_version(), "threads": args.num_threads},
               "date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "seeds": args.seeds,
               "methods": {n: f"energyvit pretrain --method {n.split('_')[0]} {' '.join(f)}".strip()
                           for n, f in methods.items()},
               "summary": summary, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    keys = [k for k in summary["energy"] if k != "pretrain_wall_s"]
    print(f"\n{'':<14}" + "".join(f"{k:>18}" for k in keys))
    for name, agg in summary.items():
        print(f"{name:<14}" + "".join(f"{agg[k]['mean']:>11.4f}±{agg[k]['std']:.4f}" for k in keys))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
