"""Calibration of the shapes dataset (energyvit/data/shapes.py): can a linear probe tell pretrained
features from random ones and from raw pixels on it?

One dataset (the generator's defaults unless flags change them), then, one process at a time:
`energyvit pretrain` with the energy method (its defaults) and with `--method mae`, each
followed by `energyvit probe CKPT --pool mean` (linear probe and kNN, k=200, t=0.1); the same
probe with `--random_init`; and raw pixels (area-averaged to at most 32x32, as the pretrain
baseline) under the same linear probe and kNN, computed here. Held-out: all val images
(--eval_images 2000); probe fit on the 10000 train images. Writes calibration.json.

    python experiments/calibrate_shapes.py --epochs 30 --work_dir /tmp/shapes_calib
    python experiments/calibrate_shapes.py --epochs 3 --model vit_micro_patch4 --work_dir /tmp/shapes_calib
    python experiments/calibrate_shapes.py --baselines_only --object_contrast 0 ...   # tuning

Measured 2026-11-29/30, CPU "AMD EPYC", 2 cores shared with other jobs (load average 2.5 to 5),
one torch thread, torch 2.13.0+cpu; dataset: the generator's defaults, seed 0 (10 x 1000 train,
10 x 200 val, 32x32; 27 s to generate at load 2.5); pretraining and random-init seed 0; top-1 in %,
held-out = all 2000 val images (one image = 0.05 points; binomial s.e. about 1.1 points).
Wall = the whole `energyvit pretrain` command, its closing probe included. Copies of the JSON
files: experiments/results/shapes_calibration_*.json.

| model (input) | epochs | wall energy / MAE | energy lin / kNN | MAE lin / kNN | random init lin / kNN | raw pixels lin / kNN |
| --- | --- | --- | --- | --- | --- | --- |
| vit_nano_patch4 (16 px) | 30 | 663 s / 365 s | 42.3 / 31.1 | 45.4 / 33.0 | 26.9 / 16.6 | 40.7 / 38.5 |
| vit_micro_patch4 (32 px) | 3 | 880 s / 597 s | 46.5 / 30.5 | 45.1 / 25.0 | 31.3 / 17.2 | 38.3 / 34.4 |

Random init of vit_nano_patch4, seeds 1 and 2: 27.6 / 18.8 and 26.5 / 18.9. The pretrain
command's own closing probe gives random init 26.45 (nano) and 30.45 (micro), a little off the
`probe --random_init` numbers of the same seed; its pretrained and raw-pixel numbers equal the
table's. The energy runs took longer than the 5 minutes aimed at: the machine's load varied
(MAE nano went from 800 to 3200 images/s within its run).

How the defaults were found (vit_nano_patch4, 16 px, data seed 0). Rows marked * come from an
in-process proxy (same linear probe and kNN; the random-init model normalized pixels with mean
0.5 / std 0.25 instead of the data's statistics), the others from this script. Versions before
max_rotation existed rotated the object by any angle; before object_contrast, object and
background colors were both uniform (either polarity).

| generator setting (changes from the first version's defaults) | raw pixels lin / kNN | random init lin / kNN |
| --- | --- | --- |
| * any rotation, any colors, clutter 6, texture_contrast 1, scale 0.45-0.8 | 11.7 / 12.2 | 11.0 / 10.4 |
| * clutter 0, texture_contrast 0, scale 0.6-0.9 | 19.8 / 26.2 | 16.2 / 12.7 |
| * clutter 0 | 11.5 / 13.7 | 13.6 / 9.4 |
| * clutter 2, texture_contrast 0.5, scale 0.6-0.9 | 14.1 / 24.7 | 14.0 / 11.5 |
| * clutter 0, texture_contrast 0, max_aspect 1 | 14.2 / 14.5 | 15.6 / 11.2 |
| * clutter 0, texture_contrast 0, max_rotation 0 | 24.2 / 29.9 | 15.3 / 12.1 |
| * max_rotation 0 | 12.6 / 19.6 | 13.3 / 9.3 |
| * max_rotation 20, clutter 2, texture_contrast 0.5 | 14.6 / 22.7 | 14.7 / 11.7 |
| * object_contrast 0.5, clutter 0, texture_contrast 0, max_rotation 0 | 70.5 / 71.3 | 38.5 / 20.7 |
| * object_contrast 0.5 | 28.2 / 26.5 | 27.3 / 18.5 |
| * object_contrast 0.3, max_rotation 30, clutter 4, texture_contrast 0.5 | 42.2 / 35.6 | 21.9 / 15.4 |
| * object_contrast 0.5, clutter 4 | 29.1 / 29.0 | 26.7 / 19.8 |
| * object_contrast 0.5, clutter 4, texture_contrast 0.5 | 29.1 / 29.9 | 27.8 / 19.2 |
| * object_contrast 0.5, max_rotation 45 (the defaults) | 40.7 / 38.5 | 31.3 / 19.2 |
| object_contrast 0.5, max_rotation 45 (the defaults) | 40.7 / 38.5 | 26.9 / 16.6 |
| defaults, min_scale 0.55, max_scale 0.85 | 54.4 / 50.7 | 31.4 / 19.2 |
| defaults, clutter 4, texture_contrast 0.7 | 40.9 / 43.5 | 27.5 / 18.8 |

Color polarity is what defeats both baselines: with it random, even plain solid shapes without
clutter or rotation stay below 25%. A 3-epoch MAE spot check at `object_contrast 0.5` (full
rotations) already gave 28.2 against 23.7 for random init (pretrain's closing probe). The larger
objects of the next-to-last row put both baselines inside 30-70%, but raw pixels at 54% would sit
above what these short runs reach, so the defaults keep the smaller objects.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from energyvit.checkpoint import save_checkpoint
from energyvit.data import shapes
from energyvit.data.pixels import to_float_pixels
from energyvit.data.splits import DataOptions, DataSplits, load_splits
from energyvit.evaluation.features import raw_pixels
from energyvit.evaluation.knn import knn_scores, topk_accuracy
from energyvit.evaluation.probes import linear_probe
from energyvit.model import EnergyViT, config_to_dict, model_config

EVAL_IMAGES = 2000
KNN_K, KNN_T = 200, 0.1


def energyvit(*args: str) -> float:
    """Run one energyvit command on one thread, its output to the terminal; its wall time in s."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "energyvit", *args, "--num_threads", "1"], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t0


def probe(ckpt: Path, data: Path, output: Path, *extra: str) -> dict:
    energyvit("probe", str(ckpt), "--data_path", str(data), "--pool", "mean", "--eval_images", str(EVAL_IMAGES),
              "--num_workers", "1", "--output", str(output), *extra)
    result = json.loads(output.read_text())
    return {"linear": result["linear_probe_acc"], "knn": result["knn_top1"]}


def raw_pixel_scores(split: DataSplits) -> dict:
    train = [split.train_plain[i] for i in range(len(split.train_plain))]
    train_x = raw_pixels(to_float_pixels(torch.stack([x for x, _, _ in train]), "cpu"))  # items are uint8
    train_y = torch.tensor([y for _, y, _ in train])
    test_x, test_y = raw_pixels(split.held_out.images), split.held_out.labels
    knn = topk_accuracy(knn_scores(train_x, train_y, test_x, KNN_K, KNN_T), test_y, 1)
    return {"linear": linear_probe(train_x, train_y, test_x, test_y), "knn": knn}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", type=Path, default=Path("/tmp/shapes_calib"))
    p.add_argument("--model", default="vit_nano_patch4")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0, help="pretraining and random-init seed")
    p.add_argument("--methods", nargs="+", default=["energy", "mae"])
    p.add_argument("--baselines_only", action="store_true", help="raw pixels and random init only (no pretraining)")
    for name, default in shapes.DEFAULTS.items():  # the generator's own knobs, passed through
        p.add_argument(f"--{'data_seed' if name == 'seed' else name}", type=type(default), default=default)
    args = p.parse_args()
    torch.set_num_threads(1)

    params = {name: getattr(args, "data_seed" if name == "seed" else name) for name in shapes.DEFAULTS}
    data = args.work_dir / "data"
    if (data / "shapes.json").is_file() and {k: v for k, v in json.loads((data / "shapes.json").read_text()).items()
                                             if k in params} == params:
        print(f"reusing {data}")
        generation_s = None
    else:
        generation_s = shapes.generate(data, overwrite=True, **params)["seconds"]
        print(f"generated {data} in {generation_s:.1f} s")

    img_size = model_config(args.model).img_size
    results = {"model": args.model, "img_size": img_size, "epochs": args.epochs, "seed": args.seed,
               "shapes": params, "generation_s": generation_s, "load_average_start": os.getloadavg()[0]}
    split = load_splits(DataOptions(data_path=str(data), num_workers=0, eval_images=EVAL_IMAGES), img_size, None)
    results["raw_pixels"] = raw_pixel_scores(split)
    print(f"raw pixels: {results['raw_pixels']}")

    runs = args.work_dir / f"{args.model}-seed{args.seed}"
    for method in [] if args.baselines_only else args.methods:
        out = runs / f"{method}-{args.epochs}ep"
        wall = energyvit("pretrain", "--method", method, "--data_path", str(data), "--model", args.model,
                         "--epochs", str(args.epochs), "--seed", str(args.seed), "--eval_images", str(EVAL_IMAGES),
                         "--num_workers", "1", "--grid_rows", "0", "--no-tensorboard", "--output_dir", str(out))
        summary = json.loads((out / "summary.json").read_text())
        results[method] = {"wall_s": wall, **probe(out / "checkpoint-last.pth", data, out / "probe-mean.json"),
                           "pretrain_summary_probe": {k: summary[k] for k in
                                                      ("probe_acc", "probe_acc_random_init", "probe_acc_raw_pixels")}}
        print(f"{method}: {results[method]}")
    if args.baselines_only:  # an untrained checkpoint gives `probe --random_init` the architecture
        ckpt = runs / "untrained.pth"
        runs.mkdir(parents=True, exist_ok=True)
        mean, std = split.pixel_stats()  # the input normalization pretrain would give it
        model = EnergyViT(model_config(args.model, in_chans=3, pixel_mean=mean, pixel_std=std))
        save_checkpoint(ckpt, {"model": model.state_dict(), "model_config": config_to_dict(model.cfg), "epoch": 0})
    else:
        ckpt = runs / f"{args.methods[0]}-{args.epochs}ep" / "checkpoint-last.pth"
    results["random_init"] = probe(ckpt, data, runs / "probe-mean-random-init.json", "--random_init", "--seed",
                                   str(args.seed))
    print(f"random init: {results['random_init']}")
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "calibration.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {runs / 'calibration.json'}")


if __name__ == "__main__":
    main()
