"""Attention and training-step benchmarks with device telemetry (the `energyvit bench` command).

Rows (one per measurement; every row carries versions, git commit and device fields):

- suite ``attention``, op ``fwd`` / ``bwd`` / ``bwdbwd`` for each backend: ``math-eager``,
  ``math-compiled`` (torch.compile of energyvit.attention.math_attention), ``fused`` (Triton;
  on CPU through TRITON_INTERPRET=1), SDPA (``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn`` on
  CUDA, ``sdpa-default`` on CPU) and ``xformers`` (memory_efficient_attention) when installed.
  ``fwd`` times the forward pass (no grad), ``bwd`` the backward pass alone through a prebuilt
  graph, ``bwdbwd`` the double-backward pass alone through a prebuilt create_graph graph.
  Nominal FLOPs: fwd 4*B*H*N^2*d, bwd 2.5x that, bwdbwd 6x. Every op is actually tried: a
  backend that raises gets a row with status ``unsupported`` and the first line of the error.
- suite ``step``: one pretraining step (forward, K restoration steps with create_graph, parameter
  backward; no optimizer step) in modes ``eager``, ``compiled`` (energyvit.compiled), ``fused``
  and ``fused+compiled``. Model FLOPs count matmuls only: per restoration step 6x the forward
  matmul FLOPs of the linear layers (fwd, input-grad bwd, and the outer backward of both) and
  12x the attention forward FLOPs (fwd once, bwd twice, bwdbwd 6x). MFU is against a large
  matmul timed in the same run (bf16 on CUDA, fp32 on CPU).
- suite ``matmul``: that reference matmul.

``speedup_vs_eager`` = eager time / row time, against ``math-eager`` (attention) or ``eager``
(step) of the same shape, op and dtype. Timing: warm-up first, then on CUDA
triton.testing.do_bench (median, CUDA events), on CPU the median of time.perf_counter repeats.
Inputs are random (seeded), rotated between two sets where the op allows it.
On CUDA, nvidia-ml-py (optional) adds SM clock, mean power and energy per image (difference of
the total-energy counter over a separate timed loop, divided by the images processed).
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import energyvit
from energyvit.attention import math_attention
from energyvit.compiled import compiled_train_step
from energyvit.model import model_config
from energyvit.objective import EnergyOptions, task_loss

SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the checkout, when the package runs from one
ATTN_OPS = ("fwd", "bwd", "bwdbwd")
ATTN_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "bwdbwd": 6.0}
STEP_MODES = ("eager", "compiled", "fused", "fused+compiled")
OWN_BACKENDS = ("math-eager", "fused")  # must work at every order: a failure there is an error

FIELDS = [
    "suite", "op", "backend", "dtype", "model", "img_size", "restore_steps", "batch", "heads", "n", "head_dim",
    "status", "error", "ms", "speedup_vs_eager", "tflops", "mfu", "images_per_s", "first_call_s",
    "grad_rel_err_vs_eager", "peak_mem_mib", "energy_j_per_image", "power_w", "sm_clock_mhz", "flop", "note",
    "device", "device_name", "driver", "torch", "triton", "cuda", "python", "git_commit", "date_utc", "timer",
]

# Sizes per preset. "smoke": seconds on CPU (CI, --quick); "cpu": the CPU table; "gpu": ViT shapes.
PRESETS = {
    "smoke": dict(attn=[(1, 2, 16, 16)], attn_dtype="fp32", steps=[("vit_pico_patch2", None, 2)],
                  ks=(1, 2), amp=None, matmul=(512, "fp32"), min_reps=3, min_time=0.05, compile_steps={("compiled", 1)}),
    "cpu": dict(attn=[(2, 3, 65, 64)], attn_dtype="fp32", steps=[("vit_nano_patch4", None, 8)],
                ks=(1, 2), amp=None, matmul=(1024, "fp32"), min_reps=5, min_time=0.3, compile_steps=None),
    "gpu": dict(attn=[(32, 12, 197, 64), (32, 12, 577, 64)], attn_dtype="bf16",
                steps=[("vit_tiny_patch16", 224, 32), ("vit_small_patch16", 224, 32), ("vit_base_patch16", 224, 32)],
                ks=(1, 2), amp="bf16", matmul=(8192, "bf16"), min_reps=0, min_time=0.0, compile_steps=None),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Unavailable(Exception):
    """The backend or mode cannot run here at all (not installed, no device)."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {line}"[:300]


# ------------------------------------------------------------------------------------ environment
def git_commit(root: Path = SOURCE_ROOT) -> str:
    """The commit of the checkout at `root` (+ a mark for uncommitted changes); an installed copy
    outside a checkout has none, and says so."""
    try:
        c = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        commit = c.stdout.strip() or "none (not a git checkout)"
        d = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        return commit + (" +uncommitted changes" if d.stdout.strip() else "")
    except Exception as e:  # noqa: BLE001  (no git, not a checkout)
        return f"unknown ({type(e).__name__})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mean_std(values: list[float]) -> dict:
    """Mean, sample standard deviation and the values themselves, as the results files keep them."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception as e:  # noqa: BLE001
        return f"n/a ({first_line(e)})"


class Telemetry:
    """NVML readings for CUDA rows; every field is 'n/a' on CPU or without nvidia-ml-py."""

    def __init__(self, device: torch.device) -> None:
        self.handle, self.nvml, self.reason = None, None, ""
        self.device_name, self.driver = "n/a", "n/a"
        if device.type != "cuda":
            self.reason = "no GPU"
            self.device_name = f"CPU: {cpu_model()}"
            return
        self.device_name = torch.cuda.get_device_name(device)
        try:
            import pynvml  # nvidia-ml-py
        except ImportError as e:
            self.reason = f"nvidia-ml-py not installed ({first_line(e)})"
            return
        try:
            pynvml.nvmlInit()
            idx = device.index if device.index is not None else torch.cuda.current_device()
            handle = None
            uuid = getattr(torch.cuda.get_device_properties(idx), "uuid", None)
            if uuid is not None:
                with contextlib.suppress(Exception):
                    handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            if handle is None:  # fall back to the CUDA index (right when CUDA_VISIBLE_DEVICES is unset)
                handle = pynvml.nvmlDeviceGetHandleByIndex(idx)
            drv = pynvml.nvmlSystemGetDriverVersion()
            self.driver = drv.decode() if isinstance(drv, bytes) else str(drv)
            self.handle, self.nvml = handle, pynvml
        except Exception as e:  # noqa: BLE001  (NVML missing from the driver, no permission, ...)
            self.reason = f"NVML unavailable ({first_line(e)})"

    def measure(self, fn, seconds: float, images: int, sync) -> dict:
        """Run fn for about `seconds`; SM clock, mean power and energy per image over that loop."""
        out = {"energy_j_per_image": "n/a", "power_w": "n/a", "sm_clock_mhz": "n/a"}
        if self.handle is None:
            return out
        nv, h = self.nvml, self.handle
        try:
            sync()
            t = time.perf_counter()
            fn()
            sync()
            one = max(time.perf_counter() - t, 1e-6)
            iters = max(1, int(math.ceil(seconds / one)))
            e0 = nv.nvmlDeviceGetTotalEnergyConsumption(h)  # mJ
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            t1 = time.perf_counter()
            e1 = nv.nvmlDeviceGetTotalEnergyConsumption(h)
            joules = (e1 - e0) / 1e3
            out["energy_j_per_image"] = f"{joules / (iters * images):.4g}"
            out["power_w"] = f"{joules / (t1 - t0):.1f}"
            out["sm_clock_mhz"] = str(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))
        except Exception as e:  # noqa: BLE001
            out["energy_j_per_image"] = f"n/a ({first_line(e)[:80]})"
        return out


# ------------------------------------------------------------------------------------ timing
def make_sync(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_ms(fn, device: torch.device, min_reps: int = 5, min_time: float = 0.3, long: bool = False) -> tuple[float, str]:
    """Median milliseconds of fn() after a warm-up call; (ms, method)."""
    sync = make_sync(device)
    fn()
    sync()
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            warmup, rep = (200, 2000) if long else (25, 200)
            return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median")), "triton do_bench median (CUDA events)"
        except ImportError:
            from torch.utils import benchmark as tb

            m = tb.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0)
            return m.median * 1e3, "torch.utils.benchmark median"
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max(min_reps, 1) or (time.perf_counter() - start < min_time and len(times) < 1000):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, f"time.perf_counter median of {len(times)}"


def peak_mem_mib(fn, device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a"
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}"


# ------------------------------------------------------------------------------------ attention
def attention_backends(device: torch.device) -> list[str]:
    sdpa = ["sdpa-flash", "sdpa-efficient", "sdpa-cudnn"] if device.type == "cuda" else ["sdpa-default"]
    return ["math-eager", "math-compiled", "fused", *sdpa, "xformers"]


_COMPILED_MATH = None


def attention_fn(backend: str, device: torch.device, scale: float):
    """att(q, k, v) for a backend name; raises Unavailable when it cannot run here."""
    if backend == "math-eager":
        return lambda q, k, v: math_attention(q, k, v, scale)
    if backend == "math-compiled":
        global _COMPILED_MATH
        if _COMPILED_MATH is None:
            _COMPILED_MATH = torch.compile(math_attention)
        return lambda q, k, v: _COMPILED_MATH(q, k, v, scale)
    if backend == "fused":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise Unavailable("fused Triton kernels need CUDA, or TRITON_INTERPRET=1 set before triton is imported")
        try:
            from energyvit.kernels import attention as fused
        except Exception as e:  # noqa: BLE001  (triton missing or broken)
            raise Unavailable(first_line(e)) from e
        if device.type != "cuda":
            from energyvit.kernels import triton_attention as km

            if not km.INTERPRET:
                raise Unavailable("triton was imported before TRITON_INTERPRET=1 was set: kernels cannot run on CPU")
        return lambda q, k, v: fused(q, k, v, scale=scale)
    if backend.startswith("sdpa-"):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kind = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                "sdpa-cudnn": "CUDNN_ATTENTION"}.get(backend)
        if kind is None:
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale)
        if not hasattr(SDPBackend, kind):
            raise Unavailable(f"torch {torch.__version__} has no SDPBackend.{kind}")
        chosen = getattr(SDPBackend, kind)

        def sdpa(q, k, v):
            with sdpa_kernel([chosen]):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)

        return sdpa
    if backend == "xformers":
        try:
            import xformers.ops as xops
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"xformers not installed ({first_line(e)})") from e
        return lambda q, k, v: xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale).transpose(1, 2)
    raise ValueError(f"unknown attention backend {backend!r}")


def _randn(shape, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def attention_op(backend: str, op: str, shape, dtype: torch.dtype, device: torch.device):
    """A zero-argument callable running one `op` of `backend`, already called once (so a backend
    that cannot do `op` raises here). Inputs rotate between two random sets."""
    B, H, N, d = shape
    scale = d ** -0.5
    att = attention_fn(backend, device, scale)
    sets = [[_randn(shape, dtype, device, 1000 + 10 * j + i).requires_grad_(i < 3) for i in range(4)] for j in range(2)]
    state = {"i": 0}

    def nxt(seq):
        state["i"] = (state["i"] + 1) % len(seq)
        return seq[state["i"]]

    if op == "fwd":
        def fn():
            q, k, v, _ = nxt(sets)
            with torch.no_grad():
                return att(q, k, v)
    elif op == "bwd":
        graphs = [(att(q, k, v), (q, k, v), do) for q, k, v, do in sets]

        def fn():
            o, ins, do = nxt(graphs)
            return torch.autograd.grad(o, ins, do, retain_graph=True)
    elif op == "bwdbwd":
        q, k, v, do = sets[0]
        do = do.detach().clone().requires_grad_(True)
        o = att(q, k, v)
        g = torch.autograd.grad(o, (q, k, v), do, create_graph=True)
        cots = [[_randn(shape, dtype, device, 2000 + 10 * j + i) for i in range(3)] for j in range(2)]

        def fn():
            return torch.autograd.grad(g, (q, k, v, do), nxt(cots), retain_graph=True)
    else:
        raise ValueError(op)
    fn()
    return fn


# ------------------------------------------------------------------------------------ steps
def model_flops(cfg, restore_steps: int, batch: int) -> float:
    """Matmul FLOPs of one pretraining step (see the module docstring for the counting)."""
    D, L, P = cfg.embed_dim, cfg.depth, cfg.num_patches
    n_tok = P + 1
    hidden = int(D * cfg.mlp_ratio)
    linear = 2.0 * n_tok * L * (3 * D * D + D * D + 2 * D * hidden) + 2.0 * P * cfg.patch_size ** 2 * cfg.in_chans * D
    attn = 4.0 * n_tok * n_tok * D * L
    return batch * restore_steps * (6.0 * linear + 12.0 * attn)


@dataclass
class StepCase:
    fn: object
    model: object
    flops: float
    images: int
    stepper: object = None
    first_call_s: float = 0.0
    note: str = ""


def step_case(mode: str, model_name: str, img_size, restore_steps: int, batch: int, device: torch.device,
              amp: str | None) -> StepCase:
    """The pretraining step of `mode` on random images (seeded; mim corruption), called once."""
    backend = "fused" if mode.startswith("fused") else "math"
    if backend == "fused":
        attention_fn("fused", device, 1.0)  # raises Unavailable with the reason
    stepper = None
    torch.manual_seed(0)
    model = energyvit.create_model(model_name, img_size=img_size, restore_steps=restore_steps,
                                   attn_backend=backend).to(device)
    model.train()
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    corrupted = energyvit.corrupt(clean, "mim", patch_size=cfg.patch_size, generator=g, mask_ratio=0.5)
    clean, corrupted = clean.to(device), corrupted.to(device)
    opts = EnergyOptions()
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = (lambda: torch.autocast(device.type, dtype=DTYPES[amp])) if amp else contextlib.nullcontext
    if mode.endswith("compiled"):
        # our own gradient check against the eager step replaces the built-in one (whose
        # tolerance is for fp32, too tight under bf16 autocast); see grad_rel_err_vs_eager
        stepper = compiled_train_step(model, opts, verify_first_step=False)
        loss_fn = lambda: stepper(clean, corrupted)  # noqa: E731
    else:
        loss_fn = lambda: task_loss(model, clean, corrupted, opts)  # noqa: E731

    def fn():
        for p in params:
            p.grad = None
        with autocast():
            loss = loss_fn()
        loss.backward()
        return loss.detach()

    sync = make_sync(device)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    case = StepCase(fn, model, model_flops(cfg, restore_steps, batch), batch, stepper, time.perf_counter() - t)
    if stepper is not None and getattr(stepper, "mode", "compiled") != "compiled":
        case.note = f"compiled step fell back to eager (mode={stepper.mode})"
    return case


def flat_grads(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().double().cpu()
                      for p in model.parameters() if p.requires_grad])


# ------------------------------------------------------------------------------------ runner
@dataclass
class BenchConfig:
    preset: str = "cpu"
    device: str = "cpu"
    out: str = "bench-results"
    suites: tuple = ("matmul", "attention", "step")
    compile: bool = True  # compiled rows (CPU compilation of a step takes minutes)
    budget_s: float = 0.0  # 0: no limit; else rows starting later are recorded as skipped
    energy_s: float = 0.5
    tag: str = ""
    save: bool = True
    attn_backends: tuple | None = None
    step_modes: tuple = STEP_MODES
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
        self.matmul_tflops: float | None = None
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
            "flop_counts": "attention fwd 4*B*H*N^2*d, bwd 2.5x, bwdbwd 6x; step: matmul FLOPs, per restoration step "
                           "6x linear forward + 12x attention forward",
            "speedup_vs_eager": "eager ms / row ms, eager = math-eager (attention) or eager (step), same shape/op/dtype",
            "mfu_reference": "", "command": " ".join(sys.argv), "loadavg_start": _loadavg(), **cfg.extra,
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
        ms, how = time_ms(fn, self.device, self.p["min_reps"], self.p["min_time"], long)
        out = {"ms": f"{ms:.4f}", "tflops": f"{flop / ms / 1e9:.4g}", "flop": f"{flop:.4g}", "timer": how,
               "images_per_s": f"{images / ms * 1e3:.1f}", "peak_mem_mib": peak_mem_mib(fn, self.device)}
        if self.device.type == "cuda":
            out.update(self.tel.measure(fn, self.cfg.energy_s, images, self.sync))
        return out

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
        n, dt = self.p["matmul"]
        dtype = DTYPES[dt]
        a, b = _randn((n, n), dtype, self.device, 1), _randn((n, n), dtype, self.device, 2)
        flop = 2.0 * n ** 3
        try:
            res = self.measure(lambda: a @ b, flop, 1, long=False)
            res["images_per_s"] = ""
            self.matmul_tflops = float(res["tflops"])
            self.meta["mfu_reference"] = f"{dt} matmul {n}x{n}x{n}: {self.matmul_tflops:.4g} TFLOP/s" + (
                " (CPU: fp32 matmul, not bf16)" if self.device.type == "cpu" else "")
            self.add(suite="matmul", op="matmul", backend="torch.matmul", dtype=dt, batch=1, n=n, status="ok",
                     note="MFU reference", **res)
        except Exception as e:  # noqa: BLE001
            self.add(suite="matmul", op="matmul", backend="torch.matmul", dtype=dt, n=n, **self.failed(e, True))
        del a, b

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
                        self.add(**base, status="ok", **res)
                        del fn
                    except Exception as e:  # noqa: BLE001  (recorded, never raised)
                        self.add(**base, flop=f"{flop:.4g}", **self.failed(e, backend in OWN_BACKENDS))
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()

    def run_steps(self) -> None:
        amp = self.p["amp"]
        dt = amp or "fp32"
        # eager and fused rows first (fast), compiled ones after, largest model first
        order = [(m, k, mode) for mode in ("eager", "fused") for m in self.p["steps"] for k in self.p["ks"]]
        order += [(m, k, mode) for k in sorted(self.p["ks"], reverse=True) for m in reversed(self.p["steps"])
                  for mode in ("compiled", "fused+compiled")]
        order = [o for o in order if o[2] in self.cfg.step_modes]
        ref_grads: dict = {}
        for (name, img, batch), K, mode in order:
            base = dict(suite="step", op="train_step", backend=mode, dtype=dt if amp is None else f"{amp} autocast",
                        model=name, img_size=model_config(name, img_size=img).img_size, restore_steps=K, batch=batch)
            if self.over_budget():
                self.add(**base, status="skipped", error="time budget (--budget_s) used up")
                continue
            if mode.endswith("compiled") and not self.cfg.compile:
                self.add(**base, status="skipped", error="compiled rows disabled (--no_compile)")
                continue
            allowed = self.p["compile_steps"]  # None: all
            if mode.endswith("compiled") and allowed is not None and (mode, K) not in allowed:
                self.add(**base, status="skipped", error=f"preset {self.cfg.preset}: compiling a step takes about a "
                         "minute per row on CPU, so only K=1 compiled runs here; run without --quick for these rows")
                continue
            try:
                case = step_case(mode, name, img, K, batch, self.device, amp)
                extra = {"first_call_s": f"{case.first_call_s:.2f}", "note": case.note}
                grads = flat_grads(case.model)
                if mode == "eager":
                    ref_grads[(name, K)] = grads
                elif (name, K) in ref_grads:
                    ref = ref_grads[(name, K)]
                    extra["grad_rel_err_vs_eager"] = f"{((grads - ref).norm() / ref.norm().clamp_min(1e-300)).item():.2e}"
                res = self.measure(case.fn, case.flops, case.images, long=True)
                if self.matmul_tflops:
                    res["mfu"] = f"{float(res['tflops']) / self.matmul_tflops:.4f}"
                status = "ok" if not case.note else "fallback-eager"
                self.add(**base, status=status, **extra, **res)
                del case
            except Exception as e:  # noqa: BLE001
                self.add(**base, **self.failed(e, mode in ("eager", "fused")))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def run(self) -> list[dict]:
        print(f"# energyvit bench: preset {self.cfg.preset} on {self.common['device_name']} "
              f"(torch {self.common['torch']}, triton {self.common['triton']}, commit {self.common['git_commit']})",
              flush=True)
        if "matmul" in self.cfg.suites or "step" in self.cfg.suites:
            self.run_matmul()
        if "attention" in self.cfg.suites:
            self.run_attention()
        if "step" in self.cfg.suites:
            self.run_steps()
        add_ratios(self.rows)
        self.meta["wall_s"] = f"{time.time() - self.t0:.1f}"
        self.meta["loadavg_end"] = _loadavg()
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


def add_ratios(rows: list[dict]) -> None:
    """speedup_vs_eager = eager ms / row ms for rows with an eager row of the same shape/op/dtype."""
    def key(r):
        return (r["suite"], r["op"], r["dtype"], r["model"], r["img_size"], r["restore_steps"], r["batch"],
                r["heads"], r["n"], r["head_dim"])

    eager = {key(r): float(r["ms"]) for r in rows
             if r["status"] == "ok" and r["backend"] in ("math-eager", "eager") and r["ms"] != ""}
    for r in rows:
        if r["status"] in ("ok", "fallback-eager") and r["ms"] != "" and key(r) in eager:
            r["speedup_vs_eager"] = f"{eager[key(r)] / float(r['ms']):.4g}"


def format_table(rows: list[dict]) -> str:
    cols = [("suite", "suite"), ("op", "op"), ("backend", "backend"), ("shape", None), ("dtype", "dtype"),
            ("status", "status"), ("ms", "ms"), ("x eager", "speedup_vs_eager"), ("TFLOP/s", "tflops"),
            ("MFU", "mfu"), ("peak MiB", "peak_mem_mib"), ("J/img", "energy_j_per_image"), ("error / note", None)]
    lines = []
    for r in rows:
        if r["suite"] == "step":
            shape = f"{r['model']}@{r['img_size']} K={r['restore_steps']} B={r['batch']}"
        elif r["suite"] == "attention":
            shape = f"B={r['batch']} H={r['heads']} N={r['n']} d={r['head_dim']}"
        else:
            shape = f"{r['n']}^3"
        cells = []
        for title, k in cols:
            if title == "shape":
                cells.append(shape)
            elif title == "error / note":
                cells.append((r["error"] or r["note"])[:90])
            else:
                cells.append(str(r.get(k, "")))
        lines.append(cells)
    head = [c[0] for c in cols]
    widths = [max(len(head[i]), *(len(line[i]) for line in lines)) if lines else len(head[i]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])


def collect(cfg: BenchConfig) -> tuple[list[dict], dict, tuple[Path, Path]]:
    """Run the benchmark; (rows, meta, (csv_path, json_path))."""
    runner = Runner(cfg)
    rows = runner.run()
    return rows, runner.meta, runner.paths
