"""Energy pretraining vs the MAE baseline vs random init vs raw pixels on a labeled dataset, over
seeds, at equal epochs, at equal training time, and against training compute.

Per seed:
- each energy configuration (`--config NAME="FLAGS"`, default: one, `energy`, with the
  defaults) pretrained for --epochs;
- MAE (`--method mae`: the same encoder, data, batch size, schedule) for --epochs, and again
  for the epochs that take about as long as the first energy configuration's training
  (`mae_time`; training time is the sum of the epochs' own times, evaluation excluded);
- then every checkpoint, the same architecture at random init (seeded) and the raw pixels go
  through the same classifiers of the frozen mean-pooled final tokens: the linear probe, the
  weighted kNN (k=200, t=0.1) and a few-labels linear probe (--labels_per_class labels per
  class, the mean over --draws random draws); with --finetune_epochs, `energyvit finetune`.

Compute: every run records its training's model FLOPs (the matmul FLOPs of one step as
energyvit.benchmark.flops counts them, times the optimizer steps taken: the same count MFU uses)
and its training time. With `--budgets E1 E2 ...` every method is pretrained once per budget, each
a whole run of that many epochs (its own lr schedule, not a checkpoint of a longer one), and
`curves` gives each method's scores against FLOPs and time; the equal-time MAE run is then left
out (the curves hold it). An MAE step costs a fraction of an energy step, so `--mae_budgets`
gives MAE its own (longer) budgets, for a curve that reaches the energy runs' compute.

Writes a JSON file (machine, torch, date, commit, the commands, every run's numbers, mean and
sample standard deviation over seeds) and prints a table.

    python experiments/compare_methods.py --data_path DATA --epochs 30 --seeds 0 1 2 \\
        --config energy="" --config head2="--energy_head_depth 2" --out experiments/results/x.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from energyvit.benchmark import cpu_model, git_commit, mean_std
from energyvit.benchmark.flops import energy_step_flops, mae_step_flops
from energyvit.checkpoint import load_checkpoint, load_model
from energyvit.data.in_memory import SplitDataset
from energyvit.data.splits import DataOptions, load_splits
from energyvit.evaluation.features import features
from energyvit.evaluation.knn import knn_scores, topk_accuracy
from energyvit.evaluation.probes import linear_probe
from energyvit.methods.mae import load_mae
from energyvit.model import EnergyViT, config_from_dict
from energyvit.tasks import mim_patch_counts

METRICS = ("linear", "knn", "few_labels")


def pretrain(name: str, flags: list[str], args, seed: int, epochs: int) -> dict:
    """One `energyvit pretrain` process; its checkpoint, training time and training FLOPs."""
    out = Path(args.work_dir) / f"{name}_seed{seed}"
    cmd = [sys.executable, "-m", "energyvit", "pretrain", "--seed", str(seed), "--epochs", str(epochs),
           "--model", args.model, "--output_dir", str(out), "--no-tensorboard", "--grid_rows", "0",
           "--probe_images", "500", "--num_threads", str(args.num_threads), *data_flags(args), *args.common, *flags]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    ckpt = out / "checkpoint-last.pth"
    return {"checkpoint": ckpt, "epochs": epochs, "train_s": sum(r["epoch_s"] for r in log),
            "train_flops": training_flops(ckpt), "wall_s": time.perf_counter() - t0, "command": shlex.join(cmd[1:])}


def training_flops(checkpoint: Path) -> float:
    """Model FLOPs of a finished single-process pretraining run: its optimizer steps x the images
    of one (batch size x accumulation) x one image's step FLOPs for its method and model."""
    state = load_checkpoint(checkpoint)
    args = state["args"]
    images = state["global_step"] * args["batch_size"] * args["accum_iter"]
    if state["method"] == "mae":
        mae = load_mae(checkpoint)
        return images * mae_step_flops(mae.encoder.cfg, mae.decoder_cfg, mae.num_visible, 1)
    cfg = config_from_dict(state["model_config"])  # the config alone: no second read, no model built
    hidden, restored = mim_patch_counts(cfg.num_patches, args["mask_ratio"], args.get("restore_fraction", 1.0))
    patches = cfg.num_patches - hidden + restored  # sparse restoration (mim alone): visible + restored hidden
    return images * energy_step_flops(cfg, cfg.restore_steps, 1, contrast=args["contrast_weight"] > 0, patches=patches,
                                      exact_blocks=args.get("second_order_blocks"))


def run_name(name: str, epochs: int, several: bool) -> str:
    """A run's name: the method's, with its budget when there are several."""
    return f"{name}_e{epochs}" if several else name


def data_flags(args) -> list[str]:
    return ["--data_path", args.data_path] if args.data_path else []


def few_labels(train_x, train_y, test_x, test_y, per_class: int, draws: int, seed: int) -> float:
    """Mean held-out accuracy of linear probes fit on `per_class` random labeled images per class."""
    accs = []
    for draw in range(draws):
        g = torch.Generator().manual_seed(seed * 1000 + draw)
        picked = torch.cat([idx[torch.randperm(len(idx), generator=g)[:per_class]]
                            for c in train_y.unique() for idx in [torch.nonzero(train_y == c).flatten()]])
        accs.append(linear_probe(train_x[picked], train_y[picked], test_x, test_y))
    return sum(accs) / len(accs)


def scores(train_x, train_y, test_x, test_y, args, seed: int) -> dict:
    knn = knn_scores(train_x, train_y, test_x, min(200, len(train_y)), 0.1)
    return {"linear": linear_probe(train_x, train_y, test_x, test_y), "knn": topk_accuracy(knn, test_y, 1),
            "few_labels": few_labels(train_x, train_y, test_x, test_y, args.labels_per_class, args.draws, seed)}


def frozen(model: EnergyViT, data, args, seed: int) -> tuple[dict, dict]:
    """Scores of the model's mean-pooled features, and of the raw pixels of the same images."""
    model.eval()
    train_f, train_px, train_y = features([model], data.train_plain, args.probe_images, ("mean",), data.num_workers)
    test_f, test_px, test_y = features([model], SplitDataset(data.held_out), len(data.held_out.labels), ("mean",), 0)
    return (scores(train_f[(0, "mean")], train_y, test_f[(0, "mean")], test_y, args, seed),
            scores(train_px, train_y, test_px, test_y, args, seed))


def finetune(ckpt: Path, name: str, args, seed: int, random_init: bool = False) -> float:
    out = Path(args.work_dir) / f"{name}_seed{seed}" / "finetune"
    cmd = [sys.executable, "-m", "energyvit", "finetune", str(ckpt), "--seed", str(seed), "--epochs",
           str(args.finetune_epochs), "--output_dir", str(out), "--num_threads", str(args.num_threads),
           *data_flags(args), *(["--random_init"] if random_init else [])]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())["held_out_top1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=None, help="labeled dataset (default: the embedded digits)")
    p.add_argument("--model", default="vit_nano_patch4")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config", action="append", default=[], metavar='NAME="FLAGS"',
                   help="an energy configuration: its name and extra pretrain flags (repeatable)")
    p.add_argument("--common", default="", help="pretrain flags for every run, MAE included (e.g. batch size)")
    p.add_argument("--no_equal_time", action="store_true", help="skip the MAE run of equal training time")
    p.add_argument("--budgets", type=int, nargs="+", default=None, metavar="EPOCHS",
                   help="pretrain every method once per budget (epochs) for curves against compute (default: --epochs)")
    p.add_argument("--mae_budgets", type=int, nargs="+", default=None, metavar="EPOCHS",
                   help="MAE's budgets (default: --budgets), e.g. longer ones to reach the energy runs' compute")
    p.add_argument("--labels_per_class", type=int, default=10)
    p.add_argument("--draws", type=int, default=5, help="random draws of the few-labels probe")
    p.add_argument("--probe_images", type=int, default=10000, help="training images the classifiers fit on")
    p.add_argument("--eval_images", type=int, default=2000, help="held-out images")
    p.add_argument("--finetune_epochs", type=int, default=0, help="also fine-tune each checkpoint (0: no)")
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--work_dir", default="/tmp/energyvit_compare")
    p.add_argument("--out", required=True, help="results JSON")
    args = p.parse_args()
    budgets = args.budgets or [args.epochs]
    mae_budgets = args.mae_budgets or budgets
    for flag, values in (("--budgets", budgets), ("--mae_budgets", mae_budgets)):
        if min(values) < 1 or len(set(values)) < len(values):
            p.error(f"{flag}: distinct epoch counts >= 1, got {values}")
    several = len(budgets) > 1 or len(mae_budgets) > 1
    args.common = shlex.split(args.common) + ["--eval_images", str(args.eval_images)]
    configs = dict(c.split("=", 1) for c in args.config) if args.config else {"energy": ""}
    configs = {name: shlex.split(flags) for name, flags in configs.items()}
    torch.set_num_threads(args.num_threads)

    runs: dict[str, list[dict]] = {}
    for seed in args.seeds:
        trained = {}
        plan = [(name, flags, epochs) for epochs in budgets for name, flags in configs.items()]
        plan += [("mae", ["--method", "mae"], epochs) for epochs in mae_budgets]
        for name, flags, epochs in plan:
            trained[run_name(name, epochs, several)] = pretrain(run_name(name, epochs, several), flags, args, seed,
                                                                epochs)
        mae_ckpt = trained[run_name("mae", mae_budgets[-1], several)]["checkpoint"]
        if not several and not args.no_equal_time:
            first = trained[next(iter(configs))]
            epochs = max(1, math.floor(args.epochs * first["train_s"] / trained["mae"]["train_s"] + 0.5))
            trained["mae_time"] = pretrain("mae_time", ["--method", "mae"], args, seed, epochs)
        reference = load_model(mae_ckpt, need_energy=False)[0]
        data = load_splits(DataOptions(data_path=args.data_path, eval_images=args.eval_images),
                           reference.cfg.img_size, reference.cfg.in_chans, gray_to_rgb=True)
        for name, run in trained.items():
            model = load_model(run["checkpoint"], need_energy=False)[0]
            row, pixels = frozen(model, data, args, seed)
            if args.finetune_epochs:
                row["finetune"] = finetune(run["checkpoint"], name, args, seed)
            row.update({k: v for k, v in run.items() if k != "checkpoint"})
            runs.setdefault(name, []).append(row)
        torch.manual_seed(seed)
        row, pixels = frozen(EnergyViT(reference.cfg), data, args, seed)
        if args.finetune_epochs:
            row["finetune"] = finetune(mae_ckpt, "random_init", args, seed, random_init=True)
        runs.setdefault("random_init", []).append(row)
        runs.setdefault("raw_pixels", []).append(pixels)
        for name in (*trained, "random_init", "raw_pixels"):
            r = runs[name][-1]
            print(f"seed {seed} {name:<14}" + "".join(f"  {k} {r[k]:.4f}" for k in (*METRICS, "finetune") if k in r)
                  + (f"  ({r['train_s']:.0f} s training)" if "train_s" in r else ""), flush=True)

    keys = [*METRICS, "finetune", "train_s", "train_flops", "epochs"]
    summary = {name: {k: mean_std([r[k] for r in rows]) for k in keys if k in rows[0]} for name, rows in runs.items()}
    curves = {name: [summary[run_name(name, b, several)] for b in (mae_budgets if name == "mae" else budgets)]
              for name in (*configs, "mae")} if several else {}
    results = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                           "python": platform.python_version(), "threads": args.num_threads},
               "date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "command": shlex.join(sys.argv),
               "data": args.data_path or "embedded digits", "model": args.model, "epochs": args.epochs,
               "budgets": budgets, "mae_budgets": mae_budgets, "seeds": args.seeds, "summary": summary,
               "curves": curves, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    shown = [k for k in (*METRICS, "finetune") if k in summary["energy" if "energy" in summary else next(iter(summary))]]
    print(f"\n{'':<14}" + "".join(f"{k:>18}" for k in shown) + f"{'training s':>12}{'GFLOP':>10}")
    for name, agg in summary.items():
        cells = "".join(f"{agg[k]['mean']:>11.4f}±{agg[k]['std']:.4f}" if k in agg else f"{'':>18}" for k in shown)
        print(f"{name:<14}{cells}" + (f"{agg['train_s']['mean']:>12.0f}{agg['train_flops']['mean'] / 1e9:>10.1f}"
                                       if "train_s" in agg else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
