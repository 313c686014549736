"""Host-side cost of one fused attention call through autograd, as in one training step.

CPU HOST-TIME PROXY, NOT A GPU TIME. Every Triton launch is replaced by a no-op (the launcher
still validates, allocates its outputs, permutes/copies its inputs and builds its arguments), so
what is timed is the Python / dispatcher / autograd / validation / allocation / copy work around
the kernels of one chain:

    out = attention(qkv) as the model calls it     -> attn fwd
    g = autograd.grad(<w, out>, qkv, create_graph)  -> attn bwd
    (<r, g> + <w2, out>).backward()                  -> attn bwd-of-bwd + attn bwd

which is what one attention layer runs per training step (fwd once, bwd twice, bwd-of-bwd once).
Not included: triton's own launch cost (its argument binding and autotuner lookup need a GPU
driver) and GPU execution of the copies. Shapes are tiny (B=1, N=16, H=2, d=16) so that CPU
execution of the copies and of the loss arithmetic adds little; the counts of aten ops and
copies (and the bytes copied) are taken at ViT-B/16 size (B=64, N=197, H=12, d=64, fp16) with
the torch profiler, one chain, with the launches stubbed the same way.

Paths:
  before/bhnd    the fused path at git ref --before (default: the kernels branch point),
                 extracted to a temporary folder and run in a subprocess: permuted q, k, v views
                 -> energyvit.kernels.attention -> o.transpose(1, 2).reshape(B, N, D)
  after/bhnd     the same call with the current tree's kernels
  after/packed   energyvit.kernels.attention_packed(qkv).reshape(B, N, D) (the model's fused path)
  after/floor    no attention (out = a view of qkv): the chain's own loss arithmetic and autograd
                 calls, the part of every row above that is not attention

Usage: python bench/attention_host_overhead.py [--before REF] [--rounds 5] [--chains 400] [--out PATH]
Before and after run in alternating worker processes (the machine may be shared); per path the
median over rounds of the per-chain median is reported, and the least disturbed round (min).
Writes bench/results/attention_host_overhead-cpu-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

# CPU tensors must pass the kernels' device checks; nothing runs in the interpreter (stubbed).
os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BEFORE_REF = "7d35817"  # branch point of `kernels`: fused attention before the packed path
TIME_SHAPE = dict(B=1, N=16, H=2, d=16)
COUNT_SHAPE = dict(B=64, N=197, H=12, d=64)
KERNEL_ATTRS = ("_fwd", "_bwd_dq", "_bwd_dkdv", "_bwdbwd_q", "_bwdbwd_kv")


class _NoLaunch:
    """Stands in for a triton kernel: kernel[grid](*args, **meta) only evaluates the grid, as a
    launch does (the launchers pass the interpreter's fixed block sizes as meta)."""

    def __getitem__(self, grid):
        return lambda *args, **meta: grid(meta) if callable(grid) else grid


def _stub_launches(K) -> None:
    for name in KERNEL_ATTRS:
        setattr(K, name, _NoLaunch())


def _paths(EK):
    def bhnd(qkv):
        b, n, _, h, d = qkv.shape
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return EK.attention(q, k, v).transpose(1, 2).reshape(b, n, h * d)

    def packed(qkv):
        b, n, _, h, d = qkv.shape
        return EK.attention_packed(qkv).reshape(b, n, h * d)

    def floor(qkv):  # no attention at all: what the chain's own loss arithmetic and autograd calls cost
        b, n, _, h, d = qkv.shape
        return qkv.select(2, 0).reshape(b, n, h * d)

    paths = {"bhnd": bhnd}
    if hasattr(EK, "attention_packed"):
        paths.update(packed=packed, floor=floor)
    return paths


def _inputs(shape, dtype):
    b, n, h, d = shape["B"], shape["N"], shape["H"], shape["d"]
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, n, 3, h, d, generator=g).to(dtype).requires_grad_()
    w, w2 = (torch.randn(b, n, h * d, generator=g).to(dtype) for _ in range(2))
    r = torch.randn(b, n, 3, h, d, generator=g).to(dtype)
    return qkv, w, w2, r


def _chain(fn, qkv, w, w2, r, clock=None):
    t0 = time.perf_counter()
    out = fn(qkv)
    t1 = time.perf_counter()
    (g,) = torch.autograd.grad((out * w).sum(), qkv, create_graph=True)
    t2 = time.perf_counter()
    ((g * r).sum() + (out * w2).sum()).backward()
    t3 = time.perf_counter()
    qkv.grad = None
    if clock is not None:
        clock["fwd"].append(t1 - t0)
        clock["bwd (create_graph)"].append(t2 - t1)
        clock["backward (bwd-of-bwd + bwd)"].append(t3 - t2)


def _time_path(fn, K, chains: int) -> dict:
    ins = _inputs(TIME_SHAPE, torch.float32)
    for _ in range(30):
        _chain(fn, *ins)
    clock = {"fwd": [], "bwd (create_graph)": [], "backward (bwd-of-bwd + bwd)": []}
    for _ in range(chains):
        _chain(fn, *ins, clock=clock)
    total = [sum(c) * 1e6 for c in zip(*clock.values())]
    phases = {k: statistics.median(v) * 1e6 for k, v in clock.items()}

    # time inside the launchers (validation, layout, allocation, argument building): wrapped
    # in a separate pass so the wrappers do not touch the headline numbers
    spent, calls = Counter(), Counter()
    originals = {n: getattr(K, n) for n in dir(K) if n.startswith("attn_") and callable(getattr(K, n))}

    def timed(name, f):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return f(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t0
                calls[name] += 1
        return wrapper

    for n, f in originals.items():
        setattr(K, n, timed(n, f))
    try:
        for _ in range(chains):
            _chain(fn, *ins)
    finally:
        for n, f in originals.items():
            setattr(K, n, f)
    launchers = {n: {"calls_per_chain": calls[n] / chains, "us_per_call": spent[n] / calls[n] * 1e6}
                 for n in sorted(calls)}
    return {"us_per_chain_median": statistics.median(total),
            "us_per_chain_p90": statistics.quantiles(total, n=10)[-1],
            "phase_us_median": phases, "launchers": launchers}


def _count_path(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    ins = _inputs(COUNT_SHAPE, torch.float16)
    _chain(fn, *ins)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        _chain(fn, *ins)
    names = Counter(e.name for e in prof.events())
    copy_bytes = 0
    for e in prof.events():
        if e.name == "aten::copy_" and e.input_shapes and e.input_shapes[0]:
            numel = 1
            for s in e.input_shapes[0]:
                numel *= s
            copy_bytes += numel * 2  # fp16
    aten = {k: v for k, v in names.items() if k.startswith("aten::")}
    return {"aten_ops": sum(aten.values()), "copies": names.get("aten::copy_", 0),
            "copy_mib": round(copy_bytes / 2**20, 1),
            "allocations": sum(v for k, v in aten.items() if k in ("aten::empty", "aten::empty_strided",
                                                                  "aten::empty_like", "aten::full",
                                                                  "aten::zeros", "aten::new_zeros")),
            "custom_op_calls": {k: v for k, v in sorted(names.items()) if k.startswith("energyvit::")},
            "aten_top": dict(Counter(aten).most_common(12))}


def worker(label: str, chains: int, count: bool) -> list[dict]:
    torch.set_num_threads(1)
    import energyvit.kernels as EK
    from energyvit.kernels import triton_attention as K

    _stub_launches(K)
    rows = []
    for name, fn in _paths(EK).items():
        row = {"path": f"{label}/{name}", "kernels_file": EK.__file__, **_time_path(fn, K, chains)}
        if count:
            row["counts_vit_b16"] = _count_path(fn)
        rows.append(row)
    return rows


def _run_worker(label: str, pythonpath: str | None, cwd: str, chains: int, count: bool) -> list[dict]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, __file__, "--worker", label, "--chains", str(chains)] + (["--count"] if count else [])
    out = subprocess.run(cmd, env=env, cwd=cwd, check=True, capture_output=True, text=True)
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    for r in rows:
        if pythonpath and not r["kernels_file"].startswith(pythonpath):
            raise RuntimeError(f"the {label!r} worker imported {r['kernels_file']}, not the tree in {pythonpath}")
    return rows


def _extract(ref: str, tmp: Path) -> Path:
    """The package as it was at `ref`, laid out as setup.py installs it (kernels/ -> energyvit/kernels)."""
    archive = tmp / "src.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), ref, "energyvit", "kernels"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp / "src", filter="data")
    pkg = tmp / "pkg"
    shutil.copytree(tmp / "src" / "energyvit", pkg / "energyvit")
    shutil.copytree(tmp / "src" / "kernels", pkg / "energyvit" / "kernels")
    return pkg


def _summarize(rounds: list[list[dict]]) -> list[dict]:
    """Per path: the round medians, their median and min (the machine is shared: min is the least disturbed)."""
    out = []
    for i, first in enumerate(rounds[0]):
        meds = [r[i]["us_per_chain_median"] for r in rounds]
        best = min(rounds, key=lambda r: r[i]["us_per_chain_median"])[i]
        out.append({**best, "us_per_chain_median": statistics.median(meds), "us_per_chain_min_round": min(meds),
                    "us_per_chain_rounds": meds, "counts_vit_b16": first["counts_vit_b16"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default=BEFORE_REF, help="git ref of the 'before' tree (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating before/after worker runs")
    ap.add_argument("--chains", type=int, default=400, help="timed chains per path per round")
    ap.add_argument("--out", default="")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.chains, args.count)))
        return

    git = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], check=True,  # noqa: E731
                                    capture_output=True, text=True).stdout.strip()
    before_sha, head_sha = git("rev-parse", "--short", args.before), git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "kernels"))
    tmp = Path(tempfile.mkdtemp(prefix="attn_host_before_"))
    try:
        pkg = str(_extract(args.before, tmp))
        before, after = [], []
        for i in range(args.rounds):  # alternate, so load from other users hits both alike
            before.append(_run_worker("before", pkg, str(tmp), args.chains, count=i == 0))
            after.append(_run_worker("after", None, str(ROOT), args.chains, count=i == 0))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = _summarize(before) + _summarize(after)
    base = rows[0]["us_per_chain_median"]
    print("CPU HOST-TIME PROXY (kernel launches stubbed), not GPU time; "
          f"time shape {TIME_SHAPE}, counts at {COUNT_SHAPE} fp16")
    print(f"{'path':14s} {'us/chain':>8s} {'(min)':>7s} {'vs before':>9s} {'fwd':>6s} {'bwd(cg)':>7s} {'backward':>8s} "
          f"{'aten ops':>8s} {'copies':>6s} {'copy MiB':>8s} {'allocs':>6s}")
    for r in rows:
        p, c = r["phase_us_median"], r["counts_vit_b16"]
        print(f"{r['path']:14s} {r['us_per_chain_median']:8.1f} {r['us_per_chain_min_round']:7.1f} "
              f"{base / r['us_per_chain_median']:8.2f}x "
              f"{p['fwd']:6.1f} {p['bwd (create_graph)']:7.1f} {p['backward (bwd-of-bwd + bwd)']:8.1f} "
              f"{c['aten_ops']:8d} {c['copies']:6d} {c['copy_mib']:8.1f} {c['allocations']:6d}")
        for n, lr in r["launchers"].items():
            print(f"    launcher {n:20s} {lr['calls_per_chain']:.0f}x per chain, {lr['us_per_call']:6.1f} us per call")
    result = {
        "what": "CPU host-time proxy of one fused attention chain (fwd, grad create_graph, backward) "
                "with every Triton launch stubbed out; NOT GPU time. Excludes triton's own launch cost.",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "before_ref": before_sha, "after_ref": head_sha + ("+uncommitted kernels/" if dirty else ""),
        "torch": torch.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "load_avg_at_end": os.getloadavg(), "threads": 1, "time_shape": TIME_SHAPE,
        "count_shape": {**COUNT_SHAPE, "dtype": "float16"}, "rounds": args.rounds, "chains_per_round": args.chains,
        "rows": rows,
    }
    out = Path(args.out) if args.out else (
        ROOT / "bench" / "results" / f"attention_host_overhead-cpu-{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
