"""Kernel launches of one eager energy training step with and without the fused LayerNorm/GELU ops.
A CPU proxy of a GPU's launch count, not a GPU measurement; nothing here is timed.

For each restoration depth K and each eager configuration (aten attention and LayerNorm/GELU;
fused attention with aten LayerNorm/GELU; fused attention with the fused LayerNorm/GELU, what
`--fused` now runs) the step that `energyvit bench` times (the model `pretrain` builds, energy
head included, ViT-Ti/16 at 64 px, batch 2, fp32; the counts do not depend on image size or batch)
runs once under a TorchDispatchMode. Counted as `energyvit bench --suites launches` counts an eager
step on the CPU: every dispatched aten op that is not a view or an allocation is one kernel, the
project's custom ops count their Triton kernels (energyvit.benchmark.kernels_per_op). Also split
out: the ops named after LayerNorm or GELU (aten's native_layer_norm[_backward], gelu[_backward];
aten's double backward of both is composite, so its many elementwise ops fall under "other") and
the fused ops' kernels.

The compiled step is counted by bench/triton_launch_proxy.py (Inductor's Triton codegen for an H200,
`--ln_gelu aten|fused`); docs/kernels.md puts the two side by side.

Usage: TRITON_INTERPRET=1 python bench/ln_gelu_launches.py [--model vit_tiny_patch16] [--img 64]
       [--batch 2] [--ks 1,2] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import collections
import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused ops run in the interpreter on the CPU

import torch  # noqa: E402

from energyvit import benchmark as bench  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # name -> (step mode, LayerNorm/GELU backend)
    "eager (math attention, aten LN/GELU)": ("eager", "aten"),
    "fused attention, aten LN/GELU": ("fused", "aten"),
    "fused attention, fused LN/GELU (--fused)": ("fused", "fused"),
}


def categories(ops: collections.Counter) -> dict:
    """Kernels per category from the dispatched ops (name -> count)."""
    out = collections.Counter()
    for name, n in ops.items():
        k = bench.kernels_per_op(name) * n
        if not k:
            continue
        ns, _, op = name.partition("::")
        if ns == "energyvit":
            out["fused attention" if op.startswith("attn") else "fused LN/GELU"] += k
        elif "layer_norm" in op or "gelu" in op:
            out["aten LN/GELU ops"] += k
        elif op.partition(".")[0] in ("mm", "bmm", "addmm", "convolution", "convolution_backward"):
            out["matmul/conv"] += k
        else:
            out["other"] += k
    return dict(out.most_common())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_tiny_patch16")
    ap.add_argument("--img", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--ks", default="1,2")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for k in (int(v) for v in args.ks.split(",")):
        for name, (mode, ln_gelu) in CONFIGS.items():
            case = bench.step_case(mode, args.model, args.img, k, args.batch, torch.device("cpu"), None,
                                   ln_gelu=ln_gelu)
            ops = bench.dispatched_ops(case.fn)
            launches = sum(bench.kernels_per_op(op) * n for op, n in ops.items())
            rows.append({"restore_steps": k, "config": name, "launches": launches, "by_category": categories(ops)})
            print(f"K={k} {name}: {launches} ({rows[-1]['by_category']})", flush=True)
    result = {
        "what": "CPU proxy of a GPU's kernel launches per eager training step: dispatched ops that launch a kernel "
                "(bench/ln_gelu_launches.py); not timed",
        "model": args.model, "img_size": args.img, "batch": args.batch, "autocast": "none (fp32)", "rows": rows,
        "torch": torch.__version__, "python": platform.python_version(), "cpu": bench.cpu_model(),
        "git_commit": bench.git_commit(ROOT), "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
