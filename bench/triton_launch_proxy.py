"""Kernel launches of the compiled training step as Inductor would generate them for a GPU, counted
on a machine without one. A CPU proxy, not a GPU measurement.

`energyvit bench --suites launches` on the CPU counts Inductor's C++ kernels, which fuse
differently from its Triton kernels (ViT-Ti/16 K=1 compiled: 377 C++ kernels where the H200 ran
689 Triton ones). This script instead makes Inductor generate Triton code for the CPU tensors
(``cpu_backend="triton"``) with an H200's device properties (132 SMs, 32-thread warps, which
decide how reductions are split), stops before anything is compiled by Triton or run (no GPU
driver is needed: Triton's compile is stubbed out, the wrapper code is only read), and counts the
kernel calls in the generated wrapper: Triton launches by kind, and the extern calls (matmuls,
convolutions, the project's attention ops). Checked against the H200 run of 2026-11-30 (ViT-Ti/16,
224 px, batch 64, bf16 autocast, K=1, compiled, torch 2.11): with torch 2.11 (its CPU wheel) and
fp16 autocast here, 689 Triton launches, as many as the H200 ran (softmax 48, gelu 48 and
layout-only 96 in both); torch 2.13 gives 672.

GPU estimate per step = Triton launches + extern calls weighted by the kernels each launches
(energyvit.benchmark.kernels_per_op: 1 per matmul, 1-2 per attention op) + the ops run outside
the compiled graph (6). cuBLAS may launch more than one kernel per matmul (the H200 ran 612
cuBLAS kernels for 509 matmuls), so the estimate is a lower bound there.

Inductor options (``--inductor KEY=VALUE``, e.g. ``split_reductions=False``, ``combo_kernels=True``)
show what an option would change in the launch count; only the count: speed needs the GPU. Combo
kernels (independent kernels launched as one) are disabled for CPU tensors inside Inductor; the
script lifts that one exclusion so that they are grouped as they would be on a GPU.

Usage: python bench/triton_launch_proxy.py [--mode compiled|fused+compiled] [--model vit_tiny_patch16]
       [--img 224] [--batch 64] [--ks 1] [--amp fp16] [--ln_gelu aten|fused] [--inductor KEY=VALUE ...]
       [--out FILE.json]
The fused mode needs TRITON_INTERPRET=1 (set here before triton is imported). bf16 autocast is
refused by the fused ops under the interpreter; fp16 gives the same kernel count.
"""
from __future__ import annotations

import argparse
import collections
import datetime as _dt
import inspect
import json
import os
import platform
import re
import sys
import textwrap
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused ops' availability check; nothing runs

import torch  # noqa: E402
import torch._functorch.config as functorch_config  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402
import torch.utils._triton as torch_triton  # noqa: E402
from torch._inductor import async_compile, codecache, scheduler  # noqa: E402
from torch._inductor.runtime import hints  # noqa: E402

from energyvit import benchmark as bench  # noqa: E402
from energyvit.commands.args import flag_type  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
H200 = dict(multi_processor_count=132, cc=90, major=9, regs_per_multiprocessor=65536,
            max_threads_per_multi_processor=2048, max_threads_per_block=1024, warp_size=32)
OUTSIDE_GRAPH = 6  # aten ops the compiled step runs outside its graph (CPU proxy: 3 clones, ones_like,
# _foreach_mul, copy_; on a GPU the foreach may take a few kernels)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="compiled", choices=["compiled", "fused+compiled"])
    ap.add_argument("--model", default="vit_tiny_patch16")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ks", type=int, default=1, help="restoration steps K")
    ap.add_argument("--amp", default="fp16", choices=["fp16", "fp32"], help="autocast dtype (fp32: none)")
    ap.add_argument("--ln_gelu", default=None, choices=["aten", "fused"],
                    help="LayerNorm/GELU backend (default: pretrain's for the mode, aten when compiled)")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    type=flag_type(bench.inductor_option),
                    help="an option of torch._inductor.config (a Python literal), repeatable")
    ap.add_argument("--out", default="", help="also write the result as JSON here")
    return ap.parse_args(argv)


class GpuCodegen:
    """Inductor generating Triton code for CPU tensors as it would for an H200, compiling nothing."""

    def __init__(self) -> None:
        self.wrappers: list[str] = []

    def __enter__(self):
        saved = [(inductor_config, "cpu_backend", "triton"), (inductor_config, "compile_threads", 1),
                 # nothing read from or written to the compile caches: their keys do not see the stubs
                 (inductor_config, "fx_graph_cache", False), (functorch_config, "enable_autograd_cache", False),
                 # no driver here: the hash that names Triton's backend, and Triton's compile, are stubbed
                 (torch_triton, "triton_hash_with_backend", lambda: "no-gpu-proxy"),
                 (torch_triton, "triton_backend", lambda: None),
                 (async_compile.AsyncCompile, "triton", lambda self, name, source, device_str="cuda": None),
                 (hints.DeviceProperties, "create", classmethod(self._h200(hints.DeviceProperties.create.__func__))),
                 (codecache.PyCodeCache, "load_by_key_path", self._keep(codecache.PyCodeCache.load_by_key_path))]
        self.restore = [(obj, name, obj.__dict__[name] if name in obj.__dict__ else getattr(obj, name))
                        for obj, name, _ in saved]
        for obj, name, value in saved:
            setattr(obj, name, value)
        scheduler.ForeachKernelSchedulerNode.set_group_algorithm_for_combo_kernels(_combo_groups_with_cpu())
        return self

    def __exit__(self, *exc):
        for obj, name, value in self.restore:
            setattr(obj, name, value)
        scheduler.ForeachKernelSchedulerNode.set_group_algorithm_for_combo_kernels(
            scheduler.ForeachKernelSchedulerNode._default_group_nodes_for_combo_kernels)

    @staticmethod
    def _h200(create):
        def h200(cls, device):
            props = create(cls, device)
            return props._replace(**H200) if device.type == "cpu" else props
        return h200

    def _keep(self, load):
        def keep(key, path, *args, **kwargs):
            self.wrappers.append(Path(path).read_text())
            return load(key, path, *args, **kwargs)
        return staticmethod(keep)


def _combo_groups_with_cpu():
    """Inductor's grouping of nodes into combo kernels without its exclusion of CPU tensors."""
    src = textwrap.dedent(inspect.getsource(scheduler.ForeachKernelSchedulerNode._default_group_nodes_for_combo_kernels))
    cpu_rule = 'device.type == "mps" or device.type == "cpu"'
    if cpu_rule not in src:
        raise RuntimeError("this torch groups combo kernels differently; the proxy needs updating")
    src = "\n".join(line for line in src.replace(cpu_rule, 'device.type == "mps"').splitlines()
                    if not line.lstrip().startswith("@"))
    namespace = dict(vars(scheduler))
    exec(src, namespace)  # noqa: S102  (torch's own source, one condition changed)
    return namespace["_default_group_nodes_for_combo_kernels"]


def count(wrapper: str) -> dict:
    """Kernel calls in the generated wrapper's call(): Triton launches and extern calls."""
    body = wrapper[wrapper.index("def call("):]
    triton_calls = re.findall(r"\n\s+(\w+)\.run\(", body)
    extern = [m.split(".")[-1] if m.startswith("extern_kernels") else "::".join(m.split(".")[2:4])
              for m in re.findall(r"\n\s+(?:\w+ = )?(extern_kernels\.\w+|torch\.ops\.\w+\.\w+)", body)]
    extern_kernels = sum(bench.kernels_per_op(e if "::" in e else f"aten::{e}") for e in extern)
    return {
        "triton_launches": len(triton_calls),
        "triton_kernels_defined": len(set(triton_calls)),
        "triton_by_kind": dict(collections.Counter(bench.kernel_category(t) for t in triton_calls).most_common()),
        "extern_calls": dict(collections.Counter(extern).most_common()),
        "extern_kernels": extern_kernels,
        "gpu_estimate": len(triton_calls) + extern_kernels + OUTSIDE_GRAPH,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    options = dict(args.inductor)
    torch.set_num_threads(1)
    amp = None if args.amp == "fp32" else args.amp
    t = time.perf_counter()
    with GpuCodegen() as gen, inductor_config.patch(options):
        try:
            case = bench.step_case(args.mode, args.model, args.img, args.ks, args.batch, torch.device("cpu"), amp,
                                   compile_only=True, ln_gelu=args.ln_gelu)
            sys.exit(f"the step was not compiled ({case.note})")
        except bench.CompiledOnly:
            pass
    wrappers = [w for w in gen.wrappers if "def call(" in w]
    if len(wrappers) != 1:
        sys.exit(f"expected one generated wrapper, found {len(wrappers)}")
    result = {
        "what": "CPU proxy of a GPU's kernel launches per compiled training step: Inductor's Triton codegen "
                "with an H200's device properties, nothing compiled or run (bench/triton_launch_proxy.py)",
        "mode": args.mode, "model": args.model, "img_size": args.img, "batch": args.batch, "restore_steps": args.ks,
        "autocast": amp or "none", "ln_gelu": args.ln_gelu or "the mode's", "inductor_options": options,
        **count(wrappers[0]),
        "codegen_s": round(time.perf_counter() - t, 1), "torch": torch.__version__,
        "python": platform.python_version(), "cpu": bench.cpu_model(), "git_commit": bench.git_commit(ROOT),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
