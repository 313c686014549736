"""The one-class anomaly protocol over every class of a labeled dataset, energy vs MAE vs the
frozen-feature baselines, over seeds.

Per seed and class C: `energyvit pretrain --one_class C` (energy, the defaults) and `--method mae
--one_class C` (the same encoder, data, schedule), then `energyvit score ENERGY --one_class C --mae
MAE`: the held-out images of class C are in-distribution, those of every other class are the
anomalies, and the reference set of the feature baselines is class C's training images. Scores:
energy, energy_typicality, restoration (the energy model), mae (MAE's reconstruction error through
the same masks), knn, mahalanobis (features of the energy model's encoder) and pixels.

Reported: for each score the AUROC per class and seed, the mean over classes per seed, and the
mean and sample standard deviation of that over seeds; the images/s of each score (CPU). A class
whose metrics.json exists in --work_dir is read, not rerun, and an interrupted pretraining resumes:
disjoint --seeds/--classes can run in parallel into one --work_dir, and a last invocation with
all of them writes the summary.

    python experiments/one_class.py --epochs 200 --out experiments/results/one_class_digits.json
    python experiments/one_class.py --data_path data/shapes --epochs 10 --out experiments/results/one_class_shapes.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from energyvit.benchmark import cpu_model, git_commit, mean_std
from energyvit.data.splits import DataOptions, load_splits


def run(cmd: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "energyvit", *cmd], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=None, help="labeled dataset (default: the embedded digits)")
    p.add_argument("--model", default="vit_nano_patch4")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--classes", nargs="*", default=None, help="class names or indices (default: every class)")
    p.add_argument("--common", default="", help="pretrain flags for every run (e.g. --batch_size 32)")
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--work_dir", default="/tmp/energyvit_one_class")
    p.add_argument("--out", required=True, help="results JSON")
    args = p.parse_args()
    classes = args.classes or load_splits(DataOptions(data_path=args.data_path), 8, None).classes
    data = ["--data_path", args.data_path] if args.data_path else []
    common = ["--model", args.model, "--epochs", str(args.epochs), "--num_threads", str(args.num_threads),
              "--no-tensorboard", "--grid_rows", "0", *data, *shlex.split(args.common)]
    per_run: dict[str, dict[str, list[float]]] = {}  # score -> "seed/class" -> auroc
    speeds: dict[str, list[float]] = {}
    for seed in args.seeds:
        for c in classes:
            out = Path(args.work_dir) / f"seed{seed}" / f"class_{c}"
            metrics_file = out / "metrics.json"
            if not metrics_file.exists():  # else finished by an earlier invocation (seeds may run in parallel)
                for method in ("energy", "mae"):
                    run(["pretrain", *common, "--seed", str(seed), "--one_class", c, "--method", method,
                         "--resume", "auto", "--output_dir", str(out / method)])
                run(["score", str(out / "energy" / "checkpoint-last.pth"), *data, "--one_class", c, "--mae",
                     str(out / "mae" / "checkpoint-last.pth"), "--seed", str(seed), "--output", str(metrics_file),
                     "--csv", str(out / "scores.csv")])
            metrics = json.loads(metrics_file.read_text())
            for name, m in metrics.items():
                per_run.setdefault(name, {})[f"{seed}/{c}"] = m["auroc"]
                speeds.setdefault(name, []).append(m["images_per_s"])
            print(f"seed {seed} class {c}: " + "  ".join(f"{n} {m['auroc']:.3f}" for n, m in metrics.items()),
                  flush=True)
    summary = {}
    for name, aurocs in per_run.items():
        by_seed = [statistics.fmean(aurocs[f"{s}/{c}"] for c in classes) for s in args.seeds]
        summary[name] = {"mean_auroc": mean_std(by_seed),
                         "per_class": {c: statistics.fmean(aurocs[f"{s}/{c}"] for s in args.seeds) for c in classes},
                         "images_per_s": statistics.median(speeds[name])}
    results = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                           "python": platform.python_version(), "threads": args.num_threads},
               "date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "command": shlex.join(sys.argv),
               "data": args.data_path or "embedded digits", "model": args.model, "epochs": args.epochs,
               "seeds": args.seeds, "classes": classes, "summary": summary, "auroc": per_run}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'score':<18} {'mean AUROC over classes':>24} {'images/s':>9}")
    for name, s in summary.items():
        print(f"{name:<18} {s['mean_auroc']['mean']:>16.3f} ± {s['mean_auroc']['std']:.3f} {s['images_per_s']:>9.0f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
