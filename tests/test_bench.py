"""Smoke tests of `energyvit bench` (energyvit/benchmark.py) at the tiniest sizes. No timing is asserted."""
import csv
import json

import pytest
import torch

from energyvit import benchmark as bench
from energyvit.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def smoke(tmp_path, **kw):
    cfg = bench.BenchConfig(preset="smoke", device="cpu", out=str(tmp_path), **kw)
    return bench.collect(cfg)


def test_rows_files_and_ratios(tmp_path):
    rows, meta, (csv_path, json_path) = smoke(
        tmp_path, attn_backends=("math-eager", "math-compiled", "sdpa-default", "xformers"),
        step_modes=("eager",), compile=True)
    by = {(r["suite"], r["backend"], r["op"], r["restore_steps"]): r for r in rows}
    # files: CSV columns and JSON rows are the same records
    with open(csv_path) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.FIELDS
        assert len(list(reader)) == len(rows)
    data = json.loads(json_path.read_text())
    assert data["rows"] == rows and "cpu" in csv_path.name
    for key in ("torch", "triton", "git_commit", "device_name", "mfu_reference", "telemetry"):
        assert data["meta"][key]
    for r in rows:  # versions and commit in every row; telemetry fields n/a on CPU
        assert r["torch"] == torch.__version__ and r["git_commit"]
        assert r["energy_j_per_image"] == "n/a" and r["sm_clock_mhz"] == "n/a"
    # eager math: every order runs, ratio 1 against itself
    for op in bench.ATTN_OPS:
        r = by[("attention", "math-eager", op, "")]
        assert r["status"] == "ok" and float(r["speedup_vs_eager"]) == 1.0
    # ratios are eager ms / row ms for the same op and shape
    for op in ("fwd", "bwd"):
        r, e = by[("attention", "math-compiled", op, "")], by[("attention", "math-eager", op, "")]
        assert r["status"] == "ok"
        assert float(r["speedup_vs_eager"]) == pytest.approx(float(e["ms"]) / float(r["ms"]), rel=2e-3)
    # second order refused by compiled math and by SDPA: reported with the error, not raised
    r = by[("attention", "math-compiled", "bwdbwd", "")]
    assert r["status"] == "unsupported" and "double backward" in r["error"]
    r = by[("attention", "sdpa-default", "bwdbwd", "")]
    assert r["status"] == "unsupported" and r["error"].startswith("RuntimeError")
    assert by[("attention", "sdpa-default", "fwd", "")]["status"] == "ok"
    # a missing optional package is a row, not an error
    x = by[("attention", "xformers", "fwd", "")]
    try:
        import xformers  # noqa: F401
    except ImportError:
        assert x["status"] == "unavailable" and "xformers" in x["error"]
    # steps: eager ok with MFU against the fp32 matmul of the run; compiled K=2 skipped in smoke
    e = by[("step", "eager", "train_step", 1)]
    assert e["status"] == "ok" and float(e["speedup_vs_eager"]) == 1.0 and float(e["mfu"]) > 0
    assert "fp32" in meta["mfu_reference"]
    table = bench.format_table(rows)
    assert "x eager" in table and "unsupported" in table


def test_fused_rows_through_interpreter(tmp_path):
    rows, _, _ = smoke(tmp_path, suites=("attention",), attn_backends=("math-eager", "fused"), save=False)
    fused = {r["op"]: r for r in rows if r["backend"] == "fused"}
    assert set(fused) == set(bench.ATTN_OPS)
    assert all(r["status"] in ("ok", "unavailable") for r in fused.values())
    assert all(r["speedup_vs_eager"] for r in fused.values() if r["status"] == "ok")


def test_telemetry_without_gpu():
    tel = bench.Telemetry(torch.device("cpu"))
    assert tel.handle is None and tel.reason == "no GPU"
    assert tel.measure(lambda: None, 0.01, 1, lambda: None)["energy_j_per_image"] == "n/a"


def test_model_flops_counts():
    from energyvit.model import model_config

    cfg = model_config("vit_base_patch16")
    one = bench.model_flops(cfg, 1, 1)
    assert bench.model_flops(cfg, 2, 3) == pytest.approx(6 * one)
    # ViT-B/16 forward is about 17.5 GMACs = 35 GFLOPs; one step counts it about 6x
    assert 6 * 33e9 < one < 6 * 37e9 * 1.2


def test_cli_quick_attention_only(tmp_path, capsys):
    rc = main(["bench", "--quick", "--no_compile", "--suites", "matmul,attention", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "x eager" in out and "math-eager" in out and "skipped" in out
    assert len(list(tmp_path.glob("bench-quick-cpu-*.csv"))) == 1
    assert main(["bench", "--suites", "nope", "--out", str(tmp_path)]) == 2
