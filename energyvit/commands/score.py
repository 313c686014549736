"""`energyvit score`: how unusual each image is to a pretrained energy model, and, given images
known to be in- and out-of-distribution, how well each score tells them apart.

Scores (higher = more unusual): `energy`, E(x); `restoration`, the error of restoring each patch
from the rest of its image (energyvit.scoring); with --mae, MAE's reconstruction error through
the same masks; with a reference set, the frozen-feature baselines `knn`, `mahalanobis` and the
raw-pixel `pixels` distance (energyvit.evaluation.detection).

Three ways to give images:
- PATH...: image files and folders (or --data_path D: D's held-out images): a CSV of scores;
- --in A --out B: two sets (folders, or `digits`): the CSV and AUROC, AUPR and FPR at 95% TPR of
  every score, out-of-distribution images as positives;
- --data_path D --one_class C: the one-class protocol: a model pretrained with `--one_class C`
  scores D's held-out images, class C in-distribution and every other class out; the reference
  set defaults to class C's training images.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from energyvit.checkpoint import atomic_write, load_model, save_json
from energyvit.commands.args import CliError, add, add_options, build_options, device_flag
from energyvit.data.image_sets import ScoreSet, dataset_set, files_set, named_set
from energyvit.data.splits import DataOptions, class_label, load_splits
from energyvit.evaluation.anomaly import Reference, ScoreOptions, SetScores, reference_features, score_set
from energyvit.evaluation.detection import detection_metrics
from energyvit.methods.mae import load_mae
from energyvit.visualize import heatmap_strip, save_png

HELP = "score images by energy and restoration; AUROC of in- vs out-of-distribution sets"
PROG = "energyvit score"
REFERENCE_IMAGES = 10000  # reference images the feature baselines keep at most


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="an energy checkpoint (`pretrain`, or `export --full`)")
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders to score")
    add_options(p, DataOptions, only=("data_path", "one_class", "num_workers", "max_image_pixels"),
                helps={"one_class": "score the held-out images of --data_path (default: the embedded digits) with "
                                    "this class (name or index) in-distribution and the others out"})
    add(p, "--in", dest="in_set", default=None, metavar="SET", help="in-distribution images: a folder, or digits (their "
        "held-out images)")
    add(p, "--out", dest="out_set", default=None, metavar="SET", help="out-of-distribution images: a folder, or digits "
        "(their held-out images)")
    add(p, "--reference", default=None, metavar="SET", help="training images of the feature baselines and the energy "
        "typicality (a folder, or digits: their training images; default with --one_class: class C's training "
        "images; otherwise none, and no baselines)")
    add(p, "--mae", default=None, metavar="CHECKPOINT", help="a `pretrain --method mae` checkpoint: add MAE's "
        "reconstruction error as a score")
    add_options(p, ScoreOptions)
    add(p, "--per_patch", action="store_true", help="also write every patch's energy and restoration error to the CSV")
    add(p, "--heatmaps", default=None, metavar="DIR", help="one PNG per image: the image, its restoration-error map "
        "and (norm or linear readout) its energy map")
    add(p, "--csv", default=None, help="per-image scores (default: scores.csv beside the checkpoint)")
    add(p, "--output", default=None, help="metrics JSON, {score: {auroc, aupr, fpr95, ...}} (default: "
        "score-metrics.json beside the checkpoint; only with in and out sets)")
    add(p, "--device", type=device_flag, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")


def _sets(args: argparse.Namespace, size: int, channels: int, data_options: DataOptions
          ) -> tuple[dict[str, ScoreSet], ScoreSet | None]:
    """The named sets to score ({"": all} or {"in": ..., "out": ...}) and the reference set."""
    one_class = args.one_class is not None
    given = [bool(args.paths), args.in_set is not None or args.out_set is not None,
             bool(args.data_path) and not one_class, one_class]
    if sum(given) != 1:
        raise CliError(f"{PROG}: error: give one of: PATH..., --in SET --out SET, --data_path DIR (its held-out "
                       "images), or --one_class C (of --data_path DIR, or of the embedded digits)")
    reference = named_set(args.reference, size, channels, split="train") if args.reference else None
    if args.paths:
        return {"": files_set(args.paths, size, channels)}, reference
    if not args.data_path and not one_class:
        if args.in_set is None or args.out_set is None:
            raise CliError(f"{PROG}: error: --in and --out go together")
        return {"in": named_set(args.in_set, size, channels), "out": named_set(args.out_set, size, channels)}, reference
    data = load_splits(replace(data_options, one_class=None), size, channels, gray_to_rgb=True)  # every class
    source = args.data_path or "digits"
    held = dataset_set(data.held_out_all, source)
    if not one_class:
        return {"": held}, reference
    label = class_label(data, args.one_class)
    own = [i for i, y in enumerate(held.labels) if y == label]
    other = [i for i, y in enumerate(held.labels) if y != label]
    if not own or not other:
        raise ValueError(f"{data.description}: held-out images of class {args.one_class!r}: {len(own)}, of the "
                         f"others: {len(other)}; both are needed")
    if reference is None:
        train = dataset_set(data.train_plain, source)
        reference = train.subset([i for i, y in enumerate(train.labels) if y == label][:REFERENCE_IMAGES])
    return {"in": held.subset(own), "out": held.subset(other)}, reference


def write_csv(path: Path, results: dict[str, SetScores], per_patch: bool) -> None:
    first = next(iter(results.values()))
    score_names = list(first.scores)
    header = ["path", "set", *score_names]
    if per_patch:
        header += [f"{m}_patch{i}" for m, t in first.maps.items() for i in range(t[0].numel())]
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    for set_name, r in results.items():
        for i, name in enumerate(r.names):
            row = [name, set_name, *(f"{r.scores[s][i].item():.6g}" for s in score_names)]
            if per_patch:
                row += [f"{v:.6g}" for t in r.maps.values() for v in t[i].flatten().tolist()]
            writer.writerow(row)
    atomic_write(path, lambda f: f.write(text.getvalue().encode("utf-8")))


def write_heatmaps(folder: Path, results: dict[str, SetScores], images: dict[str, ScoreSet]) -> int:
    """One PNG per image; each map is scaled by its maximum over every scored image, so colors compare."""
    scales = {k: max(r.maps[k].max().item() for r in results.values()) for k in next(iter(results.values())).maps}
    written = 0
    for set_name, r in results.items():
        lookup = {n: i for i, n in enumerate(images[set_name].names)}
        for i, name in enumerate(r.names):
            image = images[set_name][lookup[name]][0]
            strip = heatmap_strip(image.float() / (255.0 if image.dtype == torch.uint8 else 1.0),
                                  [r.maps[k][i] for k in scales], list(scales.values()))
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{set_name + '-' if set_name else ''}{written:06d}-{Path(name).stem}")
            save_png(strip, folder / f"{stem}.png")
            written += 1
    return written


def run(args: argparse.Namespace) -> dict:
    data_options = build_options(DataOptions, args, PROG)
    options = build_options(ScoreOptions, args, PROG)
    Image.MAX_IMAGE_PIXELS = data_options.max_image_pixels
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_model(args.checkpoint, need_energy=True)
    model.to(device)
    fill = json.loads(meta.get("mask_fill", '"noise"'))  # what the energy was trained on (noise before --mask_fill)
    mae = load_mae(args.mae).to(device) if args.mae else None
    if mae is not None and mae.encoder.cfg.img_size != model.cfg.img_size:
        raise ValueError(f"--mae {args.mae} takes {mae.encoder.cfg.img_size}px images, {args.checkpoint} "
                         f"{model.cfg.img_size}px: score with models of one size")
    sets, reference_set = _sets(args, model.cfg.img_size, model.cfg.in_chans, data_options)
    workers = data_options.num_workers or 0
    reference: Reference | None = None
    if reference_set is not None:
        reference = reference_features(model, reference_set, options.batch_size, workers)
    results = {name: score_set(images, model, fill, options, workers, mae, reference) for name, images in sets.items()}
    out_dir = Path(args.checkpoint).parent
    csv_path = Path(args.csv) if args.csv else out_dir / "scores.csv"
    write_csv(csv_path, results, args.per_patch)
    skipped = sum(r.skipped for r in results.values())
    counts = ", ".join(f"{len(r.names)} {name or 'images'}" for name, r in results.items())
    print(f"{PROG}: scored {counts}" + (f" ({skipped} unreadable, skipped)" if skipped else "")
          + f" with {', '.join(next(iter(results.values())).scores)}; wrote {csv_path}")
    if args.heatmaps:
        print(f"wrote {write_heatmaps(Path(args.heatmaps), results, sets)} heatmaps to {args.heatmaps}")
    summary = {"csv": str(csv_path), "skipped": skipped}
    if "in" in results:
        r_in, r_out = results["in"], results["out"]
        speed = {k: (len(r_in.names) + len(r_out.names)) / (r_in.seconds[k] + r_out.seconds[k])
                 for k in r_in.seconds if r_in.seconds[k] + r_out.seconds[k] > 0}
        metrics = {name: {**detection_metrics(r_in.scores[name], r_out.scores[name]), "images_per_s": speed.get(name),
                          "n_in": len(r_in.names), "n_out": len(r_out.names)} for name in r_in.scores}
        output = Path(args.output) if args.output else out_dir / "score-metrics.json"
        save_json(output, metrics)
        print(f"  {'score':<18} {'AUROC':>7} {'AUPR':>7} {'FPR95':>7} {'images/s':>9}")
        for name, m in metrics.items():
            print(f"  {name:<18} {m['auroc']:>7.4f} {m['aupr']:>7.4f} {m['fpr95']:>7.4f} "
                  f"{m['images_per_s'] or float('nan'):>9.1f}")
        print(f"wrote {output}")
        summary["metrics"] = metrics
    elif args.output:
        print(f"{PROG}: note: --output holds in- vs out-of-distribution metrics; without --in/--out or --one_class "
              "there are none", file=sys.stderr)
    return summary
