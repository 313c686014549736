"""Static Hopper report for the fused LayerNorm and GELU kernels: compile for sm_90a, no GPU needed.

The sibling of bench/ptxas_report.py (whose ptxas and SASS helpers it uses): every kernel of
``energyvit.kernels.triton_layernorm`` and ``triton_gelu`` is compiled with the block sizes and
warps its launcher picks for each width (``triton_layernorm._blocks``; no autotuning), for the
ViT widths D = 192, 384, 768, 1024 (the MLP's hidden width 4 D for GELU, which is flat and does not
depend on it), then reassembled with the wheel's ``ptxas -v`` (registers, spills) and triton's
shared-memory figure is read. Divisibility hints as triton's launcher would set them at ViT-B/16,
224 px, batch 64 (M = 64 x 197 = 12,608 rows). A static review, not a timing.

dtypes: ``fp32`` x with fp32 parameters (the model's residual stream under bf16 autocast, and GELU
without autocast), ``bf16`` x with fp32 parameters (GELU's input under autocast is bf16).

Usage (do *not* set TRITON_INTERPRET): python bench/ptxas_norm_act.py [--dims 192,384,768,1024]
Results: bench/results/ptxas-sm90a-norm-act-triton<version>.csv
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ptxas_report as P  # noqa: E402  (exits if TRITON_INTERPRET is set)

ROOT = P.ROOT
ROWS = 64 * 197
FIELDS = ["triton", "kernel", "dtype", "D", "BLOCK_M", "BLOCK_D", "num_warps", "registers", "spill_store_bytes",
          "spill_load_bytes", "shared_bytes", "fits", "compile_s", "error"]
# argument roles: p = pointer in the input dtype, f = fp32 pointer, w = parameter pointer (fp32),
# i = int32, s = fp32 scalar
ROLES = {
    "ln_fwd": "pwwpffiiiis",
    "ln_bwd": "pwffppfiiiii",
    "ln_bwdbwd": "pwffppwwppfiiiiiii",
    "col_sum": "fwwii",
    "gelu_fwd": "ppi",
    "gelu_bwd": "pppi",
    "gelu_bwdbwd": "pppppi",
}


def _jobs(dims, dtypes):
    from energyvit.kernels import triton_layernorm as L

    jobs = []
    for dtype in dtypes:
        for d in dims:
            for name in ("ln_fwd", "ln_bwd", "ln_bwdbwd"):
                bm, bd, warps = L._blocks(name, d)
                jobs.append((name, dtype, d, {"BLOCK_M": bm, "BLOCK_D": bd}, warps))
        bp, bc, warps = L.COL_SUM_BLOCKS
        jobs.append(("col_sum", dtype, 768, {"BLOCK_P": bp, "BLOCK_C": bc}, warps))
        for name in ("gelu_fwd", "gelu_bwd", "gelu_bwdbwd"):
            from energyvit.kernels import triton_gelu as G
            jobs.append((name, dtype, 4 * 768, {"BLOCK": G.BLOCK}, G.NUM_WARPS))
    return jobs


def _int_value(name: str, d: int) -> int:
    return {"M": ROWS, "D": d, "numel": ROWS * d, "P": 264}.get(name, d)  # row strides are D


def compile_one(job) -> dict:
    name, dtype, d, meta, warps = job
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    from energyvit.kernels import triton_gelu as G
    from energyvit.kernels import triton_layernorm as L

    module = L if name in L.KERNEL_FUNCTIONS else G
    fn = getattr(module, module.KERNEL_FUNCTIONS[name])
    row = {f: "" for f in FIELDS}
    row.update(triton=triton.__version__, kernel=name, dtype=dtype, D=d, BLOCK_M=meta.get("BLOCK_M", meta.get("BLOCK_P", "")),
               BLOCK_D=meta.get("BLOCK_D", meta.get("BLOCK_C", meta.get("BLOCK"))), num_warps=warps)
    sig, consts, attrs = {}, {}, {}
    roles = iter(ROLES[name])
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", meta[p.name]
            continue
        role = next(roles)
        if role in "pfw":
            sig[p.name] = {"p": f"*{dtype}", "f": "*fp32", "w": "*fp32"}[role]
            attrs[(i,)] = BaseBackend.parse_attr("D")
        elif role == "s":
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
            if _int_value(p.name, d) % 16 == 0:
                attrs[(i,)] = BaseBackend.parse_attr("D")
    t0 = time.perf_counter()
    try:
        ck = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps, num_stages=1))
        row.update(P._ptxas_v(ck.asm["ptx"]))
        row["shared_bytes"] = ck.metadata.shared
        row["fits"] = "yes" if row["spill_store_bytes"] == 0 and ck.metadata.shared <= P.MAX_SHARED else "no"
    except Exception as e:  # a kernel that does not compile is a result too
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        row["fits"] = "no"
    row["compile_s"] = f"{time.perf_counter() - t0:.1f}"
    return row


def markdown_table(rows) -> str:
    out = ["| kernel | dtype | D | BLOCK_M | BLOCK_D | warps | registers | spill bytes (st/ld) | shared KB |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["error"]:
            out.append(f"| {r['kernel']} | {r['dtype']} | {r['D']} | | | | error: {r['error'][:60]} | | |")
            continue
        out.append(f"| {r['kernel']} | {r['dtype']} | {r['D']} | {r['BLOCK_M']} | {r['BLOCK_D']} | {r['num_warps']} "
                   f"| {r['registers']} | {r['spill_store_bytes']}/{r['spill_load_bytes']} "
                   f"| {int(r['shared_bytes']) / 1024:.1f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", default="192,384,768,1024")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    import triton

    jobs = _jobs([int(v) for v in args.dims.split(",")], args.dtypes.split(","))
    rows = [compile_one(j) for j in jobs]
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"ptxas-sm90a-norm-act-triton{triton.__version__}.csv"
    P.write_csv(out, FIELDS, rows)
    print(markdown_table(rows))
    print(f"# {len(rows)} compiles; wrote {out}")


if __name__ == "__main__":
    main()
