"""Correctness and timing check of the fused second-order attention kernels.

CUDA (default): ViT shapes, batch 64 x heads 12, head_dim 64, N in 197, 577, 1024.
  1. correctness of fwd (o, lse), bwd (dq, dk, dv) and bwd-of-bwd (gq, gk, gv, gdo) in float32
     and bfloat16 against the eager math path in float64 (reference computed in chunks of
     heads); relative error ||out - ref|| / ||ref||, with the eager math path in the same dtype
     alongside for context.
  2. timings (triton.testing.do_bench, median) of fwd, fwd+bwd and bwd-of-bwd: fused vs eager
     math vs SDPA (flash, torch's bundled FlashAttention-2, and cuDNN's for 16-bit, memory-efficient
     for fp32; fwd and fwd+bwd only: SDPA has no second derivative); ms through autograd (host-bound
     at small N) and device_ms, the kernels alone (profiler, summed per call). TFLOP/s use nominal counts: fwd 4*B*H*N^2*d, fwd+bwd 3.5x that,
     bwd-of-bwd 6x (the fused kernels execute about 9.5x; see docs/kernels.md). Peak memory from
     torch.cuda.max_memory_allocated, reset before each one-off run.
  3. --ops: each fused op alone (the launcher functions the custom ops run: fwd, bwd, bwd-of-bwd),
     in the (B, H, N, d) and the packed-qkv layout (the model's), with the block configs the
     autotuner chose for each of its kernels (the interpreter's fixed ones on CPU); then, per N,
     where one fwd+bwd chain's time goes: host time to issue it against its kernels' device time
     (profiler), fused in both layouts and SDPA, with the host's costliest ops.
--cpu-small: tiny shapes through the Triton interpreter (correctness + timings labelled CPU).

Writes <out>/gpu_check.csv ('#' header lines: device, versions, git commit, date) and prints a
readable log. Usage: python bench/gpu_check.py [--cpu-small] [--out DIR] [--timing-dtypes bf16,fp32]
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-small", action="store_true", help="tiny shapes on CPU via TRITON_INTERPRET=1")
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results" / "local")))
    ap.add_argument("--timing-dtypes", default=None, help="comma list of fp32,fp16,bf16 to time")
    ap.add_argument("--ns", default=None, help="comma list of sequence lengths (overrides the default)")
    ap.add_argument("--no-correctness", action="store_true")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--ops", action="store_true", help="also time each fused op alone, with the autotuner's configs")
    return ap.parse_args()


ARGS = parse_args()
if ARGS.cpu_small:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the triton import

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402


def _import_package():
    """energyvit.kernels, from the installed package or, failing that, from this checkout."""
    try:
        return importlib.import_module("energyvit.kernels"), importlib.import_module("energyvit.attention")
    except ModuleNotFoundError as e:
        if e.name not in ("energyvit", "energyvit.kernels"):
            raise
    sys.path.insert(0, str(ROOT))
    import energyvit

    spec = importlib.util.spec_from_file_location(
        "energyvit.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["energyvit.kernels"] = mod
    spec.loader.exec_module(mod)
    energyvit.kernels = mod
    return mod, importlib.import_module("energyvit.attention")


EK, EA = _import_package()
from energyvit.benchmark import device_ms, git_commit  # noqa: E402
from energyvit.kernels import triton_attention as KMOD  # noqa: E402
math_attention = EA.math_attention
attn_fwd, attn_bwd, attn_bwdbwd = EK.attn_fwd, EK.attn_bwd, EK.attn_bwdbwd

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DNAME = {v: k for k, v in DTYPES.items()}

if ARGS.cpu_small:
    DEVICE, LABEL = "cpu", "CPU (Triton interpreter; timings are NOT GPU numbers)"
    BATCH, HEADS, HEAD_D = 1, 3, 40
    NS = [50, 77]
    CHECK_DTYPES = [torch.float32, torch.float16]
    TIME_DTYPES = [torch.float32]
    CHUNK = 3
    TOL = {torch.float32: 2e-5, torch.float16: 1e-2}
else:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu-small for the interpreter check")
    DEVICE, LABEL = "cuda", torch.cuda.get_device_name()
    BATCH, HEADS, HEAD_D = 64, 12, 64
    NS = [197, 577, 1024]
    CHECK_DTYPES = [torch.float32, torch.bfloat16]
    TIME_DTYPES = [torch.bfloat16, torch.float32]
    CHUNK = 64  # heads per float64 reference chunk
    TOL = {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # fp32 dots are TF32
if ARGS.ns:
    NS = [int(x) for x in ARGS.ns.split(",")]


def lse_tol(dtype: torch.dtype) -> float:
    """lse is accumulated in fp32 whatever the input dtype; its error follows the dot products:
    exact products of half-precision inputs or IEEE fp32 give ~1e-7, fp32 inputs through TF32
    dots (10-bit mantissas) ~1e-4 (measured 1.2e-4 on an H200)."""
    tf32 = dtype == torch.float32 and DEVICE == "cuda" and KMOD.ALLOW_TF32
    return 1e-3 if tf32 else 1e-5
if ARGS.timing_dtypes:
    TIME_DTYPES = [DTYPES[x] for x in ARGS.timing_dtypes.split(",")]

FIELDS = ["kind", "op", "dtype", "batch", "heads", "n", "head_dim", "impl", "output",
          "rel_err", "tol", "ok", "ms", "device_ms", "tflops", "peak_mib", "extra_mib", "note"]
ROWS: list[dict] = []


def row(**kw):
    r = {f: "" for f in FIELDS}
    r.update(kw)
    ROWS.append(r)
    shown = {k: v for k, v in r.items() if v != "" and k not in ("batch", "heads", "head_dim")}
    print("  " + "  ".join(f"{k}={v}" for k, v in shown.items()), flush=True)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def randn(shape, dtype, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float32).to(dtype)


# ------------------------------------------------------------------------------------ references
def ref_all(q, k, v, do, gdq, gdk, gdv, scale, dtype):
    """Eager math path in `dtype` (float64 for the reference): o, lse, (dq, dk, dv), (gq, gk, gv, gdo)."""
    x = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v, do)]
    o = math_attention(x[0], x[1], x[2], scale)
    s = torch.matmul(x[0], x[1].transpose(-2, -1)) * scale
    lse = torch.logsumexp(s if dtype == torch.float64 else s.float(), -1)
    dq, dk, dv = torch.autograd.grad(o, x[:3], x[3], create_graph=True)
    loss = sum((a * b.to(dtype)).sum() for a, b in zip((dq, dk, dv), (gdq, gdk, gdv)))
    second = torch.autograd.grad(loss, x)
    return [t.detach() for t in (o, lse, dq, dk, dv, *second)]


NAMES = ["o", "lse", "dq", "dk", "dv", "gq", "gk", "gv", "gdo"]
OPS = ["fwd", "fwd", "bwd", "bwd", "bwd", "bwdbwd", "bwdbwd", "bwdbwd", "bwdbwd"]


def correctness(n, dtype):
    shape = (BATCH, HEADS, n, HEAD_D)
    scale = HEAD_D ** -0.5
    q, k, v, do, gdq, gdk, gdv = (randn(shape, dtype, 100 + i) for i in range(7))
    o, lse = attn_fwd(q, k, v, scale)
    fused = [o, lse, *attn_bwd(q, k, v, o, lse, do, scale), *attn_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, scale)]
    sync()
    flat = lambda t: t.reshape(BATCH * HEADS, *t.shape[2:])  # noqa: E731
    ins = [flat(t) for t in (q, k, v, do, gdq, gdk, gdv)]
    fused = [flat(t) for t in fused]
    err2 = {impl: [0.0] * 9 for impl in ("fused", "eager-math")}
    ref2 = [0.0] * 9
    finite = [True] * 9
    for s in range(0, BATCH * HEADS, CHUNK):
        sl = slice(s, s + CHUNK)
        chunk = [t[sl].unsqueeze(0) for t in ins]
        ref = ref_all(*chunk, scale, torch.float64)
        eager = ref_all(*chunk, scale, dtype) if dtype != torch.float64 else ref
        for i in range(9):
            r = ref[i].squeeze(0).double()
            f = fused[i][sl].double()
            finite[i] &= bool(torch.isfinite(f).all())
            ref2[i] += r.pow(2).sum().item()
            err2["fused"][i] += (f - r).pow(2).sum().item()
            err2["eager-math"][i] += (eager[i].squeeze(0).double() - r).pow(2).sum().item()
        del ref, eager
    ok_all = True
    for i, name in enumerate(NAMES):
        for impl in ("fused", "eager-math"):
            e = (err2[impl][i] / ref2[i]) ** 0.5 if ref2[i] > 0 else err2[impl][i] ** 0.5
            tol = (lse_tol(dtype) if name == "lse" else TOL[dtype]) if impl == "fused" else ""
            ok = (e < tol and finite[i]) if impl == "fused" else ""
            ok_all &= ok is not False
            row(kind="correctness", op=OPS[i], dtype=DNAME[dtype], batch=BATCH, heads=HEADS, n=n,
                head_dim=HEAD_D, impl=impl, output=name, rel_err=f"{e:.3e}", tol=tol, ok=ok,
                note="" if impl == "fused" else f"eager math in {DNAME[dtype]} vs float64 (context)")
    return ok_all


# ------------------------------------------------------------------------------------ timing
def bench_ms(fn):
    fn()  # compile / autotune outside the measurement
    sync()
    if DEVICE == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def peak_mem(fn):
    if DEVICE != "cuda":
        return "", ""
    sync()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    sync()
    peak = torch.cuda.max_memory_allocated()
    del out
    return f"{peak / 2**20:.0f}", f"{(peak - base) / 2**20:.0f}"


class Rotate:
    """Cycle through several input sets so no timing reuses one set (and none is zeros)."""

    def __init__(self, sets):
        self.sets, self.i = sets, 0

    def next(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


def sdpa_attention(dtype, scale, backend=None):
    """(name, att(q, k, v)): SDPA pinned to `backend` (an SDPBackend), by default the one
    sdpa_backend picks (CPU: its own choice)."""
    from torch.nn.attention import sdpa_kernel

    name = SDPA_NAMES.get(backend, "sdpa-default")
    if backend is None:
        backend, name = sdpa_backend(dtype)

    def sdpa(q, k, v):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    return name, sdpa


def _sdpa_names():
    from torch.nn.attention import SDPBackend

    names = {SDPBackend.FLASH_ATTENTION: "sdpa-flash (FA2)", SDPBackend.EFFICIENT_ATTENTION: "sdpa-mem-efficient"}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        names[SDPBackend.CUDNN_ATTENTION] = "sdpa-cudnn"
    return names


SDPA_NAMES = _sdpa_names()  # flash: torch's bundled FlashAttention-2 kernels


def sdpa_backend(dtype):
    from torch.nn.attention import SDPBackend

    if DEVICE != "cuda":
        return None, "sdpa-default"
    backend = SDPBackend.EFFICIENT_ATTENTION if dtype == torch.float32 else SDPBackend.FLASH_ATTENTION
    return backend, SDPA_NAMES[backend]


def timing(n, dtype):
    shape = (BATCH, HEADS, n, HEAD_D)
    scale = HEAD_D ** -0.5
    fwd_flop = 4.0 * BATCH * HEADS * n * n * HEAD_D
    sets = [[randn(shape, dtype, 1000 + 10 * j + i).requires_grad_() for i in range(3)] + [randn(shape, dtype, 1000 + 10 * j + 3)]
            for j in range(2)]
    rot = Rotate(sets)
    sdpa_name, sdpa = sdpa_attention(dtype, scale)
    impls = {"fused": lambda q, k, v: EK.attention(q, k, v, scale=scale),
             "eager-math": lambda q, k, v: math_attention(q, k, v, scale),
             sdpa_name: sdpa}
    cudnn = [b for b, name in SDPA_NAMES.items() if name == "sdpa-cudnn"]
    if DEVICE == "cuda" and dtype != torch.float32 and cudnn:  # the other fast first-order kernel on Hopper
        impls.update([sdpa_attention(dtype, scale, cudnn[0])])

    def emit(op, impl, ms, flop, mem, note="", fn=None):
        """A timing row: ms through autograd, device_ms of fn's kernels alone (profiler)."""
        row(kind="timing", op=op, dtype=DNAME[dtype], batch=BATCH, heads=HEADS, n=n, head_dim=HEAD_D,
            impl=impl, ms=f"{ms:.4f}", device_ms=device_ms(fn, torch.device(DEVICE)) if fn is not None else "",
            tflops=f"{flop / ms / 1e9:.4g}", peak_mib=mem[0], extra_mib=mem[1], note=note)

    def guarded(op, impl, body):
        try:
            body()
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            row(kind="timing", op=op, dtype=DNAME[dtype], n=n, impl=impl, note="OOM")
        except RuntimeError as e:  # e.g. SDPA backend not available for this dtype
            row(kind="timing", op=op, dtype=DNAME[dtype], n=n, impl=impl, note=f"error: {str(e)[:120]}")

    for impl, att in impls.items():
        def fwd():
            q, k, v, _ = rot.next()
            with torch.no_grad():
                return att(q, k, v)

        def fwdbwd():
            q, k, v, do = rot.next()
            o = att(q, k, v)
            return torch.autograd.grad(o, (q, k, v), do)

        guarded("fwd", impl, lambda: emit("fwd", impl, bench_ms(fwd), fwd_flop, peak_mem(fwd), fn=fwd))
        guarded("fwd+bwd", impl, lambda: emit("fwd+bwd", impl, bench_ms(fwdbwd), 3.5 * fwd_flop, peak_mem(fwdbwd),
                                              fn=fwdbwd))

    # bwd-of-bwd: time only the double-backward pass through a prebuilt create_graph graph,
    # rotating the cotangents (gdq, gdk, gdv); memory is for the whole second-order step.
    for impl in ("fused", "eager-math"):
        att = impls[impl]

        def body():
            q, k, v, do = sets[0]
            do = do.clone().requires_grad_()
            cots = [[randn(shape, dtype, 2000 + 10 * j + i) for i in range(3)] for j in range(2)]
            crot = Rotate(cots)

            def step():
                o = att(q, k, v)
                g = torch.autograd.grad(o, (q, k, v), do, create_graph=True)
                return torch.autograd.grad(g, (q, k, v, do), cots[0])

            mem = peak_mem(step)
            o = att(q, k, v)
            g = torch.autograd.grad(o, (q, k, v), do, create_graph=True)
            bb = lambda: torch.autograd.grad(g, (q, k, v, do), crot.next(), retain_graph=True)  # noqa: E731
            emit("bwdbwd", impl, bench_ms(bb), 6 * fwd_flop, mem,
                 note="double-backward pass only; memory = fwd + create_graph bwd + double bwd", fn=bb)
            del g, o

        guarded("bwdbwd", impl, body)

    def body_op():
        q, k, v, do = (t.detach() for t in sets[1])
        o, lse = attn_fwd(q, k, v, scale)
        cots = Rotate([[randn(shape, dtype, 3000 + 10 * j + i) for i in range(3)] for j in range(2)])
        fn = lambda: attn_bwdbwd(q, k, v, o, lse, do, *cots.next(), scale)  # noqa: E731
        emit("bwdbwd", "fused-op", bench_ms(fn), 6 * fwd_flop, peak_mem(fn), note="attn_bwdbwd op alone (2 kernels)",
             fn=fn)

    guarded("bwdbwd", "fused-op", body_op)


# ------------------------------------------------------------------------------------ ops alone
OP_KERNELS = {"fwd": ("fwd",), "bwd": ("bwd_dq", "bwd_dkdv"), "bwdbwd": ("bwdbwd_q", "bwdbwd_kv")}
OP_FLOP = {"fwd": 1.0, "bwd": 2.5, "bwdbwd": 6.0}


def chosen_configs(op):
    """The block config each kernel of `op` ran with: the autotuner's last choice on GPU."""
    out = []
    for name in OP_KERNELS[op]:
        fn = getattr(KMOD, "_" + name)
        cfg = getattr(fn, "best_config", None)
        out.append(f"{name}: {cfg if cfg is not None else 'fixed ' + str(KMOD._meta(name))}")
    return "; ".join(out)


def ops_alone(n, dtype):
    """Each op's launcher alone (no autograd, no input checks), in both layouts."""
    scale = HEAD_D ** -0.5
    fwd_flop = 4.0 * BATCH * HEADS * n * n * HEAD_D
    shape = (BATCH, HEADS, n, HEAD_D)
    q, k, v, do, gdq, gdk, gdv = (randn(shape, dtype, 400 + i) for i in range(7))
    o, lse = KMOD.attn_fwd(q, k, v, scale, validate=False)
    qkv = randn((BATCH, n, 3, HEADS, HEAD_D), dtype, 410)
    po, plse = KMOD.attn_packed_fwd(qkv, scale, validate=False)
    pdo, pgd = randn((BATCH, n, HEADS, HEAD_D), dtype, 411), randn((BATCH, n, 3, HEADS, HEAD_D), dtype, 412)
    calls = {
        "fused-op": {"fwd": lambda: KMOD.attn_fwd(q, k, v, scale, validate=False),
                     "bwd": lambda: KMOD.attn_bwd(q, k, v, o, lse, do, scale, validate=False),
                     "bwdbwd": lambda: KMOD.attn_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, scale, validate=False)},
        "fused-op-packed": {"fwd": lambda: KMOD.attn_packed_fwd(qkv, scale, validate=False),
                            "bwd": lambda: KMOD.attn_packed_bwd(qkv, po, plse, pdo, scale, validate=False),
                            "bwdbwd": lambda: KMOD.attn_packed_bwdbwd(qkv, po, plse, pdo, pgd, scale, validate=False)},
    }
    for impl, ops in calls.items():
        for op, fn in ops.items():
            ms = bench_ms(fn)
            flop = OP_FLOP[op] * fwd_flop
            row(kind="op", op=op, dtype=DNAME[dtype], batch=BATCH, heads=HEADS, n=n, head_dim=HEAD_D, impl=impl,
                ms=f"{ms:.4f}", tflops=f"{flop / ms / 1e9:.4g}", note=chosen_configs(op))


CHAIN_CALLS = 20  # chains per host-time measurement (few enough that the launch queue never fills)


def chain_host_device(n, dtype):
    """Where one fwd+bwd chain's time goes (the attention table's fwd+bwd, through autograd): host
    ms per chain = wall time to issue CHAIN_CALLS chains without waiting for the device, divided by
    CHAIN_CALLS; device ms per chain = the CUDA kernels' summed durations in a profile of as many
    chains (none on CPU, where the interpreter runs the kernels on the host). Host above device
    means the chain is host-bound there. The note names the host's costliest ops (self time)."""
    from torch.profiler import ProfilerActivity, profile

    scale = HEAD_D ** -0.5
    shape = (BATCH, HEADS, n, HEAD_D)
    q, k, v = (randn(shape, dtype, 500 + i).requires_grad_() for i in range(3))
    do = randn(shape, dtype, 503)
    qkv = randn((BATCH, n, 3, HEADS, HEAD_D), dtype, 504).requires_grad_()
    pdo = randn((BATCH, n, HEADS, HEAD_D), dtype, 505)
    chains = {"fused": lambda: torch.autograd.grad(EK.attention(q, k, v, scale=scale), (q, k, v), do),
              "fused-packed": lambda: torch.autograd.grad(EK.attention_packed(qkv, scale=scale), qkv, pdo)}
    if DEVICE == "cuda":  # the GPU's SDPA backend for this dtype, the fused chain's reference
        sdpa_name, sdpa = sdpa_attention(dtype, scale)
        chains[sdpa_name] = lambda: torch.autograd.grad(sdpa(q, k, v), (q, k, v), do)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    for impl, chain in chains.items():
        try:
            for _ in range(3):
                chain()
            sync()
            t = time.perf_counter()
            for _ in range(CHAIN_CALLS):
                chain()
            host_ms = (time.perf_counter() - t) * 1e3 / CHAIN_CALLS
            sync()
            with profile(activities=acts) as prof:
                for _ in range(CHAIN_CALLS):
                    chain()
                sync()
            events = prof.events()
            kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                       and not e.name.startswith(("Memcpy", "Memset"))]
            device = (f"device {sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / CHAIN_CALLS:.4f} ms in "
                      f"{len(kernels) / CHAIN_CALLS:.0f} kernels per chain" if kernels else "device: no CUDA kernels")
            top = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)[:5]
            hosts = ", ".join(f"{a.key} {a.self_cpu_time_total / CHAIN_CALLS:.0f} us" for a in top)
            row(kind="host", op="fwd+bwd", dtype=DNAME[dtype], batch=BATCH, heads=HEADS, n=n, head_dim=HEAD_D,
                impl=impl, ms=f"{host_ms:.4f}", note=f"host ms per chain; {device}; host self time per chain: {hosts}")
        except (RuntimeError, torch.OutOfMemoryError) as e:
            row(kind="host", op="fwd+bwd", dtype=DNAME[dtype], n=n, impl=impl, note=f"error: {str(e)[:120]}")


# ------------------------------------------------------------------------------------ main
HEADER: dict = {}
CSV_PATH: Path | None = None


def save():
    """Rewrite the CSV ('#' header lines, then the rows so far): a run stopped early keeps its rows."""
    if CSV_PATH is None:
        return
    with open(CSV_PATH, "w", newline="") as f:
        for k, v in HEADER.items():
            f.write(f"# {k}: {v}\n")
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(ROWS)


def main():
    global CSV_PATH
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    CSV_PATH = out / "gpu_check.csv"
    HEADER.update({
        "device": LABEL,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "git_commit": git_commit(ROOT),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "interpreter": str(KMOD.INTERPRET),
        "fp32_dots": "TF32" if (KMOD.ALLOW_TF32 and DEVICE == "cuda") else "IEEE",
        "shapes": f"batch={BATCH} heads={HEADS} head_dim={HEAD_D} N={NS}",
        "flop_counts": "fwd 4*B*H*N^2*d; fwd+bwd 3.5x fwd; bwdbwd nominal 6x fwd",
    })
    for k, v in HEADER.items():
        print(f"# {k}: {v}", flush=True)
    t0 = time.time()
    ok = True
    parts = [] if ARGS.no_correctness else [("correctness", dt, n, correctness) for dt in CHECK_DTYPES for n in NS]
    if not ARGS.no_timing:
        parts += [("timing", dt, n, timing) for dt in TIME_DTYPES for n in NS]
    if ARGS.ops:
        parts += [(what, dt, n, fn) for dt in TIME_DTYPES for n in NS
                  for what, fn in (("ops alone", ops_alone), ("host vs device", chain_host_device))]
    for what, dtype, n, fn in parts:
        print(f"[{what}] {DNAME[dtype]} N={n}", flush=True)
        result = fn(n, dtype)
        if what == "correctness":
            ok &= result
        HEADER["all_correctness_ok"] = str(ok)
        HEADER["wall_s"] = f"{time.time() - t0:.1f}"
        save()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print(f"# wall_s: {HEADER['wall_s']}  all_correctness_ok: {ok}\n# wrote {CSV_PATH}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
