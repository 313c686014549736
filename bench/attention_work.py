"""Executed work of the fused attention kernels, counted from their tiling: tile matmuls and
multiply-accumulates (MACs) with the padding. No GPU, nothing timed: these are counts, a proxy
for time, not times.

Per kernel, a program owns a resident block of rows (queries on the query side, keys on the key
side: ``bwd_dkdv``, ``bwdbwd_kv``) and sweeps the other side in trips; every trip runs the same
tile matmuls (``SWEEPS``: (M, K, N) of each ``tl.dot`` in terms of R = resident block, S = swept
block, D = BLOCK_D). How the kernels cut a length-N dimension into blocks is
``triton_attention.tile_blocks`` (with the config's tail block); BLOCK_D is the launchers' own.
From that:

- tile matmuls = dots per trip x trips x programs;
- executed MACs = sum over them of M * K * N with the block sizes (padded rows and head-dim
  columns included: a GPU multiplies them);
- useful MACs = the same sum with the valid rows and the real head dim.

``interpreter_dots`` runs the real kernels in the Triton interpreter and records every executed
``tl.dot`` with its shape, per kernel: tests/test_attention_work.py checks ``SWEEPS`` and the
tiling against it, so the table cannot drift from the kernels.

Usage: python bench/attention_work.py [--out bench/results/attention-work-<date>.json]
Prints, for ViT-B/16 (B=128, H=12) and ViT-Ti/16 (B=128, H=3) at N=197, d=64, the counts of fwd,
bwd and bwd-of-bwd for the pinned configs (and the two-sweep bwd-of-bwd), per kernel.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # interpreter_dots runs the kernels on the CPU

import torch  # noqa: E402

from energyvit.kernels import triton_attention as K  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RDS, RSD = ("R", "D", "S"), ("R", "S", "D")
#: kernel -> variant -> sweeps; a sweep is the tile matmuls of one trip, (M, K, N) each.
SWEEPS = {
    "fwd": {"": [[RDS, RSD]]},                                # S = Q K^T; acc += P V
    "bwd_dq": {"": [[RDS, RDS, RSD]]},                        # S, dP; dQ += dS K
    "bwd_dkdv": {"": [[RDS, RSD, RDS, RSD]]},                 # S^T; dV += P^T dO; dP^T; dK += dS^T Q
    # S, dP, G (two dots), H; then dS gdK, (P*W0) K, dS K, P K, P gdV, (P*G) V
    "bwdbwd_q": {"one_sweep": [[RDS] * 5 + [RSD] * 6],
                 # sweep 1: the five input tiles for C, E0; sweep 2: again, then dS gdK, dS2 K, P gdV, Z V
                 "two_sweep": [[RDS] * 5, [RDS] * 5 + [RSD] * 4]},
    "bwdbwd_kv": {"": [[RDS] * 5 + [RSD] * 3]},               # S^T, dP^T, G^T, H^T; dS^T gdQ, dS2^T Q, Z^T dO
}
KEY_SIDE = ("bwd_dkdv", "bwdbwd_kv")
PASSES = {"fwd": ("fwd",), "bwd": ("bwd_dq", "bwd_dkdv"), "bwdbwd": ("bwdbwd_q", "bwdbwd_kv")}
SHAPES = {"ViT-B/16": dict(B=128, H=12, N=197, d=64), "ViT-Ti/16": dict(B=128, H=3, N=197, d=64)}


def variant_of(name: str, cfg: tuple) -> str:
    if name != "bwdbwd_q":
        return ""
    return "two_sweep" if K.config_meta(name, cfg)["TWO_SWEEP"] else "one_sweep"


def uniform_blocks(n: int, block: int) -> list:
    """Every block `block` rows, the last one padded (the kernels' tiling before issue 21's tail work)."""
    return [(block, min(block, n - start)) for start in range(0, n, block)]


def kernel_work(name: str, cfg: tuple, n: int, d: int, tiling=None) -> dict:
    """Per (batch, head): programs, tile matmuls, executed and useful MACs of one kernel launch."""
    if tiling is None:
        tail = K.config_meta(name, cfg)["TAIL"]
        tiling = lambda n, block: K.tile_blocks(n, block, tail)  # noqa: E731
    block_d = K._launch_consts(torch.float16, d, 1.0)[0]
    block_m, block_n = cfg[:2]
    res, swept = (block_n, block_m) if name in KEY_SIDE else (block_m, block_n)
    out = dict(programs=0, dots=0, macs=0, useful_macs=0)
    for r, r_valid in tiling(n, res):
        out["programs"] += 1
        for sweep in SWEEPS[name][variant_of(name, cfg)]:
            for s, s_valid in tiling(n, swept):
                for dims in sweep:
                    size = {"R": r, "S": s, "D": block_d}
                    valid = {"R": r_valid, "S": s_valid, "D": d}
                    out["dots"] += 1
                    out["macs"] += size[dims[0]] * size[dims[1]] * size[dims[2]]
                    out["useful_macs"] += valid[dims[0]] * valid[dims[1]] * valid[dims[2]]
    return out


def pass_work(configs: dict, n: int, d: int, tiling=None) -> dict:
    """Per pass (fwd, bwd, bwdbwd) and kernel: kernel_work with configs[kernel]; summed per pass."""
    out = {}
    for pas, names in PASSES.items():
        kernels = {name: kernel_work(name, configs[name], n, d, tiling) for name in names}
        total = {f: sum(k[f] for k in kernels.values()) for f in ("programs", "dots", "macs", "useful_macs")}
        out[pas] = dict(total, kernels=kernels)
    return out


def pinned_configs(d: int) -> dict:
    return {name: K.pinned_config(name, d) for name in SWEEPS}


# ------------------------------------------------------------------------------ the real kernels
def interpreter_dots(configs: dict, b: int, h: int, n: int, d: int, seed: int = 0) -> dict:
    """Run fwd, bwd and bwd-of-bwd through the interpreter with configs[kernel]'s block sizes and
    variant; return kernel name -> [(M, K, N) of every executed tl.dot]."""
    from triton.runtime.interpreter import InterpreterBuilder

    assert K.INTERPRET, "interpreter_dots needs TRITON_INTERPRET=1 before triton is imported"
    dots: dict = {}
    current = []
    orig_dot, orig_launch, orig_meta = InterpreterBuilder.create_dot, K._Launcher._launch, K._meta

    def create_dot(self, a, b_, acc, *args, **kw):
        (m, k), (_, nn) = a.data.shape[-2:], b_.data.shape[-2:]
        dots.setdefault(current[-1], []).append((m, k, nn))
        return orig_dot(self, a, b_, acc, *args, **kw)

    def launch(self, grid, key, args, kw):
        current.append(self.name)
        try:
            return orig_launch(self, grid, key, args, kw)
        finally:
            current.pop()

    g = torch.Generator().manual_seed(seed)
    q, k, v, do, gdq, gdk, gdv = (torch.randn(b, h, n, d, generator=g) for _ in range(7))
    InterpreterBuilder.create_dot, K._Launcher._launch = create_dot, launch
    K._meta = lambda name: K.config_meta(name, configs[name])
    try:
        o, lse = K.attn_fwd(q, k, v, d ** -0.5)
        K.attn_bwd(q, k, v, o, lse, do, d ** -0.5)
        K.attn_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, d ** -0.5)
    finally:
        InterpreterBuilder.create_dot, K._Launcher._launch, K._meta = orig_dot, orig_launch, orig_meta
    return dots


# ------------------------------------------------------------------------------ report
def _fmt(x: float) -> str:
    return f"{x / 1e9:.3f} G" if x >= 1e8 else f"{x:,}"


def report(tiling_names=("uniform", "kernels")) -> dict:
    tilings = {"uniform": uniform_blocks, "kernels": None}
    rows = []
    for shape_name, s in SHAPES.items():
        heads = s["B"] * s["H"]
        alt = dict(pinned_configs(s["d"]), bwdbwd_q=(64, 32, 8, 2, {"TWO_SWEEP": True}))
        for cfg_name, configs in (("pinned", pinned_configs(s["d"])), ("pinned, bwdbwd_q two-sweep (64, 32, 8, 2)", alt)):
            for tiling in tiling_names:
                for pas, w in pass_work(configs, s["N"], s["d"], tilings[tiling]).items():
                    for kname, kw in [("all", w), *w["kernels"].items()]:
                        rows.append(dict(shape=shape_name, **s, configs=cfg_name, tiling=tiling, pass_=pas,
                                         kernel=kname, config=str(configs.get(kname, "")),
                                         programs=kw["programs"] * heads, tile_matmuls=kw["dots"] * heads,
                                         macs=kw["macs"] * heads, useful_macs=kw["useful_macs"] * heads,
                                         padding_factor=round(kw["macs"] / kw["useful_macs"], 4)))
    return rows


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + (" +uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    import triton

    rows = report()
    for r in rows:
        if r["kernel"] == "all" or r["tiling"] == "kernels":
            print(f"{r['shape']:9s} {r['configs'][:24]:24s} {r['tiling']:8s} {r['pass_']:6s} {r['kernel']:9s} "
                  f"{r['config']:34s} matmuls {r['tile_matmuls']:>10,} MACs {_fmt(r['macs']):>10s} "
                  f"useful {_fmt(r['useful_macs']):>10s} x{r['padding_factor']:.3f}")
    date = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"attention-work-{date}.json"
    header = dict(what="counts, not times: tile matmuls (tl.dot calls executed) and multiply-accumulates of the "
                       "fused attention kernels from their tiling (bench/attention_work.py); padded = executed, "
                       "useful = valid rows and real head dim only",
                  machine=f"{platform.machine()} CPU, {os.cpu_count()} cores (nothing timed)", date=date,
                  triton=triton.__version__, torch=torch.__version__, commit=_git_commit())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(header, rows=rows), indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
