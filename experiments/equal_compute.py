"""How far each pretraining run is from MAE at equal compute: every run of experiments/compare_methods.py
result files (one data set and model, any epochs) against the MAE run of the most training FLOPs
that does not exceed its own, seed by seed and metric by metric.

    python experiments/equal_compute.py experiments/results/digits_*.json --out gaps.json

A run is a method (its configuration name, without the `_eE` of a budget; `mae_time` and `mae_eE` are
MAE) at a number of epochs. Rows of one run and seed found in several files are one row if the
scores both have agree (a run copied into another file, or MAE run again beside other
configurations) and an error otherwise; keys only one has (fine-tuning) are kept. Each cell is the
mean over seeds and, in brackets, the paired difference from that MAE run in points (mean and
sample standard deviation of the per-seed differences, over the seeds both have); the last column
gives the MAE run's epochs and its FLOPs as a share of the run's. MAE is given no more compute than
the run, so a negative difference is a loss at equal compute; a tie against an MAE run of a
fraction of the FLOPs is not a tie at equal compute.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from energyvit.benchmark import mean_std

METRICS = ("linear", "knn", "few_labels", "finetune")
HEADERS = ("linear", "kNN", "few labels", "fine-tuned")


def method_of(name: str, epochs: int) -> str:
    base = name[: -len(f"_e{epochs}")] if name.endswith(f"_e{epochs}") else name
    return "mae" if base == "mae_time" else base


def load_runs(files: list[Path]) -> tuple[str, dict]:
    """{(method, epochs): {seed: row}} over the files, which must share data and model."""
    runs: dict[tuple[str, int], dict[int, dict]] = {}
    setting = set()
    for f in files:
        try:
            part = json.loads(f.read_text())
            setting.add((part["data"], part["model"]))
            named_rows, file_seeds = part["runs"].items(), part["seeds"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SystemExit(f"{f}: not a result file of experiments/compare_methods.py ({type(e).__name__}: {e})")
        for name, rows in named_rows:
            # a merged file lists the seeds of each configuration, a file of one run all of them
            seeds = file_seeds[name] if isinstance(file_seeds, dict) else file_seeds
            for seed, row in zip(seeds, rows):
                if "epochs" not in row:
                    continue  # random init and raw pixels: no training
                if "train_flops" not in row:
                    raise SystemExit(f"{f}: run {name} has no train_flops (a file from before FLOPs were counted)")
                key = (method_of(name, row["epochs"]), row["epochs"])
                known = runs.setdefault(key, {}).setdefault(seed, {})
                clash = [m for m in METRICS if m in known and m in row and known[m] != row[m]]
                if clash:
                    raise SystemExit(f"{f}: {name} seed {seed} at {row['epochs']} epochs differs from another file "
                                     f"in {clash}")
                for k, v in row.items():
                    known.setdefault(k, v)  # the first file's training time, the scores agree
    if len(setting) != 1:
        raise SystemExit(f"the files differ in data or model: {sorted(setting)}")
    (data, model), = setting
    return f"{data}, {model}", runs


def mae_reference(runs: dict, flops: float, seed: int, metric: str) -> tuple[int, float, float] | None:
    """(epochs, FLOPs, score) of seed's MAE run with `metric` and the most FLOPs not above `flops` (1e-9
    relative over allowed, for rounding). Per seed: an equal-time MAE run has other epochs per seed."""
    fits = [(rows[seed]["train_flops"], epochs, rows[seed][metric]) for (method, epochs), rows in runs.items()
            if method == "mae" and seed in rows and metric in rows[seed]
            and rows[seed]["train_flops"] <= flops * (1 + 1e-9)]
    if not fits:
        return None
    flops, epochs, score = max(fits)
    return epochs, flops, score


def cell(runs: dict, key: tuple[str, int], metric: str) -> tuple[str, dict | None, set[tuple[int, float]]]:
    """The mean score over seeds, with its paired difference from MAE (and the MAE runs used)."""
    rows = runs[key]
    values = [r[metric] for r in rows.values() if metric in r]
    if not values:
        return "-", None, set()
    text = f"{statistics.fmean(values):.3f}"
    refs = {} if key[0] == "mae" else {s: mae_reference(runs, r["train_flops"], s, metric)
                                        for s, r in rows.items() if metric in r}
    diffs = [100 * (rows[s][metric] - ref[2]) for s, ref in refs.items() if ref]
    if not diffs:
        return text, None, set()
    gap = mean_std(diffs)
    return f"{text} ({gap['mean']:+.1f} ± {gap['std']:.1f})", gap, {ref[:2] for ref in refs.values() if ref}


def mae_text(used: set[tuple[int, float]], flops: float) -> str:
    """MAE's epochs and its share of the run's FLOPs, e.g. '50 ep, 0.50x' (a range over seeds)."""
    epochs, share = sorted(e for e, _ in used), sorted(f / flops for _, f in used)
    text = f"{epochs[0]} ep" if epochs[0] == epochs[-1] else f"{epochs[0]}-{epochs[-1]} ep"
    lo, hi = f"{share[0]:.2f}", f"{share[-1]:.2f}"
    return f"{text}, {lo}x" if lo == hi else f"{text}, {lo}-{hi}x"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="also write the table's numbers as JSON here")
    args = p.parse_args()
    setting, runs = load_runs(args.files)
    order = sorted(runs, key=lambda k: (k[0] != "mae", k[0], next(iter(runs[k].values()))["train_flops"]))
    print(f"{setting}: mean over seeds (paired difference from MAE at equal or less compute, points)\n")
    print("| method | epochs | seeds | TFLOP | train s | " + " | ".join(HEADERS) + " | MAE run, share of FLOPs |")
    print("| --- " * (6 + len(HEADERS)) + "|")
    table = []
    for key in order:
        rows = runs[key]
        flops = next(iter(rows.values()))["train_flops"]
        cells, gaps, mae_runs = zip(*(cell(runs, key, m) for m in METRICS))
        times = [r["train_s"] for r in rows.values() if "train_s" in r]
        train_s = statistics.fmean(times) if times else float("nan")
        used = [(h, r) for h, r in zip(HEADERS, mae_runs) if r]
        ref_text = "-" if key[0] == "mae" else mae_text(used[0][1], flops) if used else "none at this compute"
        ref_text += "".join(f"; {h}: {mae_text(e, flops)}" for h, e in used[1:] if e != used[0][1])
        print(f"| {key[0]} | {key[1]} | {len(rows)} | {flops / 1e12:.2f} | {train_s:.0f} | " + " | ".join(cells)
              + f" | {ref_text} |")
        table.append({"method": key[0], "epochs": key[1], "seeds": sorted(rows), "train_flops": flops,
                      "gap_points": dict(zip(METRICS, gaps)),
                      "mae_epochs": {m: sorted({e for e, _ in r}) for m, r in zip(METRICS, mae_runs) if r}})
    if args.out:
        args.out.write_text(json.dumps({"setting": setting, "files": [str(f) for f in args.files], "runs": table},
                                       indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
