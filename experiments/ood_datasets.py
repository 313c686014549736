"""Out-of-distribution across datasets: a model pretrained on the embedded digits scores the
digits' held-out images (in) against the shapes set's validation images (out), and a model
pretrained on shapes the reverse, energy vs MAE vs the feature baselines, over seeds.

Per seed and direction: `energyvit pretrain` (energy, the defaults) and `--method mae` on the
training set, then `energyvit score ENERGY --in IN --out OUT --reference TRAIN --mae MAE`. Images
of the other set are converted to the model's channels and size (shapes to gray 16 px for the
digits' model, digits to RGB for the shapes' model). A direction whose metrics.json exists in
--work_dir is read, not rerun, and an interrupted pretraining resumes.

    python experiments/ood_datasets.py --shapes data/shapes --out experiments/results/ood_datasets.json
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


def energyvit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "energyvit", *args], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", required=True, help="the shapes set (`energyvit shapes DIR`)")
    p.add_argument("--digits_epochs", type=int, default=200, help="pretraining epochs on the digits (the default job)")
    p.add_argument("--shapes_epochs", type=int, default=10, help="pretraining epochs on shapes (docs/results.md)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--work_dir", default="/tmp/energyvit_ood")
    p.add_argument("--out", required=True, help="results JSON")
    args = p.parse_args()
    shapes = Path(args.shapes)
    directions = {  # name: (training data flags, epochs, in set, out set, reference)
        "digits_vs_shapes": ([], args.digits_epochs, "digits", str(shapes / "val"), "digits"),
        "shapes_vs_digits": (["--data_path", str(shapes)], args.shapes_epochs, str(shapes / "val"), "digits",
                             str(shapes / "train")),
    }
    aurocs: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds:
        for name, (data, epochs, in_set, out_set, reference) in directions.items():
            out = Path(args.work_dir) / f"seed{seed}" / name
            if not (out / "metrics.json").exists():  # else finished by an earlier invocation
                for method in ("energy", "mae"):
                    energyvit("pretrain", *data, "--epochs", str(epochs), "--seed", str(seed), "--method", method,
                              "--num_threads", str(args.num_threads), "--no-tensorboard", "--grid_rows", "0",
                              "--resume", "auto", "--output_dir", str(out / method))
                energyvit("score", str(out / "energy" / "checkpoint-last.pth"), "--in", in_set, "--out", out_set,
                          "--reference", reference, "--mae", str(out / "mae" / "checkpoint-last.pth"),
                          "--seed", str(seed), "--output", str(out / "metrics.json"), "--csv", str(out / "scores.csv"))
            metrics = json.loads((out / "metrics.json").read_text())
            for score, m in metrics.items():
                aurocs.setdefault(name, {}).setdefault(score, []).append(m["auroc"])
            print(f"seed {seed} {name}: " + "  ".join(f"{s} {m['auroc']:.3f}" for s, m in metrics.items()), flush=True)
    summary = {name: {score: mean_std(v) for score, v in scores.items()} for name, scores in aurocs.items()}
    results = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                           "python": platform.python_version(), "threads": args.num_threads},
               "date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "command": shlex.join(sys.argv),
               "seeds": args.seeds, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for name, scores in summary.items():
        print(f"\n{name}: AUROC, mean ± std over seeds")
        for score, s in scores.items():
            print(f"  {score:<18} {s['mean']:.3f} ± {s['std']:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
