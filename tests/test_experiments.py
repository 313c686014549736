"""Smoke runs of the method comparison (experiments/compare_methods.py) on a tiny shapes set: every
method, the equal-time MAE run, random init and raw pixels through every classifier; budgets of
epochs as curves against training FLOPs; merging result files run in parts; every run against MAE at equal compute."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from energyvit.data import shapes

ROOT = Path(__file__).resolve().parents[1]


def run_script(monkeypatch, name: str, *argv) -> None:
    """experiments/NAME.py's main in this process (a subprocess imports torch again: seconds each)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *map(str, argv)])
    module.main()


def tiny_shapes(tmp_path: Path) -> Path:
    data = tmp_path / "shapes"
    shapes.generate(data, train_per_class=8, val_per_class=3, size=8)
    return data


def test_compare_methods_runs_every_method_and_metric(tmp_path):
    data = tiny_shapes(tmp_path)
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


def test_compare_methods_budgets_give_curves_against_training_flops(tmp_path, monkeypatch, capsys):
    """Each budget is its own run; its FLOPs are its optimizer steps x the step's model FLOPs, so
    twice the epochs is twice the FLOPs, and an energy image costs more than an MAE image. MAE may
    have budgets of its own (--mae_budgets)."""
    data = tiny_shapes(tmp_path)
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(ROOT / "experiments" / "compare_methods.py"), "--data_path", str(data),
           "--model", "vit_pico_patch2", "--budgets", "1", "2", "--mae_budgets", "2", "4", "--seeds", "0",
           "--common", "--batch_size 20",
           "--labels_per_class", "2", "--draws", "1", "--work_dir", str(tmp_path / "runs"), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"energy_e1", "energy_e2", "mae_e2", "mae_e4", "random_init", "raw_pixels"}
    curves = result["curves"]
    assert set(curves) == {"energy", "mae"} and (result["budgets"], result["mae_budgets"]) == ([1, 2], [2, 4])
    for points, epochs in ((curves["energy"], [1, 2]), (curves["mae"], [2, 4])):
        assert [p["epochs"]["mean"] for p in points] == epochs
        assert points[1]["train_flops"]["mean"] == 2 * points[0]["train_flops"]["mean"] > 0
        assert 0.0 <= points[0]["linear"]["mean"] <= 1.0
    assert curves["energy"][1]["train_flops"]["mean"] > curves["mae"][0]["train_flops"]["mean"]  # 2 epochs each
    for flag in ("--budgets", "--mae_budgets"):
        with pytest.raises(SystemExit) as exit_:
            run_script(monkeypatch, "compare_methods", *cmd[2:-2], flag, "2", "2", "--out", out)
        assert exit_.value.code == 2 and flag in capsys.readouterr().err


def _part(seed: int, linear: dict, budgets=None) -> dict:
    """A compare_methods result file of one seed, with the given linear-probe score per run."""
    runs = {name: [{"linear": v, "knn": v / 2, "few_labels": v / 3, "train_flops": 10.0 * (i + 1)}]
            for i, (name, v) in enumerate(linear.items())}
    part = {"data": "d", "model": "m", "epochs": 1, "seeds": [seed], "runs": runs, "commit": "c", "date": "x",
            "command": "cmd", "machine": {}}
    if budgets:
        part.update(budgets=budgets[0], mae_budgets=budgets[1], curves={"energy": [], "mae": []})
    return part


def merge(monkeypatch, *argv) -> None:
    run_script(monkeypatch, "merge_results", *argv)


def test_merge_results_pools_seeds_and_rebuilds_curves(tmp_path, monkeypatch):
    budgets = ([1, 2], [2, 4])
    names = ("energy_e1", "energy_e2", "mae_e2", "mae_e4")
    files = []
    for seed, base in ((0, 0.1), (1, 0.3)):
        files.append(tmp_path / f"s{seed}.json")
        files[-1].write_text(json.dumps(_part(seed, {n: base + i / 10 for i, n in enumerate(names)}, budgets)))
    out = tmp_path / "merged.json"
    merge(monkeypatch, *files, "--out", out)
    merged = json.loads(out.read_text())
    assert merged["seeds"]["mae_e4"] == [0, 1] and merged["curve_budgets"] == {"energy": [1, 2], "mae": [2, 4]}
    assert merged["summary"]["energy_e2"]["linear"]["mean"] == pytest.approx(0.3)
    assert [p["linear"]["mean"] for p in merged["curves"]["mae"]] == pytest.approx([0.4, 0.5])
    assert [p["train_flops"]["mean"] for p in merged["curves"]["energy"]] == [10.0, 20.0]
    # the same seed again: counted once if its scores agree, an error if they differ
    merge(monkeypatch, *files, files[0], "--out", out)
    assert json.loads(out.read_text())["seeds"]["energy_e1"] == [0, 1]
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps(_part(0, {n: 0.9 for n in names}, budgets)))
    with pytest.raises(SystemExit, match="appears twice with different scores"):
        merge(monkeypatch, files[0], clash, "--out", out)
    # a file with another MAE budget extends MAE's curve; each point keeps the seeds that ran it
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_part(2, {"energy_e1": 0.5, "mae_e8": 0.7}, ([1], [8]))))
    merge(monkeypatch, *files, other, "--out", out)
    merged = json.loads(out.read_text())
    assert merged["curve_budgets"] == {"energy": [1, 2], "mae": [2, 4, 8]}
    assert merged["seeds"]["energy_e1"] == [0, 1, 2] and merged["seeds"]["mae_e8"] == [2]
    assert merged["curves"]["energy"][0]["linear"]["mean"] == pytest.approx(0.3)


def _runs_file(path: Path, seeds: list[int], runs: dict, data: str = "d") -> Path:
    """A result file: runs maps a run's name to (epochs, FLOPs, one linear score per seed, extra keys)."""
    rows = {name: [{"epochs": e, "train_flops": f, "linear": v, "knn": v, "few_labels": v, **extra} for v in scores]
            for name, (e, f, scores, extra) in runs.items()}
    rows["random_init"] = [{"linear": 0.1, "knn": 0.1, "few_labels": 0.1} for _ in seeds]
    path.write_text(json.dumps({"data": data, "model": "m", "epochs": 1, "seeds": seeds, "runs": rows}))
    return path


def test_equal_compute_pairs_each_run_with_mae_at_no_more_flops(tmp_path, monkeypatch, capsys):
    curve = _runs_file(tmp_path / "curve.json", [0, 1], {
        "mae_e10": (10, 1.0, [0.50, 0.60], {"finetune": 0.9}), "mae_e40": (40, 4.0, [0.70, 0.80], {}),
        "energy_e10": (10, 4.5, [0.55, 0.70], {"finetune": 0.8})})
    # the same energy run copied into another file, with another seed, and an option of no more FLOPs than MAE's least
    other = _runs_file(tmp_path / "other.json", [1, 2], {
        "energy": (10, 4.5, [0.70, 0.40], {}), "cheap": (5, 0.5, [0.9, 0.9], {}), "mae": (10, 1.0, [0.60, 0.30], {})})
    out = tmp_path / "gaps.json"
    run_script(monkeypatch, "equal_compute", curve, other, "--out", out)
    table = {(r["method"], r["epochs"]): r for r in json.loads(out.read_text())["runs"]}
    energy = table[("energy", 10)]
    assert energy["seeds"] == [0, 1, 2] and energy["mae_epochs"] == {"linear": [10, 40], "knn": [10, 40],
                                                                     "few_labels": [10, 40], "finetune": [10]}
    # linear: seeds 0 and 1 against MAE 40 epochs (4.0 of 4.5 FLOPs), seed 2 against its only MAE run
    assert energy["gap_points"]["linear"]["mean"] == pytest.approx(100 * (-0.15 - 0.10 + 0.10) / 3)
    assert energy["gap_points"]["finetune"]["mean"] == pytest.approx(-10.0)
    printed = capsys.readouterr().out
    assert "| 10-40 ep, 0.22-0.89x; fine-tuned: 10 ep, 0.22x |" in printed  # MAE's epochs, its share of FLOPs
    assert table[("cheap", 5)]["gap_points"]["linear"] is None and "none at this compute" in printed
    assert table[("mae", 40)]["gap_points"]["linear"] is None
    clash = _runs_file(tmp_path / "clash.json", [0], {"energy": (10, 4.5, [0.56], {})})
    with pytest.raises(SystemExit, match="energy seed 0 at 10 epochs differs from another file in"):
        run_script(monkeypatch, "equal_compute", curve, clash)
    with pytest.raises(SystemExit, match="differ in data or model"):
        run_script(monkeypatch, "equal_compute", curve, _runs_file(tmp_path / "x.json", [0], {}, data="e"))
    (tmp_path / "bad.json").write_text("{}")
    for bad in (tmp_path / "missing.json", tmp_path / "bad.json"):
        with pytest.raises(SystemExit, match=f"{bad.name}: not a result file of experiments/compare_methods.py"):
            run_script(monkeypatch, "equal_compute", curve, bad)
    old = json.loads(curve.read_text())
    del old["runs"]["mae_e10"][0]["train_flops"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="run mae_e10 has no train_flops"):
        run_script(monkeypatch, "equal_compute", tmp_path / "old.json")
