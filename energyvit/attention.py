"""Attention backends, selected by name.

Every backend computes softmax(q k^T * scale) v on (batch, heads, tokens, head_dim) tensors and
must be differentiable to second order: restoration takes dE/dx with create_graph=True and the
training loss backpropagates through it.

- ``math``: plain matmul + softmax in aten ops. The reference path and the CPU default. It keeps
  the N x N attention matrix per layer for autograd.
- ``fused``: the Triton kernels of ``energyvit.kernels`` (forward, backward and
  backward-of-backward as chained custom ops); no N x N tensor in global memory.

F.scaled_dot_product_attention is deliberately not used: its flash, memory-efficient, cuDNN and
CPU-flash kernels have no second derivative.
"""
from __future__ import annotations

import torch
from torch import Tensor

BACKENDS = ("math", "fused")


def math_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Reference softmax attention built from aten ops (differentiable to any order)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    attn = torch.matmul(q, k.transpose(-2, -1)) * scale
    return torch.matmul(attn.softmax(dim=-1), v)


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "math", scale: float | None = None) -> Tensor:
    """Softmax attention with the named backend."""
    if backend == "math":
        return math_attention(q, k, v, scale)
    if backend == "fused":
        try:  # imported here: only the fused backend needs triton
            from energyvit.kernels import attention as fused_attention
        except ModuleNotFoundError as e:
            if e.name != "triton":
                raise
            raise ImportError("the fused attention backend needs triton: pip install 'energyvit[triton]'") from None
        return fused_attention(q, k, v, scale=scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
