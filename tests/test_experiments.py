"""Smoke run of the method comparison (experiments/compare_methods.py) on a tiny shapes set: every
method, the equal-time MAE run, random init and raw pixels through every classifier."""
import json
import subprocess
import sys
from pathlib import Path

from energyvit.data import shapes

ROOT = Path(__file__).resolve().parents[1]


def test_compare_methods_runs_every_method_and_metric(tmp_path):
    data = tmp_path / "shapes"
    shapes.generate(data, train_per_class=8, val_per_class=3, size=8)
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(ROOT / "experiments" / "compare_methods.py"), "--data_path", str(data),
           "--model", "vit_pico_patch2", "--epochs", "1", "--seeds", "0", "--config", "energy=",
           "--config", "head=--energy_head_depth 1 --energy_head_dim 16", "--common", "--batch_size 20",
           "--labels_per_class", "2", "--draws", "1", "--finetune_epochs", "1", "--work_dir", str(tmp_path / "runs"),
           "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert set(summary) == {"energy", "head", "mae", "mae_time", "random_init", "raw_pixels"}
    for name in ("energy", "head", "mae", "mae_time", "random_init"):
        assert {"linear", "knn", "few_labels", "finetune"} <= set(summary[name]), name
        assert all(0.0 <= summary[name][k]["mean"] <= 1.0 for k in ("linear", "knn", "few_labels", "finetune"))
    assert summary["mae_time"]["epochs"]["mean"] >= 1 and summary["energy"]["train_s"]["mean"] > 0
    assert "finetune" not in summary["raw_pixels"] and result["seeds"] == [0]
