"""The runner of `energyvit bench`: its configuration, the suites in order, the rows and the files."""
from __future__ import annotations

import csv
import datetime as _dt
import json
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from energyvit.benchmark.cases_attention import (ATTN_KERNEL, _randn, attention_backends, attention_op,
                                                 sdpa_kernel_ran)
from energyvit.benchmark.cases_step import StepCase, flat_grads, optimizer_case, rel_err, step_case
from energyvit.benchmark.compile_only import CompiledOnly, cache_counts, cache_note
from energyvit.benchmark.environment import (Unavailable, cpu_model, first_line, git_commit, loadavg,
                                             triton_version)
from energyvit.benchmark.flops import datasheet_peak
from energyvit.benchmark.launches import count_launches
from energyvit.benchmark.presets import (ATTN_FLOP_FACTOR, ATTN_OPS, DEFAULT_SUITES, DTYPES, FIELDS, MAE_MODES,
                                         OWN_BACKENDS, PRESETS, STEP_MODES)
from energyvit.benchmark.report import add_ratios
from energyvit.benchmark.telemetry import Telemetry
from energyvit.benchmark.timing import device_ms, make_sync, peak_mem_mib, time_ms
from energyvit.data.throughput import measure as measure_data
from energyvit.model import model_config


@dataclass
class BenchConfig:
    preset: str = "cpu"
    device: str = "cpu"
    out: str = "bench-results"
    suites: tuple = DEFAULT_SUITES
    compile: bool = True  # compiled rows (CPU compilation of a step takes minutes)
    budget_s: float = 0.0  # 0: no limit; else rows starting later are recorded as skipped
    energy_s: float = 0.5
    tag: str = ""
    save: bool = True
    attn_backends: tuple | None = None
    step_modes: tuple = STEP_MODES
    models: tuple | None = None  # the preset's step models to run (None: all)
    ks: tuple | None = None  # the preset's restoration step counts to run (None: all)
    inductor: dict = field(default_factory=dict)  # Inductor options of the compiled step modes
    extra: dict = field(default_factory=dict)


class Runner:
    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.p = PRESETS[cfg.preset]
        self.tel = Telemetry(self.device)
        self.sync = make_sync(self.device)
        self.t0 = time.time()
        self.rows: list[dict] = []
        self._matmul = None  # the reference matmul's operands, kept for the timing next to each step row
        date = _dt.datetime.now(_dt.timezone.utc)
        self.common = {
            "device": self.device.type, "device_name": self.tel.device_name, "driver": self.tel.driver,
            "torch": torch.__version__, "triton": triton_version(), "cuda": torch.version.cuda or "n/a",
            "python": platform.python_version(), "git_commit": git_commit(),
            "date_utc": date.isoformat(timespec="seconds"),
        }
        dev_tag = "cpu" if self.device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", self.tel.device_name.lower()).strip("-")
        stem = f"bench-{cfg.tag + '-' if cfg.tag else ''}{dev_tag}-{date.strftime('%Y%m%d-%H%M%S')}"
        self.paths = (Path(cfg.out) / f"{stem}.csv", Path(cfg.out) / f"{stem}.json")
        self.meta = {
            **self.common, "preset": cfg.preset, "cpu_model": cpu_model(), "cpu_threads": torch.get_num_threads(),
            "telemetry": self.tel.reason or "nvidia-ml-py",
            "flop_counts": "attention fwd 4*B*H*N^2*d, bwd 2.5x, bwdbwd 6x (nominal); energy step: model FLOPs of "
                           "matmuls and convolutions of encoder + energy head, per restoration step 6x linear "
                           "forward + 9x attention forward; MAE step: 3x forward of encoder (visible tokens) + "
                           "decoder, 2x the patch embedding (energyvit.benchmark.flops)",
            "mfu": "row TFLOP/s / the reference matmul timed just before the row (matmul_tflops)",
            "mfu_peak": "row TFLOP/s / the datasheet's dense bf16 peak of this GPU (energyvit.benchmark.flops)",
            "ms": "median of `reps` timed calls; ms_q1/ms_q3 their quartiles, ms_min/ms_max the extremes",
            "device_ms": "attention rows: the op's CUDA kernels alone (profiler), beside ms through autograd",
            "speedup_vs_eager": "eager ms / row ms, eager = math-eager (attention), eager (energy step) or mae (MAE "
                                "step: SDPA, eager), same shape/op/dtype",
            "launches_vs_eager": "row launches / eager launches, same model, K, batch; CPU counts are a proxy of GPU "
                                 "kernel launches (see the module docstring)",
            "mfu_reference": self.mfu_reference(), "command": " ".join(sys.argv), "loadavg_start": loadavg(),
            "inductor_options": ", ".join(f"{k}={v!r}" for k, v in cfg.inductor.items()) or "defaults", **cfg.extra,
        }

    # -- helpers
    def over_budget(self) -> bool:
        return bool(self.cfg.budget_s) and time.time() - self.t0 > self.cfg.budget_s

    def add(self, **kw) -> dict:
        r = {f: "" for f in FIELDS}
        r.update({"energy_j_per_image": "n/a", "power_w": "n/a", "sm_clock_mhz": "n/a", "peak_mem_mib": "n/a"})
        r.update(self.common)
        r.update(kw)
        self.rows.append(r)
        shown = {k: r[k] for k in ("suite", "op", "backend", "model", "restore_steps", "n", "status", "ms", "error")
                 if r[k] not in ("", None)}
        print("  " + "  ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
        if self.cfg.save:
            self.save()
        return r

    def measure(self, fn, flop: float, images: int, long: bool = False) -> dict:
        """Timing fields of a row; flop 0: not counted (no TFLOP/s)."""
        t = time_ms(fn, self.device, self.p["min_reps"], self.p["min_time"], long,
                    self.p.get("step_rep_ms") if long else None)
        out = {**t.fields(), "tflops": f"{flop / t.ms / 1e9:.4g}" if flop else "", "flop": f"{flop:.4g}" if flop else "",
               "images_per_s": f"{images / t.ms * 1e3:.1f}", "peak_mem_mib": peak_mem_mib(fn, self.device)}
        if self.device.type == "cuda" and images:
            out.update(self.tel.measure(fn, self.cfg.energy_s, images, self.sync))
        return out

    def mfu_reference(self) -> str:
        n, dt = self.p["matmul"]
        peak = datasheet_peak(self.common["device_name"], dt)
        return (f"mfu: {dt} matmul {n}x{n}x{n} timed before each step row (matmul_tflops)"
                + (" (CPU: fp32 matmul, not bf16)" if self.device.type == "cpu" else "")
                + f"; mfu_peak: datasheet {f'{peak:g} TFLOP/s' if peak else 'n/a (not a listed GPU)'}")

    def matmul_fn(self):
        """The reference matmul (the preset's size and dtype) as a call; its operands made once."""
        n, dt = self.p["matmul"]
        if self._matmul is None:
            self._matmul = (_randn((n, n), DTYPES[dt], self.device, 1), _randn((n, n), DTYPES[dt], self.device, 2))
        a, b = self._matmul
        return lambda: a @ b

    def reference_matmul(self) -> float:
        """TFLOP/s of the reference matmul, timed now."""
        n = self.p["matmul"][0]
        return 2.0 * n ** 3 / time_ms(self.matmul_fn(), self.device, self.p["min_reps"], self.p["min_time"]).ms / 1e9

    def failed(self, e: BaseException, own: bool) -> dict:
        if isinstance(e, torch.OutOfMemoryError):
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return {"status": "oom", "error": first_line(e)}
        if isinstance(e, Unavailable):
            return {"status": "unavailable", "error": str(e)[:300]}
        return {"status": "error" if own else "unsupported", "error": first_line(e)}

    # -- suites
    def run_matmul(self) -> None:
        """The matmul row: the reference matmul, with telemetry (its SM clock on a GPU)."""
        n, dt = self.p["matmul"]
        base = dict(suite="matmul", op="matmul", backend="torch.matmul", dtype=dt, batch=1, n=n)
        try:
            res = self.measure(self.matmul_fn(), 2.0 * n ** 3, 1)
            res["images_per_s"] = ""
            peak = datasheet_peak(self.common["device_name"], dt)
            self.meta["mfu_reference"] = f"{self.mfu_reference()}; the matmul row: {res['tflops']} TFLOP/s"
            self.add(**base, status="ok", note="MFU reference", **res,
                     mfu_peak=f"{float(res['tflops']) / peak:.4f}" if peak else "n/a")
        except Exception as e:  # noqa: BLE001
            self.add(**base, **self.failed(e, True))

    def run_attention(self) -> None:
        dt = self.p["attn_dtype"]
        dtype = DTYPES[dt]
        backends = self.cfg.attn_backends or attention_backends(self.device)
        for shape in self.p["attn"]:
            B, H, N, d = shape
            for backend in backends:
                for op in ATTN_OPS:
                    base = dict(suite="attention", op=op, backend=backend, dtype=dt, batch=B, heads=H, n=N, head_dim=d)
                    if self.over_budget():
                        self.add(**base, status="skipped", error="time budget (--budget_s) used up")
                        continue
                    if backend == "math-compiled" and not self.cfg.compile:
                        self.add(**base, status="skipped", error="compiled rows disabled (--no_compile)")
                        continue
                    flop = ATTN_FLOP_FACTOR[op] * 4.0 * B * H * N * N * d
                    try:
                        fn = attention_op(backend, op, shape, dtype, self.device)
                        res = self.measure(fn, flop, B)
                        res["images_per_s"] = ""
                        kernel = sdpa_kernel_ran(fn) if backend.startswith("sdpa-") else ATTN_KERNEL.get(backend, "")
                        self.add(**base, status="ok", **res, device_ms=device_ms(fn, self.device), attn_kernel=kernel)
                        del fn
                    except Exception as e:  # noqa: BLE001  (recorded, never raised)
                        self.add(**base, flop=f"{flop:.4g}", **self.failed(e, backend in OWN_BACKENDS))
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()

    def step_order(self) -> list[tuple]:
        """((model, img, batch), K, mode) in the order rows run, so that a time budget cuts the least
        informative ones: at the smallest K the energy modes without compilation for every model,
        the MAE modes without compilation (once per model: they have no K), then per model the
        compiled energy modes and (at the smallest K) the compiled MAE modes; then each larger K
        the same way without MAE. A model's compiled modes run back to back: a +cuda-graphs mode
        loads its compiled graph from Inductor's cache (and every compiled row does when the
        compile suite ran before, as in bench/gpu_check.sh)."""
        modes = [m for m in STEP_MODES if m in self.cfg.step_modes]
        fast = [m for m in modes if "compiled" not in m and m not in MAE_MODES]
        slow = [m for m in modes if "compiled" in m and m not in MAE_MODES]
        mae_fast = [m for m in modes if "compiled" not in m and m in MAE_MODES]
        mae_slow = [m for m in modes if "compiled" in m and m in MAE_MODES]
        steps = [s for s in self.p["steps"] if self.cfg.models is None or s[0] in self.cfg.models]
        ks = sorted(k for k in self.p["ks"] if self.cfg.ks is None or k in self.cfg.ks)
        order = []
        for i, k in enumerate(ks):
            order += [(s, k, m) for m in fast for s in steps]
            if i == 0:
                order += [(s, "", m) for m in mae_fast for s in steps]
            for s in steps:
                order += [(s, k, m) for m in slow] + ([(s, "", m) for m in mae_slow] if i == 0 else [])
        return order

    def step_fields(self, name: str, img, batch: int, K, mode: str) -> dict:
        amp = self.p["amp"]
        return dict(op="train_step", backend=mode, dtype=f"{amp} autocast" if amp else "fp32", model=name,
                    img_size=model_config(name, img_size=img).img_size, restore_steps=K, batch=batch)

    def run_compile(self) -> None:
        """The compile suite: each compiled step mode compiled, not run (first_call_s: seconds).
        On CPU the graphs are built as a launches row builds them (with the kernel profile)."""
        for (name, img, batch), K, mode in self.step_order():
            if "compiled" not in mode or "cuda-graphs" in mode:
                continue
            base = dict(suite="compile", **self.step_fields(name, img, batch, K, mode))
            skip = self.skip_reason(mode, K)
            if skip:
                self.add(**base, status="skipped", error=skip)
                continue
            before, t = cache_counts(), time.perf_counter()
            try:
                case = step_case(mode, name, img, K, batch, self.device, self.p["amp"],
                                 kernel_profile=self.device.type == "cpu", compile_only=True, inductor=self.cfg.inductor)
            except CompiledOnly:
                self.add(**base, status="ok", first_call_s=f"{time.perf_counter() - t:.2f}", note=cache_note(before))
                continue
            except Exception as e:  # noqa: BLE001  (recorded, never raised)
                self.add(**base, **self.failed(e, True))
                continue
            # no CompiledOnly: compiling failed and the step ran eagerly instead
            self.add(**base, status="fallback-eager", first_call_s=f"{case.first_call_s:.2f}", note=case.note)
            del case

    def run_steps(self) -> None:
        """The step and launches suites: one step case per (model, K, mode), timed and/or counted."""
        amp = self.p["amp"]
        timed, counted = "step" in self.cfg.suites, "launches" in self.cfg.suites
        suites = [s for s in ("step", "launches") if s in self.cfg.suites]
        ref_grads: dict = {}
        for (name, img, batch), K, mode in self.step_order():
            base = self.step_fields(name, img, batch, K, mode)
            skip = self.skip_reason(mode, K)
            if skip:
                for suite in suites:
                    self.add(suite=suite, **base, status="skipped", error=skip)
                continue
            try:
                case = step_case(mode, name, img, K or 1, batch, self.device, amp,
                                 kernel_profile=counted and self.device.type == "cpu", inductor=self.cfg.inductor)
            except Exception as e:  # noqa: BLE001  (recorded, never raised)
                for suite in suites:
                    self.add(suite=suite, **base, **self.failed(e, mode in ("eager", "fused", "mae")))
                continue
            status = "fallback-eager" if "fell back" in case.note or "capture failed" in case.note else "ok"
            if timed:
                self.time_step(case, base, mode, ref_grads, status)
            if counted:
                try:
                    c = count_launches(case, self.device)
                    self.add(suite="launches", **base, status=status, launches=c.launches, launch_detail=c.detail,
                             timer=c.counter, note=case.note)
                except Exception as e:  # noqa: BLE001
                    self.add(suite="launches", **base, **self.failed(e, mode in ("eager", "fused", "mae")))
            del case
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def skip_reason(self, mode: str, K) -> str:
        if self.over_budget():
            return "time budget (--budget_s) used up"
        if "cuda-graphs" in mode and self.device.type != "cuda":
            return ""  # step_case reports it unavailable
        if "compiled" in mode and not self.cfg.compile:
            return "compiled rows disabled (--no_compile)"
        allowed = self.p["compile_steps"]  # None: all
        if "compiled" in mode and allowed is not None and (mode, K) not in allowed:
            return (f"preset {self.cfg.preset}: compiling a step takes about a minute per row on CPU, so only "
                    "K=1 compiled runs here; run without --quick for these rows")
        return ""

    def time_step(self, case: StepCase, base: dict, mode: str, ref_grads: dict, status: str) -> None:
        """A step row: time; MFU against the reference matmul timed just before it and against the
        datasheet peak; the gradients against the eager step of the same shape (mae for the MAE
        modes; a cuda-graphs mode also against its mode without the graph, in the note)."""
        extra = {"first_call_s": f"{case.first_call_s:.2f}", "note": case.note}
        key = (base["model"], base["restore_steps"])
        eager = "mae" if mode in MAE_MODES else "eager"
        try:
            grads = flat_grads(case.model)
            if "cuda-graphs" not in mode:
                ref_grads[key + (mode,)] = grads.float()  # float32 copies: ViT-B's are 0.3 GB each
            if mode != eager and key + (eager,) in ref_grads:
                extra["grad_rel_err_vs_eager"] = f"{rel_err(grads, ref_grads[key + (eager,)]):.2e}"
            plain = re.sub(r"^cuda-graphs$", "eager", mode.replace("+cuda-graphs", ""))
            if "cuda-graphs" in mode and key + (plain,) in ref_grads:
                versus = f"grads vs {plain} (no graph): {rel_err(grads, ref_grads[key + (plain,)]):.2e}"
                extra["note"] = "; ".join(filter(None, [case.note, versus]))
            matmul_tflops = self.reference_matmul()
            res = self.measure(case.fn, case.flops, case.images, long=True)
            res["matmul_tflops"] = f"{matmul_tflops:.4g}"
            if case.flops:
                res["mfu"] = f"{float(res['tflops']) / matmul_tflops:.4f}"
                peak = datasheet_peak(self.common["device_name"], self.p["amp"] or "fp32")
                res["mfu_peak"] = f"{float(res['tflops']) / peak:.4f}" if peak else "n/a"
            if "cuda-graphs" in mode:  # activations live in the graph's pool, which max_memory_allocated misses
                res["peak_mem_mib"] = "n/a (graph pool)"
            self.add(suite="step", **base, status=status, **extra, **res)
        except Exception as e:  # noqa: BLE001
            self.add(suite="step", **base, **self.failed(e, mode in ("eager", "fused", "mae")))

    def run_optimizer(self) -> None:
        """One AdamW step per model: eager (as pretraining builds it) and replayed from a CUDA graph;
        the graph's updated parameters are compared with the eager ones after the same steps."""
        for name, img, _ in self.p["steps"]:
            if self.cfg.models is not None and name not in self.cfg.models:
                continue
            ref = None
            for mode in ("eager", "cuda-graphs"):
                base = dict(suite="optimizer", op="optimizer_step", backend=mode, dtype="fp32", model=name,
                            img_size=model_config(name, img_size=img).img_size)
                if self.over_budget():
                    self.add(**base, status="skipped", error="time budget (--budget_s) used up")
                    continue
                try:
                    step, model = optimizer_case(mode, name, img, self.device)
                    params = torch.cat([p.detach().flatten().double().cpu() for p in model.parameters()])
                    extra = {}
                    if ref is None:
                        ref = params
                    else:
                        extra = {"grad_rel_err_vs_eager": f"{rel_err(params, ref):.2e}",
                                 "note": "grad_rel_err_vs_eager: parameters after 2 steps vs eager AdamW"}
                    res = self.measure(step, 0.0, 0)
                    res["images_per_s"] = ""
                    self.add(**base, status="ok", **extra, **res)
                except Exception as e:  # noqa: BLE001
                    self.add(**base, **self.failed(e, mode == "eager"))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def run_data(self) -> None:
        """The data suite: energyvit.data.throughput's rows (CPU work, whatever the device)."""
        if self.over_budget():
            self.add(suite="data", op="decode+train_aug", status="skipped", error="time budget (--budget_s) used up")
            return
        try:
            rows = measure_data(self.p["data"])
        except Exception as e:  # noqa: BLE001  (recorded, never raised)
            self.add(suite="data", op="decode+train_aug", **self.failed(e, True))
            return
        for row in rows:
            self.add(**row)

    def run(self) -> list[dict]:
        print(f"# energyvit bench: preset {self.cfg.preset} on {self.common['device_name']} "
              f"(torch {self.common['torch']}, triton {self.common['triton']}, commit {self.common['git_commit']})",
              flush=True)
        if "matmul" in self.cfg.suites:
            self.run_matmul()
        if "attention" in self.cfg.suites:
            self.run_attention()
        if "optimizer" in self.cfg.suites:
            self.run_optimizer()
        if "compile" in self.cfg.suites:
            self.run_compile()
        if "step" in self.cfg.suites or "launches" in self.cfg.suites:
            self.run_steps()
        if "data" in self.cfg.suites:
            self.run_data()
        add_ratios(self.rows)
        self.meta["wall_s"] = f"{time.time() - self.t0:.1f}"
        self.meta["loadavg_end"] = loadavg()
        if self.cfg.save:
            self.save()
        return self.rows

    def save(self) -> None:
        add_ratios(self.rows)  # on every save: a run stopped early still has its ratios
        csv_path, json_path = self.paths
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(self.rows)
        json_path.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1) + "\n")


def collect(cfg: BenchConfig) -> tuple[list[dict], dict, tuple[Path, Path]]:
    """Run the benchmark; (rows, meta, (csv_path, json_path))."""
    runner = Runner(cfg)
    rows = runner.run()
    return rows, runner.meta, runner.paths
