"""Error of the attention kernels' formulas when every key shares a large component: a float64
emulation of their rounding, bf16 and fp16. CPU only; no GPU number.

The kernels cannot run in bf16 on the CPU (bf16 tl.dot is wrong in the Triton interpreter), so
this emulates them in float64 with the kernels' rounding points: inputs and the stored O in the
dtype, every tile cast to the dtype before a dot (P, dS, P*W0, P*G, dS2, Z), all sums in float64
(the kernels' fp32 accumulation is far below bf16/fp16 rounding), outputs rounded to the dtype.
Tiling is not emulated (sums over whole rows); both emulate the one-sweep query kernel (the default
variant). "main" is the formulas of main at f33e5ba
(one-sweep linear split for gQ, gdO = P gdV + (P*G) V - C O, dQ = dS K); "branch" those of this
branch (G shifted by its value at the reference key row, dots with K corrected by the rounded
tiles' row sums times k_ref, Z and dS2 per element). "eager" is the math path autograd run in the
dtype. Errors: relative Frobenius error against float64 math on the same (rounded) inputs.
For fp16 the real kernels also run through the interpreter ("kernels"), to check the emulation.

Usage: python bench/attention_cancellation.py [--n 197] [--d 64] [--out PATH]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from energyvit.attention import math_attention  # noqa: E402

F64 = torch.float64
NAMES = ["dq", "gq", "gk", "gv", "gdo"]
REF_ROWS = 16


def reference(q, k, v, do, gdq, gdk, gdv, scale, dtype=F64):
    """dq and (gq, gk, gv, gdo) from autograd of the math path in `dtype`."""
    x = [t.to(dtype).requires_grad_() for t in (q, k, v, do)]
    o = math_attention(*x[:3], scale)
    dq, dk, dv = torch.autograd.grad(o, x[:3], x[3], create_graph=True)
    loss = (dq * gdq.to(dtype)).sum() + (dk * gdk.to(dtype)).sum() + (dv * gdv.to(dtype)).sum()
    return [t.to(F64) for t in (dq, *torch.autograd.grad(loss, x))]


def emulate(q, k, v, do, gdq, gdk, gdv, scale, dtype, formulas):
    """dq, gq, gk, gv, gdo with the rounding points of the kernels of `formulas` ("main"/"branch")."""
    def r(x):
        return x.to(dtype).to(F64)

    s = q @ k.T * scale
    p = torch.softmax(s, -1)
    o = r(p @ v)
    delta = (do * o).sum(-1, keepdim=True)
    dp, h = do @ v.T, do @ gdv.T
    g = (gdq @ k.T + q @ gdk.T) * scale
    ds = p * (dp - delta)
    if formulas == "main":
        c = (p * g).sum(-1, keepdim=True)
        pw0 = p * (g * (dp - delta) + h)
        e0 = pw0.sum(-1, keepdim=True)
        dq = r(ds) @ k * scale
        gq = (r(ds) @ gdk + r(pw0) @ k - c * (r(ds) @ k) - e0 * (r(p) @ k)) * scale
        gdo = r(p) @ gdv + r(p * g) @ v - c * o
        ds2 = p * (g * (dp - delta) + h - c * dp - (e0 - c * delta))
    else:
        k_ref, gdk_ref = k[:REF_ROWS].mean(0), gdk[:REF_ROWS].mean(0)
        g_r = g - ((gdq @ k_ref + q @ gdk_ref) * scale)[:, None]
        c_r = (p * g_r).sum(-1, keepdim=True)
        pw0 = p * (g_r * (dp - delta) + h)
        e0 = pw0.sum(-1, keepdim=True)
        dq = (r(ds) @ k - r(ds).sum(-1, keepdim=True) * k_ref) * scale
        k_sum = r(pw0).sum(-1) - c_r[:, 0] * r(ds).sum(-1) - e0[:, 0] * r(p).sum(-1)
        gq = (r(ds) @ gdk + r(pw0) @ k - c_r * (r(ds) @ k) - e0 * (r(p) @ k) - k_sum[:, None] * k_ref) * scale
        gdo = r(p) @ gdv + r(p * g_r) @ v - c_r * o
        ds2 = p * ((g_r - c_r) * (dp - delta) + h - e0)
        c = c_r  # the key kernel's G - C is the same with the shifted G
        g = g_r
    z = p * (g - c)
    gk = (r(ds).T @ gdq + r(ds2).T @ q) * scale
    gv = r(z).T @ do
    return [r(t) for t in (dq, gq, gk, gv, gdo)]


def inputs(n, d, offset, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do, gdq, gdk, gdv = (torch.randn(n, d, generator=gen, dtype=F64) for _ in range(7))
    u = torch.randn(d, generator=gen, dtype=F64)
    k = k + offset * k.norm(dim=-1).mean() * u / u.norm()
    return q, k, v, do, gdq, gdk, gdv


def kernels(ins, scale, dtype):
    """The real kernels through the interpreter (fp16): dq, gq, gk, gv, gdo."""
    from energyvit.kernels import attn_bwd, attn_bwdbwd, attn_fwd

    q, k, v, do, gdq, gdk, gdv = (t.to(dtype)[None, None] for t in ins)
    o, lse = attn_fwd(q, k, v, scale)
    dq = attn_bwd(q, k, v, o, lse, do, scale)[0]
    return [t[0, 0].to(F64) for t in (dq, *attn_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, scale))]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=197)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    scale = args.d ** -0.5
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for offset in (0.0, 3.0, 10.0):
            ins = [t.to(dtype).to(F64) for t in inputs(args.n, args.d, offset)]
            ref = reference(*ins, scale)
            paths = {"eager": reference(*ins, scale, dtype=dtype),
                     "main": emulate(*ins, scale, dtype, "main"), "branch": emulate(*ins, scale, dtype, "branch")}
            if dtype == torch.float16:
                paths["kernels"] = kernels(ins, scale, dtype)
            for path, outs in paths.items():
                rows.append({"dtype": str(dtype).replace("torch.", ""), "offset": offset, "path": path,
                             **{n: rel(t, r) for n, t, r in zip(NAMES, outs, ref)}})
    print(f"| dtype | offset | path | {' | '.join(NAMES)} |\n|---|---|---|{'---|' * len(NAMES)}")
    for r in rows:
        print(f"| {r['dtype']} | {r['offset']:g}x | {r['path']} | " + " | ".join(f"{r[n]:.1e}" for n in NAMES) + " |")
    today = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"attention_cancellation-cpu-{today}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": today, "machine": platform.processor() or platform.machine(),
                               "torch": torch.__version__, "n": args.n, "d": args.d,
                               "what": "relative error vs float64 math; emulated rounding (main, branch), "
                                       "eager math in the dtype, interpreter kernels (fp16)", "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
