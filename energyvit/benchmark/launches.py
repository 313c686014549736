"""The launches suite: what one step launches (CUDA kernels on a GPU; a proxy of them on the CPU)."""
from __future__ import annotations

import collections
import functools
import re
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from energyvit.benchmark.timing import make_sync

# aten ops that launch no kernel although their schema is not a view: allocations, and the
# view _unsafe_view (a reshape whose result is not marked as aliasing its input)
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view", "resize_",
              "lift_fresh", "set_"}
_OP_NAMESPACES = ("aten", "prims", "energyvit")  # profiler events of dispatched ops: "aten::mm", ...
_MATMULS = ("mm", "bmm", "addmm", "baddbmm", "convolution", "convolution_backward")
_LAYOUT_WORDS = {"clone", "permute", "transpose", "view", "select", "unsafe", "expand", "unsqueeze", "squeeze",
                 "slice", "t", "cat", "copy", "alias", "reshape", "as", "strided"}


# the project's custom ops (energyvit.kernels: attention, LayerNorm, GELU) and the Triton kernels each
# one launches (the LayerNorm backward ops: the row kernel and the parameter-gradient column sum)
_CUSTOM_OP_KERNELS = {"attn_fwd": 1, "attn_bwd": 2, "attn_bwdbwd": 2, "attn_packed_fwd": 1, "attn_packed_bwd": 2,
                      "attn_packed_bwdbwd": 2, "ln_fwd": 1, "ln_bwd": 2, "ln_bwdbwd": 2, "gelu_fwd": 1,
                      "gelu_bwd": 1, "gelu_bwdbwd": 1}


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
    if re.match(r"_?(ln|gelu)_(fwd|bwd|bwdbwd)_kernel$|_?col_sum_kernel$", name):
        return "fused layernorm/gelu"
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


def count_launches(case, device: torch.device) -> LaunchCount:
    """What one call of case.fn (a cases_step.StepCase) launches (see the package docstring: CUDA
    kernels on a GPU; on CPU a proxy of them)."""
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

