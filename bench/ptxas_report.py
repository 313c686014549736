"""Static Hopper report for the fused attention kernels: compile ahead of time, no GPU needed.

Every kernel of ``energyvit.kernels.triton_attention`` is compiled for sm_90a (H100/H200) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` for each of its autotune
configs, then

- the PTX is assembled again with the ptxas bundled in the triton wheel, ``ptxas -v``, with the
  flags triton itself uses, and its report is parsed: registers per thread, spill store/load
  bytes;
- shared memory is triton's own figure (``metadata.shared``: the pipelined tiles + scratch);
- the SASS (``cuobjdump -sass`` of triton's cubin) is searched for warpgroup MMA (HGMMA, the
  ``wgmma`` instructions of PTX) and for the older warp-level HMMA (``mma.sync``);
- the TTGIR says which dot became which: ``ttng.warp_group_dot`` (wgmma) or ``tt.dot`` (mma.sync),
  with its M (rows). The kernels run a last block of ``TAIL_ROWS`` (16) resident rows, which is
  always on mma.sync (wgmma needs M >= 64): "yes, tail mma.sync" means every dot with M >= 64 is on
  wgmma and only the tail block's dots are not.

Pointer alignment and integer divisibility hints are set the way triton's launcher would set
them for the benchmark shape (B=64, H=12, N=197: row strides of the packed qkv layout are
multiples of 16 elements, N is not), so the code is the one the GPU would run at that shape.

This runs on a CPU-only machine. It is a static review: it says nothing about speed, only
whether a config fits (registers <= 255, no spills, shared memory <= 227 KB) and which MMA
instructions it uses. Usage (do *not* set TRITON_INTERPRET):

    python bench/ptxas_report.py                       # bf16, head_dim 64, autotune configs
    python bench/ptxas_report.py --head-dims 32,40,64,80 --dtypes bf16,fp16
    python bench/ptxas_report.py --sweep               # a wider grid of candidate configs
    python bench/ptxas_report.py --docs docs/kernels.md  # also rewrite this triton's block in the docs

Results: bench/results/ptxas-sm90a-triton<version>[-sweep].csv (one row per compile).
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("ptxas_report.py compiles real kernels: unset TRITON_INTERPRET")

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
FIELDS = ["triton", "kernel", "variant", "dtype", "head_dim", "BLOCK_M", "BLOCK_N", "resident", "num_warps",
          "num_stages", "autotune", "registers", "spill_store_bytes", "spill_load_bytes", "shared_bytes", "wgmma",
          "hgmma_sass", "hmma_sass", "wgmma_dots", "mma_sync_dots", "mma_sync_rows", "fits", "compile_s", "error"]
# Per-SM limits on sm_90: 255 registers per thread, 227 KB of shared memory per block.
MAX_SHARED = 227 * 1024
# Shape whose divisibility the launch hints follow: ViT-B/16 at 224 px (N = 197), batch 64.
SHAPE = dict(B=64, H=12, N=197)


# Key-side kernels keep a block of keys resident and loop over queries: their matmuls have
# BLOCK_N rows, so BLOCK_N is what wgmma's M >= 64 applies to.
KEY_SIDE = ("bwd_dkdv", "bwdbwd_kv")


def _kernels():
    """name -> (jit function, autotune configs as (BLOCK_M, BLOCK_N, warps, stages[, variant]) tuples)."""
    from energyvit.kernels import triton_attention as K

    return {name: (getattr(K, fn), K.AUTOTUNE_CONFIGS[name]) for name, fn in K.KERNEL_FUNCTIONS.items()}


def _config_key(name: str, cfg: tuple) -> tuple:
    from energyvit.kernels import triton_attention as K

    return (*cfg[:4], tuple(sorted(K.config_meta(name, cfg).items())))


def _variant(name: str, cfg: tuple) -> str:
    from energyvit.kernels import triton_attention as K

    meta = K.config_meta(name, cfg)
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in meta.items()
                    if k not in ("BLOCK_M", "BLOCK_N") and (k, v) != ("TAIL", K.TAIL_ROWS))


def _arg_values(arg_names, head_dim):
    """Representative launch values for the integer args (for triton's divisibility hints)."""
    h, n, d = SHAPE["H"], SHAPE["N"], head_dim
    vals = {"N": n, "H": h,
            # packed (B, N, 3, H, d) inputs and outputs
            "s_qb": n * 3 * h * d, "s_qh": d, "s_qn": 3 * h * d,
            "s_gb": n * 3 * h * d, "s_gh": d, "s_gn": 3 * h * d,
            # (B, N, H, d) rows: o, do, gdo
            "s_ob": n * h * d, "s_oh": d, "s_on": h * d,
            "s_db": n * h * d, "s_dh": d, "s_dn": h * d}
    missing = [a for a in arg_names if a not in vals]
    if missing:
        raise KeyError(f"no representative value for integer args {missing}")
    return vals


def _is_ptr(name: str) -> bool:
    return name.isupper() and name not in ("N", "H")  # N, H: sizes


def _signature(fn, dtype, head_dim, meta):
    """ASTSource signature/constexprs/attrs for one kernel, roles read from the arg names:
    upper-case pointer args (not N, H) are tensors (LSE/DELTA/STATS fp32, the rest `dtype`), `scale`-like
    args fp32, the rest i32; constexpr params come from `meta`."""
    from triton.backends.compiler import BaseBackend

    sig, consts, attrs = {}, {}, {}
    ints = [p.name for p in fn.params if not p.is_constexpr and not _is_ptr(p.name) and "scale" not in p.name]
    vals = _arg_values(ints, head_dim)
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
            consts[name] = meta[name]
        elif _is_ptr(name):
            sig[name] = "*fp32" if name in ("LSE", "DELTA", "STATS") else f"*{dtype}"
            attrs[(i,)] = BaseBackend.parse_attr("D")  # torch allocations are 16-byte aligned
        elif "scale" in name:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if vals[name] % 16 == 0:
                attrs[(i,)] = BaseBackend.parse_attr("D")
    return sig, consts, attrs


def _ptxas_v(ptx: str) -> dict:
    """Registers and spills from the bundled ptxas, run with triton's own flags."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", str(src),
               "-o", str(Path(tmp) / "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)) if regs else "",
            "spill_store_bytes": int(spill.group(1)) if spill else "",
            "spill_load_bytes": int(spill.group(2)) if spill else ""}


def _sass_counts(cubin: bytes) -> tuple[int, int]:
    from triton.backends.nvidia.compiler import knobs  # the wheel's cuobjdump

    cuobjdump = knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    return len(re.findall(r"\bHGMMA\.", sass)), len(re.findall(r"\bHMMA\.", sass))


def _ttgir_dots(ttgir: str) -> tuple[int, list]:
    """Dots of the TTGIR: how many are warp_group_dot (wgmma), and the M of each tt.dot (mma.sync)."""
    wgmma = len(re.findall(r"= ttng\.warp_group_dot ", ttgir))
    rows = [int(m) for m in re.findall(r"= tt\.dot .*-> tensor<(\d+)x\d+x", ttgir)]
    return wgmma, rows


def _mma_kind(hgmma: int, hmma: int, wgmma_dots: int, mma_rows: list) -> str:
    if not hgmma:
        return "no"
    if not hmma:
        return "yes"
    # "tail": the only mma.sync dots are those of a block with fewer than 64 rows (the tail block)
    return "yes, tail mma.sync" if wgmma_dots and all(m < 64 for m in mma_rows) else "partial"


def compile_one(job: tuple) -> dict:
    name, dtype, head_dim, cfg, autotune = job
    bm, bn, warps, stages = cfg[:4]
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from energyvit.kernels import triton_attention as K

    fn = _kernels()[name][0]
    row = {f: "" for f in FIELDS}
    row.update(triton=triton.__version__, kernel=name, variant=_variant(name, cfg), dtype=dtype, head_dim=head_dim,
               BLOCK_M=bm, BLOCK_N=bn, resident=bn if name in KEY_SIDE else bm, num_warps=warps,
               num_stages=stages, autotune=autotune)
    block_d = max(16, triton.next_power_of_2(head_dim))
    meta = dict(HEAD_D=head_dim, BLOCK_D=block_d, PREC="tf32", REF_ROWS=K.REF_ROWS, **K.config_meta(name, cfg))
    t0 = time.perf_counter()
    try:
        sig, consts, attrs = _signature(fn, DTYPES[dtype], head_dim, meta)
        ck = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
        row.update(_ptxas_v(ck.asm["ptx"]))
        hgmma, hmma = _sass_counts(ck.asm["cubin"])
        wgmma_dots, mma_rows = _ttgir_dots(ck.asm["ttgir"])
        # "yes": every dot on warpgroup MMA; "partial": some dots of a >= 64-row block fell back to mma.sync
        row.update(shared_bytes=ck.metadata.shared, hgmma_sass=hgmma, hmma_sass=hmma, wgmma_dots=wgmma_dots,
                   mma_sync_dots=len(mma_rows), mma_sync_rows=" ".join(str(m) for m in sorted(set(mma_rows))),
                   wgmma=_mma_kind(hgmma, hmma, wgmma_dots, mma_rows))
        row["fits"] = "yes" if (row["spill_store_bytes"] == 0 and ck.metadata.shared <= MAX_SHARED) else "no"
    except Exception as e:  # a config that does not compile is a result too
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        row["fits"] = "no"
    row["compile_s"] = f"{time.perf_counter() - t0:.1f}"
    return row


def sweep_configs(name: str):
    grid = [(m, n, w, s) for m in (32, 64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (1, 2, 3)
            if not (m == 128 and n == 128)]
    if name == "bwdbwd_q":
        grid = [c + ({"TWO_SWEEP": t},) for t in (False, True) for c in grid]
    return grid


def _label(r) -> str:
    cfg = f"({r['BLOCK_M']}, {r['BLOCK_N']}, {r['num_warps']}, {r['num_stages']})"
    return f"{cfg} {r['variant']}" if r["variant"] else cfg


def write_csv(out: Path, fields, rows) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(rows)


def markdown_table(rows) -> str:
    head = ("| kernel | variant | dtype | d | BLOCK_M | BLOCK_N | warps | stages | registers | spill bytes (st/ld) "
            "| shared KB | wgmma |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = []
    for r in rows:
        if r["error"]:
            body.append(f"| {r['kernel']} | {r['variant']} | {r['dtype']} | {r['head_dim']} | {r['BLOCK_M']} | "
                        f"{r['BLOCK_N']} | {r['num_warps']} | {r['num_stages']} | error: {r['error'][:60]} | | | |")
            continue
        body.append(
            f"| {r['kernel']} | {r['variant']} | {r['dtype']} | {r['head_dim']} | {r['BLOCK_M']} | {r['BLOCK_N']} "
            f"| {r['num_warps']} "
            f"| {r['num_stages']} | {r['registers']} | {r['spill_store_bytes']}/{r['spill_load_bytes']} "
            f"| {int(r['shared_bytes']) / 1024:.0f} | {r['wgmma']} |")
    return head + "\n".join(body) + "\n"


def summary_table(rows) -> str:
    """Per kernel, dtype and head dim: how many autotune configs fit, and how many of those have a
    resident block >= 64 with every dot on wgmma."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["dtype"], r["head_dim"]), []).append(r)
    out = ["| kernel | dtype | d | configs | no spill, fits smem | + resident >= 64 on wgmma | max registers |",
           "|---|---|---|---|---|---|---|"]
    for (kernel, dtype, d), rs in groups.items():
        fit = [r for r in rs if r["fits"] == "yes"]
        wg = [r for r in fit if int(r["resident"]) >= 64 and r["wgmma"].startswith("yes")]
        regs = max((int(r["registers"]) for r in rs if r["registers"] != ""), default=0)
        out.append(f"| {kernel} | {dtype} | {d} | {len(rs)} | {len(fit)} | {len(wg)} | {regs} |")
    return "\n".join(out) + "\n"


def update_docs(path: Path, rows, label: str, version: str) -> None:
    begin, end = f"<!-- ptxas_report triton {version} begin -->", f"<!-- ptxas_report triton {version} end -->"
    text = path.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} ... {end} block to replace")
    pre, rest = text.split(begin, 1)
    _, post = rest.split(end, 1)
    tuned = [r for r in rows if r["autotune"] == "yes"]
    d64 = [r for r in tuned if r["head_dim"] == 64]
    path.write_text(f"{pre}{begin}\n{label}\n\n{markdown_table(d64)}\n{summary_table(tuned)}{end}{post}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="bf16")
    ap.add_argument("--head-dims", default="64")
    ap.add_argument("--kernels", default="", help="comma-separated subset of kernel names")
    ap.add_argument("--sweep", action="store_true", help="compile a wider grid of candidate configs")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="")
    ap.add_argument("--docs", default="", help="rewrite the marked table in this markdown file")
    args = ap.parse_args()

    import triton

    kernels = _kernels()
    names = args.kernels.split(",") if args.kernels else list(kernels)
    jobs = []
    for dtype in args.dtypes.split(","):
        for d in (int(x) for x in args.head_dims.split(",")):
            for name in names:
                tuned = {_config_key(name, c) for c in kernels[name][1]}
                cfgs = sweep_configs(name) if args.sweep else kernels[name][1]
                jobs += [(name, dtype, d, c, "yes" if _config_key(name, c) in tuned else "no") for c in cfgs]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(compile_one, jobs))
    out = Path(args.out) if args.out else (
        ROOT / "bench" / "results" / f"ptxas-sm90a-triton{triton.__version__}{'-sweep' if args.sweep else ''}.csv")
    write_csv(out, FIELDS, rows)
    print(markdown_table(rows))
    print(f"# {len(rows)} compiles in {time.perf_counter() - t0:.0f} s; wrote {out}")
    # The target: every kernel, bf16, head_dim 64, has an autotune config whose resident block
    # (BLOCK_M, or BLOCK_N on the key side) is >= 64, with every dot on wgmma and no spills.
    for name in names:
        good = [r for r in rows if r["kernel"] == name and r["dtype"] == "bf16" and r["head_dim"] == 64
                and r["autotune"] == "yes" and not r["error"] and int(r["resident"]) >= 64
                and r["wgmma"].startswith("yes") and r["spill_store_bytes"] == 0]
        side = "BLOCK_N" if name in KEY_SIDE else "BLOCK_M"
        print(f"{name}: {'OK' if good else 'MISSING'} {side}>=64 wgmma 0-spill autotune config at bf16 d=64"
              + (f": {', '.join(_label(r) for r in good)}"
                 if good else ""))
    if args.docs:
        update_docs(Path(args.docs), rows,
                    f"triton {triton.__version__}, sm_90a, `python bench/ptxas_report.py --dtypes {args.dtypes} "
                    f"--head-dims {args.head_dims}` (autotune configs; table: head_dim 64, summary: all)",
                    triton.__version__)


if __name__ == "__main__":
    main()
