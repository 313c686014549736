"""Timing: a warm-up, then repeats whose median and quartiles make a row's time; and the device
time of the kernels alone (CUDA profiler)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

STEP_WARMUP_MS, STEP_REP_MS = 200, 2000  # do_bench's warm-up and measuring time for a step row
OP_WARMUP_MS, OP_REP_MS = 25, 200  # ... for an attention op or a matmul


def make_sync(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass
class Timing:
    """Milliseconds per call over `reps` timed calls: median, quartiles, min and max."""

    ms: float
    q1: float
    q3: float
    lo: float
    hi: float
    reps: int
    method: str

    @classmethod
    def of(cls, times_ms: list[float], method: str) -> Timing:
        if len(times_ms) > 1:
            q1, _, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
        else:
            q1 = q3 = times_ms[0]
        return cls(statistics.median(times_ms), q1, q3, min(times_ms), max(times_ms), len(times_ms), method)

    def fields(self) -> dict:
        """The row's columns ms, ms_q1, ms_q3, ms_min, ms_max, reps, timer."""
        return {"ms": f"{self.ms:.4f}", "ms_q1": f"{self.q1:.4f}", "ms_q3": f"{self.q3:.4f}",
                "ms_min": f"{self.lo:.4f}", "ms_max": f"{self.hi:.4f}", "reps": str(self.reps), "timer": self.method}


def _do_bench(fn, warmup: int, rep: float) -> tuple[list[float], str]:
    """triton's do_bench (CUDA events, L2 flushed before each call): every call's time, or its
    quantiles where this triton cannot return them all."""
    from triton.testing import do_bench

    try:
        times = do_bench(fn, warmup=warmup, rep=rep, return_mode="all")
        return [float(t) for t in times], "triton do_bench (CUDA events)"
    except (AssertionError, TypeError, ValueError):  # an older triton: quantiles only
        qs = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.0, 0.25, 0.5, 0.75, 1.0])
        return [float(t) for t in qs], "triton do_bench quantiles 0, .25, .5, .75, 1 (CUDA events; reps = 5 quantiles)"


def time_ms(fn, device: torch.device, min_reps: int = 5, min_time: float = 0.3, long: bool = False,
            rep_ms: int | None = None) -> Timing:
    """fn()'s time after a warm-up call, over at least max(min_reps, 1) calls. On CUDA, do_bench
    measures for rep_ms (default: STEP_REP_MS for a `long` row, else OP_REP_MS), stretched to
    min_reps calls; on the CPU, time.perf_counter around each call, for at least min_time s."""
    sync = make_sync(device)
    fn()
    sync()
    if device.type == "cuda":
        t = time.perf_counter()
        fn()
        sync()
        one_ms = (time.perf_counter() - t) * 1e3
        rep = max(rep_ms or (STEP_REP_MS if long else OP_REP_MS), min_reps * one_ms * 1.1)
        try:
            times, how = _do_bench(fn, STEP_WARMUP_MS if long else OP_WARMUP_MS, rep)
        except ImportError:
            from torch.utils import benchmark as tb

            m = tb.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=max(1.0, rep / 1e3))
            times, how = [t * 1e3 / m.number_per_run for t in m.raw_times], "torch.utils.benchmark blocks"
        return Timing.of(times, how)
    times = []
    start = time.perf_counter()
    while len(times) < max(min_reps, 1) or (time.perf_counter() - start < min_time and len(times) < 1000):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return Timing.of(times, "time.perf_counter per call")


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


def kernel_ms(events, calls: int) -> float | None:
    """Summed duration of the CUDA kernels among profiler `events`, per call (memcpy and memset
    left out); None without any kernel."""
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset"))]
    if not kernels:
        return None
    return sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / calls


def device_ms(fn, device: torch.device, calls: int = 10) -> str:
    """Kernel-only device time of fn() in ms (the profiler's kernel durations summed, per call: no
    host time, no gaps between kernels); 'n/a' off CUDA."""
    if device.type != "cuda":
        return "n/a"
    from torch.profiler import ProfilerActivity, profile

    sync = make_sync(device)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync()
    ms = kernel_ms(prof.events(), calls)
    return "n/a (no CUDA kernel recorded: CUPTI?)" if ms is None else f"{ms:.4f}"
