"""Attention backends, selected by name.

Every backend computes softmax(q k^T * scale) v on (batch, heads, tokens, head_dim) tensors. The
energy method's training needs a second derivative (restoration takes dE/dx with create_graph=True
and the training loss backpropagates through it): math and fused have one, sdpa does not.

- ``math``: plain matmul + softmax in aten ops. The reference path and the CPU default. It keeps
  the N x N attention matrix per layer for autograd.
- ``fused``: the Triton kernels of ``energyvit.kernels`` (forward, backward and
  backward-of-backward as chained custom ops); no N x N tensor in global memory.

- ``sdpa``: F.scaled_dot_product_attention (flash, memory-efficient or cuDNN kernels where the
  device has them). First order only: those kernels have no second derivative, so the energy
  method's training refuses it (energyvit.restore); MAE, whose step is first order, may use it.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("math", "fused", "sdpa")
SECOND_ORDER_BACKENDS = ("math", "fused")  # differentiable twice: the energy method's training needs it


def math_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Reference softmax attention built from aten ops (differentiable to any order)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    attn = torch.matmul(q, k.transpose(-2, -1)) * scale
    return torch.matmul(attn.softmax(dim=-1), v)


def fused_kernels():
    """energyvit.kernels (attention, LayerNorm, GELU), or one line that says what to do when it cannot be imported."""
    try:  # imported here: only the fused backend needs triton
        import energyvit.kernels as kernels
    except ModuleNotFoundError as e:
        if e.name == "triton":
            raise ImportError("the fused attention backend needs triton: pip install 'energyvit[triton]'") from None
        if e.name == "energyvit.kernels":  # a source tree on sys.path: kernels/ installs as energyvit.kernels
            src = Path(__file__).parent
            raise ImportError(
                f"energyvit.kernels is not importable: energyvit was imported from the source folder {src}, which "
                "has no kernels/ inside (kernels/ installs as energyvit.kernels); install the package with "
                f"`pip install -e .` or start Python outside {src.parent}"
            ) from None
        raise
    return kernels


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "math", scale: float | None = None) -> Tensor:
    """Softmax attention with the named backend."""
    if backend == "math":
        return math_attention(q, k, v, scale)
    if backend == "fused":
        return fused_kernels().attention(q, k, v, scale=scale)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def packed_attention(qkv: Tensor, backend: str = "math", scale: float | None = None) -> Tensor:
    """Attention on the packed output of a qkv projection: qkv (B, N, 3, H, d) -> (B, N, H, d).

    The fused backend reads q, k, v in place and writes its output so that reshaping it to
    (B, N, H * d) is a view; its gradient w.r.t. qkv is one packed tensor (no permute copies).
    """
    if backend == "fused":
        return fused_kernels().attention_packed(qkv, scale=scale)
    if backend in ("math", "sdpa"):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return attention(q, k, v, backend, scale).transpose(1, 2)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
