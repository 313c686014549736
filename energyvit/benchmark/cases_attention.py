"""The attention suite's cases: one op (fwd, bwd or bwdbwd) of one backend on random inputs."""
from __future__ import annotations

import os

import torch

from energyvit.attention import math_attention
from energyvit.benchmark.environment import Unavailable, first_line
from energyvit.benchmark.launches import dispatched_ops


def attention_backends(device: torch.device) -> list[str]:
    """sdpa-default: SDPA as a model calls it (its own choice of kernel, named in attn_kernel); the
    other sdpa-* rows pin one kernel (CUDA only)."""
    sdpa = ["sdpa-default", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn"] if device.type == "cuda" else ["sdpa-default"]
    return ["math-eager", "math-compiled", "fused", *sdpa, "xformers"]


# SDPA's kernels, as the aten ops that dispatch below autograd (forward and backward), longest
# name first; what runs when none of them does is SDPA's composite math path
_SDPA_KERNELS = (
    ("_scaled_dot_product_flash_attention_for_cpu", "flash-cpu (torch's CPU flash kernel)"),
    ("_scaled_dot_product_flash_attention", "flash (torch's bundled FlashAttention-2)"),
    ("_scaled_dot_product_efficient_attention", "efficient (memory-efficient, from xFormers)"),
    ("_scaled_dot_product_cudnn_attention", "cudnn (cuDNN fused attention)"),
    ("_scaled_dot_product_fused_attention_overrideable", "overrideable (a backend's own kernel)"),
)
ATTN_KERNEL = {"math-eager": "aten matmul + softmax", "math-compiled": "Inductor-generated",
               "fused": "energyvit Triton kernels", "xformers": "xformers memory_efficient_attention"}


def sdpa_kernel_ran(fn) -> str:
    """Which of SDPA's kernels one call of fn dispatches (the first that appears; every SDPA call
    in fn takes the same choice for one shape and dtype)."""
    ops = [name.partition("::")[2].partition(".")[0] for name in dispatched_ops(fn)]
    for prefix, what in _SDPA_KERNELS:
        if any(op.startswith(prefix) for op in ops):
            return what
    return "math (SDPA's composite fallback: aten matmul + softmax)"


_COMPILED_MATH = None


def attention_fn(backend: str, device: torch.device, scale: float):
    """att(q, k, v) for a backend name; raises Unavailable when it cannot run here."""
    if backend == "math-eager":
        return lambda q, k, v: math_attention(q, k, v, scale)
    if backend == "math-compiled":
        global _COMPILED_MATH
        if _COMPILED_MATH is None:
            _COMPILED_MATH = torch.compile(math_attention)
        return lambda q, k, v: _COMPILED_MATH(q, k, v, scale)
    if backend == "fused":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise Unavailable("fused Triton kernels need CUDA, or TRITON_INTERPRET=1 set before triton is imported")
        try:
            from energyvit.kernels import attention as fused
        except Exception as e:  # noqa: BLE001  (triton missing or broken)
            raise Unavailable(first_line(e)) from e
        if device.type != "cuda":
            from energyvit.kernels import triton_attention as km

            if not km.INTERPRET:
                raise Unavailable("triton was imported before TRITON_INTERPRET=1 was set: kernels cannot run on CPU")
        return lambda q, k, v: fused(q, k, v, scale=scale)
    if backend.startswith("sdpa-"):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kind = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                "sdpa-cudnn": "CUDNN_ATTENTION"}.get(backend)
        if kind is None:
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale)
        if not hasattr(SDPBackend, kind):
            raise Unavailable(f"torch {torch.__version__} has no SDPBackend.{kind}")
        chosen = getattr(SDPBackend, kind)

        def sdpa(q, k, v):
            with sdpa_kernel([chosen]):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)

        return sdpa
    if backend == "xformers":
        try:
            import xformers.ops as xops
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"xformers not installed ({first_line(e)})") from e
        return lambda q, k, v: xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale).transpose(1, 2)
    raise ValueError(f"unknown attention backend {backend!r}")


def _randn(shape, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def attention_op(backend: str, op: str, shape, dtype: torch.dtype, device: torch.device):
    """A zero-argument callable running one `op` of `backend`, already called once (so a backend
    that cannot do `op` raises here). Inputs rotate between two random sets."""
    B, H, N, d = shape
    scale = d ** -0.5
    att = attention_fn(backend, device, scale)
    sets = [[_randn(shape, dtype, device, 1000 + 10 * j + i).requires_grad_(i < 3) for i in range(4)] for j in range(2)]
    state = {"i": 0}

    def nxt(seq):
        state["i"] = (state["i"] + 1) % len(seq)
        return seq[state["i"]]

    if op == "fwd":
        def fn():
            q, k, v, _ = nxt(sets)
            with torch.no_grad():
                return att(q, k, v)
    elif op == "bwd":
        graphs = [(att(q, k, v), (q, k, v), do) for q, k, v, do in sets]

        def fn():
            o, ins, do = nxt(graphs)
            return torch.autograd.grad(o, ins, do, retain_graph=True)
    elif op == "bwdbwd":
        q, k, v, do = sets[0]
        do = do.detach().clone().requires_grad_(True)
        o = att(q, k, v)
        g = torch.autograd.grad(o, (q, k, v), do, create_graph=True)
        cots = [[_randn(shape, dtype, device, 2000 + 10 * j + i) for i in range(3)] for j in range(2)]

        def fn():
            return torch.autograd.grad(g, (q, k, v, do), nxt(cots), retain_graph=True)
    else:
        raise ValueError(op)
    fn()
    return fn

