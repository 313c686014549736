"""Pick defaults by measurement: run `energyvit pretrain` on the embedded digits for several
configurations and seeds, then report held-out linear-probe accuracy (pretrained vs random init
vs raw pixels, every pooling) and restoration errors as mean and spread over seeds.

    python experiments/sweep_digits.py --seeds 0 1 2 --config base="" --config linear="--energy linear --energy_head_depth 0"

Each run is a separate `energyvit pretrain` process; results go to a JSON file with the
machine, torch version, date and git commit. `--from_runs NAME=DIR,DIR,...` aggregates runs that
already exist (their summary.json, and log.jsonl for the training time) instead of running them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from energyvit.benchmark import cpu_model, git_commit, mean_std

ROOT = Path(__file__).resolve().parents[1]


def run_one(flags: str, seed: int, out_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "energyvit.cli", "pretrain", "--seed", str(seed), "--output_dir", str(out_dir),
           *shlex.split(flags)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out_dir / "summary.json").read_text())
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def read_run(out_dir: Path) -> dict:
    """A finished run's summary, with its training time (sum of the epochs' times) as wall_s."""
    summary = json.loads((out_dir / "summary.json").read_text())
    log = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    summary["wall_s"] = sum(r["epoch_s"] for r in log)
    return summary


def aggregate(runs: list[dict]) -> dict:
    agg = {"wall_s": mean_std([r["wall_s"] for r in runs]),
           "raw_pixels": mean_std([r["probe_acc_raw_pixels"] for r in runs])}
    for pool in runs[0]["probe_by_pool"]:
        for key in ("pretrained", "random_init"):
            agg[f"{pool}/{key}"] = mean_std([r["probe_by_pool"][pool][key] for r in runs])
        agg[f"{pool}/margin_vs_random"] = mean_std(
            [r["probe_by_pool"][pool]["pretrained"] - r["probe_by_pool"][pool]["random_init"] for r in runs])
        agg[f"{pool}/margin_vs_raw"] = mean_std(
            [r["probe_by_pool"][pool]["pretrained"] - r["probe_acc_raw_pixels"] for r in runs])
    for task in runs[0]["tasks"]:
        for key in ("mse_corrupted", "mse_restored"):
            agg[f"{task}/{key}"] = mean_std([r["tasks"][task][key] for r in runs])
    return agg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], help="NAME=FLAGS (flags for energyvit pretrain)")
    p.add_argument("--from_runs", action="append", default=[], help="NAME=DIR,DIR,...: aggregate finished runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work_dir", default="/tmp/energyvit_sweep")
    p.add_argument("--out", default=str(ROOT / "experiments/results/digits_sweep.json"), help="results JSON")
    args = p.parse_args()
    configs = dict(c.split("=", 1) for c in args.config)
    finished = {name: dirs.split(",") for name, dirs in (c.split("=", 1) for c in args.from_runs)}
    if not configs and not finished:
        p.error("give --config or --from_runs")
    results = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                           "python": platform.python_version()},
               "date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "seeds": args.seeds, "configs": {}}
    jobs = [(name, flags, None) for name, flags in configs.items()] + [(n, None, d) for n, d in finished.items()]
    for name, flags, dirs in jobs:
        if dirs is None:
            runs = [run_one(flags, s, Path(args.work_dir) / f"{name}_seed{s}") for s in args.seeds]
            results["configs"][name] = {"flags": flags, "summary": aggregate(runs)}
        else:
            runs = [read_run(Path(d)) for d in dirs]
            results["configs"][name] = {"runs": dirs, "seeds": [r["seed"] for r in runs], "summary": aggregate(runs),
                                        "wall_s": "training time: the sum of the epochs' epoch_s in log.jsonl"}
        agg = results["configs"][name]["summary"]
        line = "  ".join(f"{k} {agg[k]['mean']:.4f}±{agg[k]['std']:.4f}" for k in
                         ("tokens/pretrained", "tokens/random_init", "raw_pixels", "mean/pretrained", "mean/random_init"))
        print(f"{name:<16} {line}  ({agg['wall_s']['mean']:.0f} s/run)", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
