"""Merge result files of experiments/compare_methods.py run in parts (other seeds, other
configurations, on the same data, model and epochs) into one file with the summary over all runs.

    python experiments/merge_results.py A.json B.json ... --out merged.json

A configuration that appears in several files keeps every seed's row. A seed that appears twice
for one configuration counts once if both rows have the same scores (a deterministic baseline run
again, such as MAE beside each batch of configurations), and is an error otherwise. The merged file lists its sources
(file, commit, date, command; a merged file given again keeps its own sources) and which seeds
each configuration has. From files of runs with budgets (`--budgets`, `--mae_budgets`) the merged
file has each method's curve over every budget any file has (`curve_budgets`), each point over the
seeds that ran it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from energyvit.benchmark import mean_std

KEYS = ("linear", "knn", "few_labels", "finetune", "train_s", "train_flops", "epochs")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()
    parts = [json.loads(f.read_text()) for f in args.files]
    setting = {(r["data"], r["model"], r["epochs"]) for r in parts}
    if len(setting) != 1:
        raise SystemExit(f"the files differ in data, model or epochs: {sorted(setting)}")
    runs: dict[str, list[dict]] = {}
    seeds: dict[str, list[int]] = {}
    for part in parts:
        for name, rows in part["runs"].items():
            # a merged file lists the seeds of each configuration, a file of one run all of them
            part_seeds = part["seeds"][name] if isinstance(part["seeds"], dict) else part["seeds"]
            for seed, row in zip(part_seeds, rows):
                if seed in seeds.setdefault(name, []):
                    first = runs[name][seeds[name].index(seed)]
                    if any(first[k] != row[k] for k in ("linear", "knn", "few_labels")):
                        raise SystemExit(f"{name} seed {seed} appears twice with different scores")
                    continue
                seeds[name].append(seed)
                runs.setdefault(name, []).append(row)
    summary = {name: {k: mean_std([r[k] for r in rows]) for k in KEYS if all(k in r for r in rows)}
               for name, rows in runs.items()}
    data, model, epochs = setting.pop()
    # a run of budget E of a curve's method is named METHOD_eE (compare_methods.run_name)
    curve_budgets = {name: sorted(int(run[len(name) + 2:]) for run in summary
                                  if run.startswith(f"{name}_e") and run[len(name) + 2:].isdigit())
                     for name in sorted({name for part in parts for name in part.get("curves") or {}})}
    curves = {name: [summary[f"{name}_e{b}"] for b in budgets] for name, budgets in curve_budgets.items()}
    merged = {"data": data, "model": model, "epochs": epochs, "seeds": seeds, "summary": summary,
              "curve_budgets": curve_budgets, "curves": curves, "runs": runs,
              "sources": [source for f, r in zip(args.files, parts) for source in r.get("sources") or
                          [{"file": f.name, "commit": r["commit"], "date": r["date"], "command": r["command"],
                            "machine": r["machine"]}]]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(merged, indent=2) + "\n")
    for name, agg in summary.items():
        cells = "  ".join(f"{k} {agg[k]['mean']:.4f}±{agg[k]['std']:.4f}" for k in ("linear", "knn", "few_labels")
                          if k in agg)
        print(f"{name:<16} seeds {seeds[name]}  {cells}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
