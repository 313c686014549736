"""Fused Triton softmax attention, differentiable to second order.

Public API: ``attention(q, k, v, scale=None) -> o`` on (batch, heads, N, head_dim) tensors.
The ops ``torch.ops.energyvit.attn_fwd / attn_bwd / attn_bwdbwd`` are registered on import.
On CPU the kernels run only under the Triton interpreter (TRITON_INTERPRET=1 set before
triton is imported).
"""
from __future__ import annotations

from torch import Tensor

from . import triton_attention
from .ops import attn_bwd, attn_bwdbwd, attn_fwd

__all__ = ["attention", "attn_fwd", "attn_bwd", "attn_bwdbwd", "triton_attention"]


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """softmax(scale * q k^T) v with fused Triton kernels; first and second derivatives fused too."""
    triton_attention.validate_qkv(q, k, v, scale)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    o, _ = attn_fwd(q, k, v, float(scale))
    return o
