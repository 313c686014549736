"""Smoke tests of `energyvit bench` (the energyvit.benchmark package) at the tiniest sizes. No timing is asserted."""
import csv
import json
import os

import pytest
import torch

from energyvit import benchmark as bench
from energyvit.benchmark import cases_step
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


def test_launch_rows_count_eager_ops_and_compare_modes(tmp_path):
    """Eager: the aten ops one step dispatches that launch a kernel (views and allocations do not);
    K=2 about doubles K=1; MAE once per model; cuda-graphs modes and the graphed optimizer are
    unavailable rows on the CPU."""
    rows, _, _ = smoke(tmp_path, suites=("launches", "optimizer"), step_modes=("eager", "cuda-graphs", "mae"),
                       save=False)
    by = {(r["suite"], r["backend"], r["restore_steps"]): r for r in rows}
    k1, k2 = by[("launches", "eager", 1)], by[("launches", "eager", 2)]
    assert k1["status"] == "ok" and k1["launches_vs_eager"] == "1.000" and "TorchDispatchMode" in k1["timer"]
    assert 1.8 < int(k2["launches"]) / int(k1["launches"]) < 2.2
    total = int(k1["launch_detail"].split()[1].rstrip(","))
    assert int(k1["launches"]) < total  # views launch nothing
    assert by[("launches", "mae", "")]["status"] == "ok" and by[("launches", "mae", "")]["launches"]
    for key in (("launches", "cuda-graphs", 1), ("optimizer", "cuda-graphs", "")):
        assert by[key]["status"] == "unavailable" and "CUDA" in by[key]["error"]
    assert by[("optimizer", "eager", "")]["status"] == "ok" and float(by[("optimizer", "eager", "")]["ms"]) > 0
    assert not any(r["suite"] == "step" for r in rows)


def test_kernel_accounting():
    assert bench.kernels_per_op("aten::mm") == 1 and bench.kernels_per_op("aten::mul.Tensor") == 1
    for op in ("aten::view", "aten::transpose.int", "aten::detach", "aten::_unsafe_view.default", "aten::empty_strided"):
        assert bench.kernels_per_op(op) == 0, op
    assert bench.kernels_per_op("energyvit::attn_packed_bwdbwd") == 2  # its two Triton kernels
    assert bench.kernel_category("graph_0_cpp_fused__softmax_backward_data_mul_view_16") == "softmax"
    assert bench.kernel_category("triton_red_fused_add_native_layer_norm_backward_3") == "layer_norm"
    assert bench.kernel_category("graph_0_cpp_fused_clone_permute_select_transpose_view_2") == "layout"
    assert bench.kernel_category("triton_poi_fused_add_mul_sum_7") == "other"
    assert bench.kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32") == "cuBLAS/cuDNN"
    assert bench.kernel_category("_attn_bwdbwd_q_kernel") == "fused attention"
    assert bench.kernels_per_op("energyvit::ln_bwdbwd") == 2 and bench.kernels_per_op("energyvit::gelu_bwdbwd") == 1
    assert bench.kernel_category("_ln_bwdbwd_kernel") == bench.kernel_category("_col_sum_kernel") == "fused layernorm/gelu"


def test_compiled_launches_are_counted_from_inductor_kernels(tmp_path):
    """The compile suite compiles the step without running it; the launches row then loads that
    graph from Inductor's cache. The compiled step (K=1, compiled with the kernel profile on) is
    counted as Inductor kernels + extern calls + ops outside the graph, and launches fewer than eager."""
    rows, _, _ = smoke(tmp_path, suites=("compile", "launches"), step_modes=("eager", "compiled"), save=False)
    r = next(r for r in rows if r["backend"] == "compiled" and r["restore_steps"] == 1 and r["suite"] == "launches")
    if r["status"] != "ok":
        pytest.skip(f"compiled step unavailable here: {r['error'] or r['note']}")
    compiled = next(c for c in rows if c["suite"] == "compile" and c["restore_steps"] == 1)
    assert compiled["status"] == "ok" and float(compiled["first_call_s"]) > 0
    assert "Inductor cache: " in compiled["note"]
    assert "Inductor cache: 1 hit(s), 0 miss(es)" in r["note"]  # the compile row's graph, not a new one
    assert [c["status"] for c in rows if c["suite"] == "compile" and c["restore_steps"] == 2] == ["skipped"]
    assert "Inductor kernels" in r["launch_detail"] and "aten::mm" in r["launch_detail"]
    assert 0 < float(r["launches_vs_eager"]) < 0.6


def test_compile_only_never_runs_the_step():
    """compile_only: the step is compiled (it takes the compiled path, no fallback) and CompiledOnly
    is raised where the graph would run: no parameter gets a gradient."""
    seen = {}
    real = cases_step.compiled_train_step

    def keep(model, *args, **kwargs):
        seen["model"] = model
        return real(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cases_step, "compiled_train_step", keep)
        with pytest.raises(bench.CompiledOnly):
            bench.step_case("compiled", "vit_pico_patch2", None, 1, 2, torch.device("cpu"), None,
                            kernel_profile=True, compile_only=True)
    assert all(p.grad is None for p in seen["model"].parameters())


def test_git_commit_of_a_copy_without_git(tmp_path, monkeypatch):
    monkeypatch.setenv("ENERGYVIT_GIT_COMMIT", "abc123")
    assert bench.git_commit(tmp_path) == "abc123 (ENERGYVIT_GIT_COMMIT)"
    monkeypatch.delenv("ENERGYVIT_GIT_COMMIT")
    assert "abc123" not in bench.git_commit(tmp_path)


def test_telemetry_without_gpu():
    tel = bench.Telemetry(torch.device("cpu"))
    assert tel.handle is None and tel.reason == "no GPU"
    assert tel.measure(lambda: None, 0.01, 1, lambda: None)["energy_j_per_image"] == "n/a"


def test_cli_quick_attention_only(tmp_path, capsys):
    rc = main(["bench", "--quick", "--no_compile", "--suites", "matmul,attention", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "x eager" in out and "math-eager" in out and "skipped" in out
    assert len(list(tmp_path.glob("bench-quick-cpu-*.csv"))) == 1
    assert main(["bench", "--suites", "nope", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--step_modes", "eager,warp-speed", "--out", str(tmp_path)]) == 2
    capsys.readouterr()
    for bad in ("no_such_option=1", "combo_kernels", "combo_kernels=yes"):
        assert main(["bench", "--inductor", bad, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--inductor" in err, err


def test_data_suite_rows_through_the_cli(tmp_path, capsys):
    """`bench --quick --suites data`: one row per (op, backend, dtype) of the input pipeline, in the
    CSV and JSON as other suites' rows; the reduced-decode rows say how far their pixels are from
    the full decode; pinning is a CUDA-only row."""
    assert main(["bench", "--quick", "--suites", "data", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "decode+train_aug" in out and "img/s" in out
    (json_path,) = tmp_path.glob("bench-quick-cpu-*.json")
    rows = json.loads(json_path.read_text())["rows"]
    assert {r["suite"] for r in rows} == {"data"}
    by = {(r["op"], r["backend"], r["dtype"]): r for r in rows}
    expected = {("decode+train_aug", b, d) for b in ("pillow", "pillow+draft") for d in ("uint8", "float32")} | {
        ("decode+eval", "pillow", "uint8"), ("decode+eval", "pillow+draft", "uint8"),
        ("decode+train_aug", "simplejpeg", "uint8"),
        *{(op, "default_collate", d) for op in ("collate", "collate+pin") for d in ("uint8", "float32")}}
    assert set(by) == expected
    for key, r in by.items():
        if key[1] == "simplejpeg" or key[0] == "collate+pin":
            assert r["status"] in ("ok", "unavailable")
            continue
        assert r["status"] == "ok" and float(r["images_per_s"]) > 0 and float(r["ms"]) > 0
        assert float(r["ms"]) == pytest.approx(1e3 * int(r["batch"]) / float(r["images_per_s"]), rel=0.05)  # rounded
        assert r["img_size"] == bench.PRESETS["smoke"]["data"].size
    if not torch.cuda.is_available():
        assert by[("collate+pin", "default_collate", "uint8")]["status"] == "unavailable"
    assert "mean abs diff" in by[("decode+train_aug", "pillow+draft", "uint8")]["note"]
    assert "mean abs diff" not in by[("decode+train_aug", "pillow", "uint8")]["note"]
    assert "data" not in bench.DEFAULT_SUITES


def test_data_suite_measures_what_it_says(tmp_path, monkeypatch):
    """The decode rows time the transform they name (draft on or off; float32 = uint8 then
    converted), and the pixel difference is zero where no image is decoded reduced."""
    from energyvit.data import throughput

    seen = []
    real = throughput._pillow_sample

    def spy(paths, transform, to_float):
        seen.append((type(transform).__name__, transform.jpeg_draft, to_float))
        return real(paths, transform, to_float)

    monkeypatch.setattr(throughput, "_pillow_sample", spy)
    sizes = throughput.DataBenchSizes(images=2, sources=((40, 30),), size=32, batch=2, min_time=0.0)
    rows = throughput.measure(sizes, folder=str(tmp_path))
    timed = [r for r in rows if r["op"].startswith("decode") and r["backend"].startswith("pillow")]
    assert [(r["op"], r["backend"], r["dtype"]) for r in timed] == [
        ("decode+train_aug", "pillow", "uint8"), ("decode+train_aug", "pillow", "float32"),
        ("decode+train_aug", "pillow+draft", "uint8"), ("decode+train_aug", "pillow+draft", "float32"),
        ("decode+eval", "pillow", "uint8"), ("decode+eval", "pillow+draft", "uint8")]
    assert {("TrainTransform", d, f) for d in (False, True) for f in (False, True)} <= set(seen)
    assert {("EvalTransform", False, False), ("EvalTransform", True, False)} <= set(seen)
    assert not any(name == "EvalTransform" and to_float for name, _, to_float in seen)
    # 40x30 files at 32 px: no crop allows a reduction, so the draft rows equal the full decode
    assert all("mean abs diff 0.000 levels of 255, 0 of 2 decoded reduced" in r["note"]
               for r in timed if r["backend"] == "pillow+draft")
    assert len(list((tmp_path / "40x30").glob("*.jpg"))) == 2


def test_inductor_options_reach_the_compiled_step(monkeypatch):
    """--inductor's options go to torch.compile for the compiled modes, beside the kernel profile."""
    seen = {}

    class Stop(Exception):
        pass

    def record(model, opts, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(cases_step, "compiled_train_step", record)
    assert bench.inductor_option("combo_kernels=True") == ("combo_kernels", True)
    with pytest.raises(Stop):
        bench.step_case("compiled", "vit_pico_patch2", None, 1, 2, torch.device("cpu"), None, kernel_profile=True,
                        inductor={"split_reductions": False})
    assert seen["options"] == {"split_reductions": False, "cpp.enable_kernel_profile": True}


def test_triton_launch_proxy_counts_the_generated_wrapper(tmp_path):
    """bench/triton_launch_proxy.py: Inductor's Triton codegen for a GPU, on the CPU, nothing run; the
    tiny step's calls are counted from the wrapper (the model pretrain builds: 2 encoder and 2 energy
    head blocks, 20 mm, 18 bmm and 4 addmm each at K=1, 4 softmax kernels each; the head's embedding
    5 mm and 1 addmm) and nothing of it lands in the compile caches."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "proxy.json"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    subprocess.run([sys.executable, str(root / "bench" / "triton_launch_proxy.py"), "--model", "vit_pico_patch2",
                    "--img", "8", "--batch", "2", "--amp", "fp32", "--out", str(out)], check=True, env=env,
                   capture_output=True, timeout=600)
    r = json.loads(out.read_text())
    assert r["extern_calls"]["mm"] == 4 * 20 + 5 and r["extern_calls"]["bmm"] == 4 * 18
    assert r["extern_calls"]["addmm"] == 4 * 4 + 1
    assert r["triton_by_kind"]["softmax"] == 4 * 4 and r["triton_launches"] > 100
    assert r["gpu_estimate"] == r["triton_launches"] + r["extern_kernels"] + 6
    assert not [f for f in (tmp_path / "cache").rglob("*") if "fxgraph" in f.parts or "aotautograd" in f.parts]


def test_timing_keeps_median_quartiles_and_extremes():
    t = bench.Timing.of([4.0, 1.0, 3.0, 2.0, 10.0], "x")
    assert (t.ms, t.lo, t.hi, t.reps) == (3.0, 1.0, 10.0, 5)
    assert (t.q1, t.q3) == (2.0, 4.0)
    assert bench.Timing.of([2.5], "x").fields()["ms_q1"] == "2.5000"
    calls = []
    timed = bench.time_ms(lambda: calls.append(1), torch.device("cpu"), min_reps=7, min_time=0.0)
    assert timed.reps == 7 and len(calls) == 8  # one warm-up call, then the timed ones
    assert timed.lo <= timed.q1 <= timed.ms <= timed.q3 <= timed.hi
    assert bench.iqr_percent({"ms": "2", "ms_q1": "1.5", "ms_q3": "2.5"}) == "50.0"


def test_kernel_ms_sums_the_device_kernels_per_call():
    from types import SimpleNamespace as NS

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, device, us):
        return NS(name=name, device_type=device, time_range=NS(elapsed_us=lambda: us))

    events = [event("flash_fwd_kernel", cuda, 300.0), event("Memcpy HtoD", cuda, 1000.0),
              event("aten::_scaled_dot_product_flash_attention", cpu, 5000.0), event("gemm", cuda, 100.0)]
    assert bench.kernel_ms(events, calls=2) == pytest.approx(0.2)
    assert bench.kernel_ms(events[2:3], calls=1) is None
    assert bench.device_ms(lambda: None, torch.device("cpu")) == "n/a"


def test_sdpa_rows_name_the_kernel_that_ran():
    """SDPA picks its kernel itself; the row says which ran (here the CPU's flash kernel, or its
    math fallback when only that is allowed), for fwd and through the backward alike."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fwd = bench.attention_op("sdpa-default", "fwd", (1, 2, 16, 16), torch.float32, torch.device("cpu"))
    bwd = bench.attention_op("sdpa-default", "bwd", (1, 2, 16, 16), torch.float32, torch.device("cpu"))
    assert bench.sdpa_kernel_ran(fwd).startswith("flash-cpu") and bench.sdpa_kernel_ran(bwd).startswith("flash-cpu")

    def math_only():
        with sdpa_kernel([SDPBackend.MATH]):
            return fwd()

    assert bench.sdpa_kernel_ran(math_only).startswith("math")


def test_step_order_runs_mae_once_per_model_and_compiled_last():
    cfg = bench.BenchConfig(preset="smoke", save=False, step_modes=("eager", "fused+compiled", "mae", "mae+compiled",
                                                                     "mae-math"))
    order = [(k, m) for _, k, m in bench.Runner(cfg).step_order()]
    assert order == [(1, "eager"), ("", "mae"), ("", "mae-math"), (1, "fused+compiled"), ("", "mae+compiled"),
                     (2, "eager"), (2, "fused+compiled")]


def test_mae_rows_time_the_sdpa_step_against_math_and_compiled(tmp_path):
    """The MAE rows: SDPA (mae), math (mae-math) and compiled SDPA compute the same step (fixed
    masks: the same gradients), with model FLOPs, MFU against the matmul timed next to the row,
    the spread of the repeats; CUDA graphs are unavailable on the CPU; the summary compares the
    fastest energy and MAE rows per model and K."""
    rows, _, _ = smoke(tmp_path, suites=("step",), step_modes=("eager", "mae", "mae-math", "mae+compiled",
                                                                 "mae+cuda-graphs"), ks=(1,), save=False)
    by = {r["backend"]: r for r in rows}
    for mode in ("mae", "mae-math", "eager"):
        r = by[mode]
        assert r["status"] == "ok" and float(r["flop"]) > 0 and float(r["mfu"]) > 0 and r["mfu_peak"] == "n/a"
        assert float(r["mfu"]) == pytest.approx(float(r["tflops"]) / float(r["matmul_tflops"]), rel=2e-3, abs=1e-4)
        assert int(r["reps"]) >= bench.PRESETS["smoke"]["min_reps"]
        assert float(r["ms_min"]) <= float(r["ms_q1"]) <= float(r["ms"]) <= float(r["ms_q3"]) <= float(r["ms_max"])
    assert by["mae"]["flop"] == by["mae-math"]["flop"] and "SDPA" in by["mae"]["note"]
    assert float(by["mae-math"]["grad_rel_err_vs_eager"]) < 1e-5
    assert by["mae+cuda-graphs"]["status"] == "unavailable"
    compiled = by["mae+compiled"]
    if compiled["status"] != "ok":
        pytest.skip(f"compiled MAE step unavailable here: {compiled['error']}")
    assert float(compiled["grad_rel_err_vs_eager"]) < 1e-4 and "Inductor cache" in compiled["note"]
    (line,) = bench.energy_vs_mae(rows)
    assert line.startswith("vit_pico_patch2 K=1: energy eager") and "x MAE's images/s" in line
    bound = (float(by["mae"]["flop"]) / float(by["eager"]["flop"]))
    assert f"at equal MFU {bound:.3f}x" in line
