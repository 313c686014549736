"""Fused Triton softmax attention, LayerNorm and GELU, differentiable to second order.

Public API:

- ``attention(q, k, v, scale=None) -> o`` on (batch, heads, N, head_dim) tensors;
- ``attention_packed(qkv, scale=None) -> o`` on the packed output of a qkv projection,
  qkv (batch, N, 3, heads, head_dim) -> o (batch, N, heads, head_dim): the kernels read q, k, v
  in place and write o so that ``o.reshape(batch, N, heads * head_dim)`` is a view; the gradient
  w.r.t. qkv is one (batch, N, 3, heads, head_dim) tensor;
- ``attn_fwd / attn_bwd / attn_bwdbwd`` and ``attn_packed_fwd / attn_packed_bwd /
  attn_packed_bwdbwd``: the custom ops behind them, called with input checks;
- ``layer_norm(x, weight, bias, eps)`` over the last dim and ``gelu(x)`` (exact, erf): chained
  custom ops for the forward, backward and backward-of-backward (layernorm_ops, gelu_ops); float64
  runs their torch reference formulas.

Inputs are validated once per call of these functions; the ops in ``torch.ops.energyvit`` do not
check their inputs (inside an autograd chain they only see tensors the chain itself made).
On CPU the kernels run only under the Triton interpreter (TRITON_INTERPRET=1 set before triton is
imported).
"""
from __future__ import annotations

from torch import Tensor

from . import gelu_ops, layernorm_ops, ops, triton_attention, triton_gelu, triton_layernorm
from .triton_attention import validate_bwd, validate_packed, validate_packed_bwd, validate_qkv

__all__ = ["attention", "attention_packed", "attn_fwd", "attn_bwd", "attn_bwdbwd", "attn_packed_fwd",
           "attn_packed_bwd", "attn_packed_bwdbwd", "gelu", "gelu_ops", "layer_norm", "layernorm_ops", "ops",
           "triton_attention", "triton_gelu", "triton_layernorm"]


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """softmax(scale * q k^T) v with fused Triton kernels; first and second derivatives fused too."""
    validate_qkv(q, k, v, scale)
    o, _ = ops.attn_fwd(q, k, v, q.shape[-1] ** -0.5 if scale is None else float(scale))
    return o


def attention_packed(qkv: Tensor, scale: float | None = None) -> Tensor:
    """Attention on a packed qkv (B, N, 3, H, d) -> o (B, N, H, d); scale defaults to d ** -0.5."""
    validate_packed(qkv, scale)
    o, _ = ops.attn_packed_fwd(qkv, qkv.shape[-1] ** -0.5 if scale is None else float(scale))
    return o


def attn_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    validate_qkv(q, k, v, scale)
    return ops.attn_fwd(q, k, v, float(scale))


def attn_bwd(q, k, v, o, lse, do, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    validate_bwd(q, k, v, o, lse, do, scale)
    return ops.attn_bwd(q, k, v, o, lse, do, float(scale))


def attn_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    validate_bwd(q, k, v, o, lse, do, scale, (gdq, gdk, gdv))
    return ops.attn_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, float(scale))


def attn_packed_fwd(qkv: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    validate_packed(qkv, scale)
    return ops.attn_packed_fwd(qkv, float(scale))


def attn_packed_bwd(qkv, o, lse, do, scale: float) -> Tensor:
    validate_packed_bwd(qkv, o, lse, do, scale)
    return ops.attn_packed_bwd(qkv, o, lse, do, float(scale))


def attn_packed_bwdbwd(qkv, o, lse, do, gdqkv, scale: float) -> tuple[Tensor, Tensor]:
    validate_packed_bwd(qkv, o, lse, do, scale, gdqkv)
    return ops.attn_packed_bwdbwd(qkv, o, lse, do, gdqkv, float(scale))


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """F.layer_norm(x, (D,), weight, bias, eps) with fused Triton kernels to second order."""
    triton_layernorm.validate(x, weight, bias, eps)
    return layernorm_ops.ln_fwd(x, weight, bias, float(eps))[0]


def gelu(x: Tensor) -> Tensor:
    """F.gelu(x) (exact, erf) with fused Triton kernels to second order."""
    triton_gelu.validate(x)
    return gelu_ops.gelu_fwd(x)
