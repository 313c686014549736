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
  and ``fused+compiled``, each also ``+cuda-graphs`` (energyvit.cuda_graphs: the step replayed
  from a CUDA graph after warm-up steps; CUDA only), and ``mae``: an MAE step (loss + backward)
  on the same encoder, for reference (FLOPs not counted). Model FLOPs count matmuls only: per
  restoration step 6x the forward matmul FLOPs of the linear layers (fwd, input-grad bwd, and the
  outer backward of both) and 12x the attention forward FLOPs (fwd once, bwd twice, bwdbwd 6x).
  MFU is against a large matmul timed in the same run (bf16 on CUDA, fp32 on CPU).
- suite ``launches``: what one step of each mode launches (column ``launches``; how it was
  counted in ``timer``, a breakdown in ``launch_detail``; ``launches_vs_eager`` = row / eager).
  On CUDA: the kernels the profiler records on the device (CUPTI). On CPU, as a proxy of a GPU's
  kernel launches: for eager modes the aten ops dispatched below autograd (TorchDispatchMode)
  that launch a kernel (views and allocations do not), for compiled modes Inductor's C++ kernels
  (recorded with ``cpp.enable_kernel_profile``) plus the extern calls (matmuls, convolutions,
  custom ops) and the aten ops that run outside the compiled graph (profiler).
- suite ``optimizer``: one AdamW step as pretraining builds it (``eager``) and replayed from a
  CUDA graph (``cuda-graphs``, capturable AdamW), with the updated parameters compared.
- suite ``compile`` (not run by default): each compiled step mode compiled and not run
  (``first_call_s`` = seconds to compile; the note says whether Inductor's caches were cold). It
  fills AOTAutograd's and Inductor's caches on disk, so a later process that compiles the same
  step (a ``step`` or ``launches`` row, the same mode, model, K, batch and dtype) loads it in
  seconds: bench/gpu_check.sh runs one such process per graph beside its other parts. The
  ``+cuda-graphs`` modes capture the same compiled graph and need no compile row of their own.
- suite ``matmul``: that reference matmul.
- suite ``data`` (not run by default): the input pipeline on one CPU core (the main process, one
  torch thread): decode + training augmentation (and the eval view) of generated JPEGs, uint8 vs
  float32 output, full-size vs reduced-size JPEG decode, and the collate (and pin) cost of a
  batch, uint8 vs float32; energyvit.data.throughput says what each row measures.

``speedup_vs_eager`` = eager time / row time, against ``math-eager`` (attention) or ``eager``
(step) of the same shape, op and dtype. Timing: warm-up first, then on CUDA
triton.testing.do_bench (median, CUDA events), on CPU the median of time.perf_counter repeats.
Inputs are random (seeded), rotated between two sets where the op allows it.
On CUDA, nvidia-ml-py (optional) adds SM clock, mean power and energy per image (difference of
the total-energy counter over a separate timed loop, divided by the images processed).
"""
from __future__ import annotations

import ast
import collections
import contextlib
import csv
import datetime as _dt
import functools
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
from torch.utils._python_dispatch import TorchDispatchMode

import energyvit
from energyvit.attention import math_attention
from energyvit.compiled import compiled_train_step
from energyvit.cuda_graphs import GraphedAdamW, GraphedLossStep
from energyvit.data.throughput import DATA_SIZES
from energyvit.data.throughput import measure as measure_data
from energyvit.methods.mae import MAEBaseline
from energyvit.model import model_config
from energyvit.objective import EnergyOptions, task_loss
from energyvit.training import param_groups

SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the checkout, when the package runs from one
ATTN_OPS = ("fwd", "bwd", "bwdbwd")
ATTN_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "bwdbwd": 6.0}
STEP_MODES = ("eager", "compiled", "fused", "fused+compiled", "cuda-graphs", "compiled+cuda-graphs",
              "fused+cuda-graphs", "fused+compiled+cuda-graphs", "mae")
SUITES = ("matmul", "attention", "step", "launches", "optimizer", "compile", "data")
# compile only warms the caches for another run; data times the CPU's input pipeline, not the device
DEFAULT_SUITES = tuple(s for s in SUITES if s not in ("compile", "data"))
OWN_BACKENDS = ("math-eager", "fused")  # must work at every order: a failure there is an error
GRAPH_WARMUP = 2  # ordinary steps before a cuda-graphs mode captures (autotuning, compiling)

FIELDS = [
    "suite", "op", "backend", "dtype", "model", "img_size", "restore_steps", "batch", "heads", "n", "head_dim",
    "status", "error", "ms", "speedup_vs_eager", "tflops", "mfu", "images_per_s", "first_call_s",
    "grad_rel_err_vs_eager", "peak_mem_mib", "energy_j_per_image", "power_w", "sm_clock_mhz", "flop",
    "launches", "launches_vs_eager", "launch_detail", "note",
    "device", "device_name", "driver", "torch", "triton", "cuda", "python", "git_commit", "date_utc", "timer",
]

# Sizes per preset. "smoke": seconds on CPU (CI, --quick); "cpu": the CPU table; "proxy": the CPU
# launch-count proxy of a GPU step (ViT-Ti; counts do not depend on image size or batch); "gpu":
# ViT shapes (step_rep_ms: do_bench's time per step row). data: the data suite's sizes.
PRESETS = {
    "smoke": dict(attn=[(1, 2, 16, 16)], attn_dtype="fp32", steps=[("vit_pico_patch2", None, 2)],
                  ks=(1, 2), amp=None, matmul=(512, "fp32"), min_reps=3, min_time=0.05,
                  compile_steps={("compiled", 1), ("fused+compiled", 1)}, data=DATA_SIZES["smoke"]),
    "cpu": dict(attn=[(2, 3, 65, 64)], attn_dtype="fp32", steps=[("vit_nano_patch4", None, 8)],
                ks=(1, 2), amp=None, matmul=(1024, "fp32"), min_reps=5, min_time=0.3, compile_steps=None,
                data=DATA_SIZES["full"]),
    "proxy": dict(attn=[(2, 3, 17, 64)], attn_dtype="fp32", steps=[("vit_tiny_patch16", 64, 2)],
                  ks=(1, 2), amp=None, matmul=(1024, "fp32"), min_reps=3, min_time=0.1, compile_steps=None,
                  data=DATA_SIZES["full"]),
    "gpu": dict(attn=[(32, 12, 197, 64), (32, 12, 577, 64)], attn_dtype="bf16",
                steps=[("vit_tiny_patch16", 224, 64), ("vit_small_patch16", 224, 64), ("vit_base_patch16", 224, 64)],
                ks=(1, 2), amp="bf16", matmul=(8192, "bf16"), min_reps=0, min_time=0.0, compile_steps=None,
                step_rep_ms=1000, data=DATA_SIZES["full"]),
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
    outside a checkout has none, and says so, unless ENERGYVIT_GIT_COMMIT names it (a copy of a
    checkout without .git, e.g. on a GPU machine)."""
    given = os.environ.get("ENERGYVIT_GIT_COMMIT", "").strip()
    if given and not (root / ".git").exists():
        return f"{given} (ENERGYVIT_GIT_COMMIT)"
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


def time_ms(fn, device: torch.device, min_reps: int = 5, min_time: float = 0.3, long: bool = False,
            rep_ms: int | None = None) -> tuple[float, str]:
    """Median milliseconds of fn() after a warm-up call; (ms, method). On CUDA, rep_ms replaces
    do_bench's measuring time."""
    sync = make_sync(device)
    fn()
    sync()
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            warmup, rep = (200, 2000) if long else (25, 200)
            rep = rep_ms or rep
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
    compiled: bool = False  # the step runs Inductor-compiled code (not fallen back to eager)


def _images(cfg, batch: int, device: torch.device):
    """Seeded random images and their mim corruption (half the patches), on `device`."""
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    corrupted = energyvit.corrupt(clean, "mim", patch_size=cfg.patch_size, generator=g, mask_ratio=0.5)
    return clean.to(device), corrupted.to(device)


def inductor_option(text: str) -> tuple[str, object]:
    """'KEY=VALUE' -> (KEY, VALUE) for torch.compile(options=...): KEY an option of
    torch._inductor.config (dotted for nested ones), VALUE a Python literal."""
    import torch._inductor.config as inductor_config

    key, sep, value = text.partition("=")
    if not sep or key not in inductor_config.get_config_copy():
        raise ValueError(f"expected KEY=VALUE with KEY an option of torch._inductor.config, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise ValueError(f"the value of {key} must be a Python literal (True, 0, 'name'), got {value!r}") from None


class CompiledOnly(Exception):
    """Raised instead of running a step compiled by compile_only_backend."""


def compile_only_backend(config_patches: dict):
    """A torch.compile backend that compiles as the default (Inductor) backend does, which fills
    AOTAutograd's and Inductor's caches on disk, and then raises CompiledOnly instead of running
    the graph: nothing of the step runs on the device."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        compile_fx(gm, example_inputs, config_patches=config_patches or None)

        def not_run(*args):
            raise CompiledOnly

        return not_run

    return backend


def _cache_counts() -> collections.Counter:
    c = torch._dynamo.utils.counters
    return collections.Counter({"hit": c["inductor"]["fxgraph_cache_hit"], "miss": c["inductor"]["fxgraph_cache_miss"]})


def _cache_note(before: collections.Counter) -> str:
    """Whether the graphs compiled since `before` came from Inductor's cache on disk."""
    d = _cache_counts() - before
    return f"Inductor cache: {d['hit']} hit(s), {d['miss']} miss(es)" if d else ""


def step_case(mode: str, model_name: str, img_size, restore_steps: int, batch: int, device: torch.device,
              amp: str | None, kernel_profile: bool = False, compile_only: bool = False,
              inductor: dict | None = None) -> StepCase:
    """The pretraining step of `mode` on random images (seeded; mim corruption), called once (a
    cuda-graphs mode: until its first replay). kernel_profile: compiled code records each of its
    CPU kernels for the profiler (torch._inductor.config.cpp.enable_kernel_profile). compile_only
    (a compiled mode): compile the step, then raise CompiledOnly instead of running it. inductor:
    options for Inductor in the compiled modes (torch.compile's options)."""
    if mode == "mae":
        return mae_case(model_name, img_size, batch, device, amp)
    parts = set(mode.split("+"))
    if not parts <= {"eager", "fused", "compiled", "cuda-graphs"}:
        raise ValueError(f"unknown step mode {mode!r}; choose from {', '.join(STEP_MODES)}")
    backend = "fused" if "fused" in parts else "math"
    if backend == "fused":
        attention_fn("fused", device, 1.0)  # raises Unavailable with the reason
    if "cuda-graphs" in parts and device.type != "cuda":
        raise Unavailable(f"CUDA graphs need a CUDA device (this run is on {device.type})")
    stepper = graphed = None
    cache_before = _cache_counts()
    torch.manual_seed(0)
    model = energyvit.create_model(model_name, img_size=img_size, restore_steps=restore_steps,
                                   attn_backend=backend).to(device)
    model.train()
    cfg = model.cfg
    clean, corrupted = _images(cfg, batch, device)
    opts = EnergyOptions()
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = (lambda: torch.autocast(device.type, dtype=DTYPES[amp])) if amp else contextlib.nullcontext
    if "compiled" in parts:
        # our own gradient check against the eager step replaces the built-in one (whose
        # tolerance is for fp32, too tight under bf16 autocast); see grad_rel_err_vs_eager
        patches = {**(inductor or {}), **({"cpp.enable_kernel_profile": True} if kernel_profile else {})}
        how = ({"backend": compile_only_backend(patches)} if compile_only
               else {"options": patches} if patches else {})
        stepper = compiled_train_step(model, opts, verify_first_step=False, **how)
        loss_fn = lambda: stepper(clean, corrupted)  # noqa: E731
    else:
        loss_fn = lambda: task_loss(model, clean, corrupted, opts)  # noqa: E731
    if "cuda-graphs" in parts:
        graphed = GraphedLossStep(model, opts, stepper, warmup_steps=GRAPH_WARMUP)
        loss_fn = lambda: graphed(clean, corrupted)  # noqa: E731

    def fn():
        for p in params:
            p.grad = None
        with autocast():
            loss = loss_fn()
        loss.backward()  # a replayed step's backward adds nothing: the graph wrote p.grad
        return loss.detach()

    sync = make_sync(device)
    sync()
    t = time.perf_counter()
    for _ in range(GRAPH_WARMUP + 1 if graphed is not None else 1):
        fn()
    sync()
    case = StepCase(fn, model, model_flops(cfg, restore_steps, batch), batch, stepper, time.perf_counter() - t)
    notes = []
    if stepper is not None:
        case.compiled = stepper.mode == "compiled"
        if not case.compiled:
            notes.append(f"compiled step fell back to eager (mode={stepper.mode})")
        notes.append(_cache_note(cache_before))
    if graphed is not None:
        if graphed.mode != "graph":
            notes.append(f"CUDA graph capture failed: ordinary step (mode={graphed.mode})")
        else:
            notes.append(f"first_call_s: {GRAPH_WARMUP} warm-up steps + capture + first replay")
    case.note = "; ".join(filter(None, notes))
    return case


def mae_case(model_name: str, img_size, batch: int, device: torch.device, amp: str | None) -> StepCase:
    """An MAE step (loss + backward, no optimizer) on the same encoder, for reference; FLOPs not
    counted (0)."""
    torch.manual_seed(0)
    mae = MAEBaseline(model_config(model_name, img_size=img_size)).to(device)
    mae.train()
    clean, _ = _images(mae.encoder.cfg, batch, device)
    params = [p for p in mae.parameters() if p.requires_grad]
    autocast = (lambda: torch.autocast(device.type, dtype=DTYPES[amp])) if amp else contextlib.nullcontext

    def fn():
        for p in params:
            p.grad = None
        with autocast():
            loss = mae.forward_loss(clean)
        loss.backward()
        return loss.detach()

    sync = make_sync(device)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return StepCase(fn, mae, 0.0, batch, None, time.perf_counter() - t, "MAE: encoder on the visible 25% of the "
                    "patches + decoder, loss + backward (FLOPs not counted)")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64."""
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def flat_grads(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().double().cpu()
                      for p in model.parameters() if p.requires_grad])


# ------------------------------------------------------------------------------------ launches
# aten ops that launch no kernel although their schema is not a view: allocations, and the
# view _unsafe_view (a reshape whose result is not marked as aliasing its input)
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view", "resize_",
              "lift_fresh", "set_"}
_OP_NAMESPACES = ("aten", "prims", "energyvit")  # profiler events of dispatched ops: "aten::mm", ...
_MATMULS = ("mm", "bmm", "addmm", "baddbmm", "convolution", "convolution_backward")
_LAYOUT_WORDS = {"clone", "permute", "transpose", "view", "select", "unsafe", "expand", "unsqueeze", "squeeze",
                 "slice", "t", "cat", "copy", "alias", "reshape", "as", "strided"}


# the project's attention ops (energyvit.kernels.ops) and the Triton kernels each one launches
_CUSTOM_OP_KERNELS = {"attn_fwd": 1, "attn_bwd": 2, "attn_bwdbwd": 2, "attn_packed_fwd": 1, "attn_packed_bwd": 2,
                      "attn_packed_bwdbwd": 2}


@functools.lru_cache(maxsize=None)
def kernels_per_op(name: str) -> int:
    """Kernels a dispatched op `name` ("aten::mm", "energyvit::attn_packed_bwd") launches on a GPU,
    as counted here: 0 for views and allocations, the Triton kernels of the project's attention
    ops, 1 for any other op (some aten ops launch two on CUDA: the CPU count is a lower bound)."""
    ns, _, op = name.partition("::")
    op, _, overload = op.partition(".")  # the dispatch count names overloads ("aten::mul.Tensor"), the profiler not
    if ns == "energyvit" and op in _CUSTOM_OP_KERNELS:
        return _CUSTOM_OP_KERNELS[op]
    if op in _NO_KERNEL:
        return 0
    try:
        packet = getattr(getattr(torch.ops, ns), op)
        overloads = [overload or "default"] if overload or "default" in packet.overloads() else packet.overloads()
        return 0 if any(getattr(packet, o).is_view for o in overloads) else 1
    except (AttributeError, RuntimeError):
        return 1


def kernel_category(name: str) -> str:
    """What a kernel does, from its name: Inductor names its kernels after the aten ops they fuse
    (cpp_fused_* on CPU, triton_{poi,red,per}_fused_* on CUDA); the first of softmax, layer_norm,
    gelu, layout-only (copies and views) or other; the project's attention kernels; library
    matmuls/convolutions; aten's own kernels."""
    if "fused_" in name and ("cpp_fused" in name or name.startswith("triton_")):
        ops = re.sub(r"_\d+$", "", name.split("fused_", 1)[1])
        for cat in ("softmax", "layer_norm", "gelu"):
            if cat in ops:
                return cat
        return "layout" if set(ops.split("_")) <= _LAYOUT_WORDS else "other"
    if re.match(r"_?attn_\w*kernel|_?(fwd|bwd_dq|bwd_dkdv|bwdbwd_q|bwdbwd_kv)$", name):
        return "fused attention"
    if re.search(r"gemm|nvjet|cutlass|xmma|cublas|cudnn|conv|wgmma", name, re.IGNORECASE):
        return "cuBLAS/cuDNN"
    return "aten"


def _counts(counter: collections.Counter, n: int = 8) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.most_common(n))


class _DispatchCount(TorchDispatchMode):
    """Counts the aten ops dispatched below autograd (each op once: the mode is off inside its own handler)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.name()] += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn) -> collections.Counter:
    """op name ("aten::mm") -> how many times one call of fn dispatches it."""
    with _DispatchCount() as mode:
        fn()
    return mode.ops


def _profile(fn, device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = make_sync(device)
    sync()
    with profile(activities=acts) as prof:
        fn()
        sync()
    return prof.events()


def _is_op(name: str) -> bool:
    return name.partition("::")[0] in _OP_NAMESPACES and "::" in name


def _top_level_ops(events):
    """(event, inside a compiled region) for each dispatched op not nested in another op."""
    out = []
    for e in events:
        if not _is_op(e.name):
            continue
        p, nested, compiled = e.cpu_parent, False, False
        while p is not None:
            nested |= _is_op(p.name)
            compiled |= p.name.startswith("Torch-Compiled Region")
            p = p.cpu_parent
        if not nested:
            out.append((e, compiled))
    return out


@dataclass
class LaunchCount:
    launches: int
    detail: str
    counter: str


def count_launches(case: StepCase, device: torch.device) -> LaunchCount:
    """What one call of case.fn launches (see the module docstring: CUDA kernels on a GPU; on CPU
    a proxy of them)."""
    if device.type == "cuda":
        events = _profile(case.fn, device)
        dev = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels = [e for e in dev if not e.name.startswith(("Memcpy", "Memset"))]
        if not kernels:
            raise RuntimeError("the profiler recorded no CUDA kernel (is CUPTI available?)")
        host = collections.Counter(e.name for e in events if e.device_type == torch.autograd.DeviceType.CPU
                                   and re.fullmatch(r"cu(da)?(LaunchKernel\w*|GraphLaunch|MemcpyAsync|MemsetAsync)", e.name))
        cats = collections.Counter(kernel_category(e.name) for e in kernels)
        return LaunchCount(len(kernels), f"{len(kernels)} kernels ({_counts(cats)}) + {len(dev) - len(kernels)} "
                           f"memcpy/memset; host launch calls {sum(host.values())} ({_counts(host)})",
                           "torch.profiler: CUDA kernels on the device (CUPTI), one step")
    if not case.compiled:
        ops = dispatched_ops(case.fn)
        launching = collections.Counter({k: v * kernels_per_op(k) for k, v in ops.items() if kernels_per_op(k)})
        mm = sum(v for k, v in launching.items() if k.partition("::")[2] in _MATMULS)
        return LaunchCount(sum(launching.values()), f"ops {sum(ops.values())}, of which those that launch a kernel "
                           f"give {sum(launching.values())} ({mm} matmuls/convolutions; views and allocations launch "
                           f"none): {_counts(launching)}",
                           "CPU proxy: TorchDispatchMode count of the ops one step dispatches below autograd")
    events = _profile(case.fn, device)
    kernels = [e for e in events if "cpp_fused" in e.name]
    if not kernels:
        raise RuntimeError("no Inductor kernel in the profile: the compiled step was built without "
                           "cpp.enable_kernel_profile (step_case(kernel_profile=True))")
    extern, outside = collections.Counter(), collections.Counter()
    for e, inside in _top_level_ops(events):
        (extern if inside else outside)[e.name] += kernels_per_op(e.name)
    extern, outside = +extern, +outside  # drop the ops that launch nothing
    cats = collections.Counter(kernel_category(e.name) for e in kernels)
    total = len(kernels) + sum(extern.values()) + sum(outside.values())
    return LaunchCount(total, f"{len(kernels)} Inductor kernels ({_counts(cats)}) + {sum(extern.values())} extern calls "
                       f"({_counts(extern)}) + {sum(outside.values())} aten ops outside the compiled graph "
                       f"({_counts(outside)})",
                       "CPU proxy: torch.profiler, Inductor C++ kernels (cpp.enable_kernel_profile) + extern calls "
                       "+ eager aten ops that launch a kernel")


# ------------------------------------------------------------------------------------ optimizer
def optimizer_case(mode: str, model_name: str, img_size, device: torch.device, steps: int = 2):
    """(fn, model): one AdamW step of `model_name`'s parameters with fixed random gradients,
    `steps` already taken; mode eager (torch.optim.AdamW, as pretraining builds it) or
    cuda-graphs (GraphedAdamW: the first step eager, then captured and replayed)."""
    if mode == "cuda-graphs" and device.type != "cuda":
        raise Unavailable(f"CUDA graphs need a CUDA device (this run is on {device.type})")
    torch.manual_seed(0)
    model = energyvit.create_model(model_name, img_size=img_size).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(p.shape, generator=g).to(device) for p in params]
    for p, gr in zip(params, grads):
        p.grad = gr
    cls = GraphedAdamW if mode == "cuda-graphs" else torch.optim.AdamW
    opt = cls(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    if isinstance(opt, GraphedAdamW):
        opt.use_static_grads(params, grads, None, None)
    for _ in range(steps):
        opt.step()
    return opt.step, model


# ------------------------------------------------------------------------------------ runner
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
            "launches_vs_eager": "row launches / eager launches, same model, K, batch; CPU counts are a proxy of GPU "
                                 "kernel launches (see the module docstring)",
            "mfu_reference": "", "command": " ".join(sys.argv), "loadavg_start": _loadavg(),
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
        ms, how = time_ms(fn, self.device, self.p["min_reps"], self.p["min_time"], long,
                          self.p.get("step_rep_ms") if long else None)
        out = {"ms": f"{ms:.4f}", "tflops": f"{flop / ms / 1e9:.4g}" if flop else "", "flop": f"{flop:.4g}" if flop else "",
               "timer": how,
               "images_per_s": f"{images / ms * 1e3:.1f}", "peak_mem_mib": peak_mem_mib(fn, self.device)}
        if self.device.type == "cuda" and images:
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

    def step_order(self) -> list[tuple]:
        """((model, img, batch), K, mode) in the order rows run, so that a time budget cuts the least
        informative ones: at the smallest K the modes without compilation for every model, MAE once
        per model, then the compiled modes for every model; then each larger K the same way. A
        model's compiled modes run back to back: compiled+cuda-graphs loads compiled's graph from
        Inductor's cache (and every compiled row does when the compile suite ran before, as in
        bench/gpu_check.sh)."""
        modes = [m for m in STEP_MODES if m in self.cfg.step_modes]
        fast = [m for m in modes if "compiled" not in m and m != "mae"]
        slow = [m for m in modes if "compiled" in m]
        steps = [s for s in self.p["steps"] if self.cfg.models is None or s[0] in self.cfg.models]
        ks = sorted(k for k in self.p["ks"] if self.cfg.ks is None or k in self.cfg.ks)
        order = []
        for i, k in enumerate(ks):
            order += [(s, k, m) for m in fast for s in steps]
            if i == 0:
                order += [(s, "", "mae") for s in steps if "mae" in modes]
            order += [(s, k, m) for s in steps for m in slow]
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
            before, t = _cache_counts(), time.perf_counter()
            try:
                case = step_case(mode, name, img, K, batch, self.device, self.p["amp"],
                                 kernel_profile=self.device.type == "cpu", compile_only=True, inductor=self.cfg.inductor)
            except CompiledOnly:
                self.add(**base, status="ok", first_call_s=f"{time.perf_counter() - t:.2f}", note=_cache_note(before))
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
                    self.add(suite=suite, **base, **self.failed(e, mode in ("eager", "fused")))
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
                    self.add(suite="launches", **base, **self.failed(e, mode in ("eager", "fused")))
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
        """A step row: time, MFU, and the gradients against the eager step of the same shape (a
        cuda-graphs mode also against its mode without the graph, in the note)."""
        extra = {"first_call_s": f"{case.first_call_s:.2f}", "note": case.note}
        key = (base["model"], base["restore_steps"])
        try:
            grads = flat_grads(case.model)
            if "cuda-graphs" not in mode:
                ref_grads[key + (mode,)] = grads.float()  # float32 copies: ViT-B's are 0.3 GB each
            if mode != "eager" and key + ("eager",) in ref_grads:
                extra["grad_rel_err_vs_eager"] = f"{rel_err(grads, ref_grads[key + ('eager',)]):.2e}"
            plain = mode.replace("+cuda-graphs", "").replace("cuda-graphs", "eager")
            if "cuda-graphs" in mode and key + (plain,) in ref_grads:
                versus = f"grads vs {plain} (no graph): {rel_err(grads, ref_grads[key + (plain,)]):.2e}"
                extra["note"] = "; ".join(filter(None, [case.note, versus]))
            res = self.measure(case.fn, case.flops, case.images, long=True)
            if self.matmul_tflops and case.flops:
                res["mfu"] = f"{float(res['tflops']) / self.matmul_tflops:.4f}"
            if "cuda-graphs" in mode:  # activations live in the graph's pool, which max_memory_allocated misses
                res["peak_mem_mib"] = "n/a (graph pool)"
            self.add(suite="step", **base, status=status, **extra, **res)
        except Exception as e:  # noqa: BLE001
            self.add(suite="step", **base, **self.failed(e, mode in ("eager", "fused")))

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
        if "matmul" in self.cfg.suites or "step" in self.cfg.suites:
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
    """speedup_vs_eager = eager ms / row ms, and launches_vs_eager = row launches / eager launches,
    for rows with an eager row of the same suite, shape, op and dtype."""
    def key(r):
        return (r["suite"], r["op"], r["dtype"], r["model"], r["img_size"], r["restore_steps"], r["batch"],
                r["heads"], r["n"], r["head_dim"])

    eager = [r for r in rows if r["status"] == "ok" and r["backend"] in ("math-eager", "eager")]
    ms = {key(r): float(r["ms"]) for r in eager if r["ms"] != ""}
    launches = {key(r): int(r["launches"]) for r in eager if r["launches"] != ""}
    for r in rows:
        if r["status"] not in ("ok", "fallback-eager"):
            continue
        if r["ms"] != "" and key(r) in ms:
            r["speedup_vs_eager"] = f"{ms[key(r)] / float(r['ms']):.4g}"
        if r["launches"] != "" and key(r) in launches:
            r["launches_vs_eager"] = f"{int(r['launches']) / launches[key(r)]:.3f}"


def format_table(rows: list[dict]) -> str:
    cols = [("suite", "suite"), ("op", "op"), ("backend", "backend"), ("shape", None), ("dtype", "dtype"),
            ("status", "status"), ("ms", "ms"), ("img/s", "images_per_s"), ("x eager", "speedup_vs_eager"),
            ("TFLOP/s", "tflops"),
            ("MFU", "mfu"), ("peak MiB", "peak_mem_mib"), ("J/img", "energy_j_per_image"), ("launches", "launches"),
            ("/ eager", "launches_vs_eager"), ("error / note", None)]
    lines = []
    for r in rows:
        note = r["error"] or r["note"]
        if r["suite"] == "compile" and r["status"] == "ok":
            note = f"compiled in {r['first_call_s']} s; {note}"
        if r["suite"] in ("step", "launches", "compile"):
            shape = f"{r['model']}@{r['img_size']} K={r['restore_steps'] or '-'} B={r['batch']}"
        elif r["suite"] == "optimizer":
            shape = f"{r['model']} params"
        elif r["suite"] == "data":
            shape = f"{r['img_size']}px" + (f" B={r['batch']}" if r["op"].startswith("collate") else "")
        elif r["suite"] == "attention":
            shape = f"B={r['batch']} H={r['heads']} N={r['n']} d={r['head_dim']}"
        else:
            shape = f"{r['n']}^3"
        cells = []
        for title, k in cols:
            if title == "shape":
                cells.append(shape)
            elif title == "error / note":
                cells.append(note[:90])
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
