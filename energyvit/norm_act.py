"""LayerNorm and GELU backends, selected by name (the model's `ln_gelu_backend`).

- ``aten``: F.layer_norm and F.gelu (exact, erf). The reference and the default; aten's own
  backward ops are twice differentiable, as many small kernels.
- ``fused``: the Triton kernels of ``energyvit.kernels`` (forward, backward and backward-of-backward
  as chained custom ops, fp32 math inside; docs/kernels.md).

Both compute the same functions with the same parameters, so the backend is how a model runs, not
what it is (checkpoints do not depend on it).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from energyvit.attention import fused_kernels

LN_GELU_BACKENDS = ("aten", "fused")


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float, backend: str = "aten") -> Tensor:
    """LayerNorm over the last dim with affine weight and bias."""
    if backend == "aten":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    if backend == "fused":
        return fused_kernels().layer_norm(x, weight, bias, eps)
    raise ValueError(f"unknown LayerNorm/GELU backend {backend!r}; choose one of {', '.join(LN_GELU_BACKENDS)}")


def gelu(x: Tensor, backend: str = "aten") -> Tensor:
    """Exact GELU, x * Phi(x) (F.gelu's default, timm's nn.GELU)."""
    if backend == "aten":
        return F.gelu(x)
    if backend == "fused":
        return fused_kernels().gelu(x)
    raise ValueError(f"unknown LayerNorm/GELU backend {backend!r}; choose one of {', '.join(LN_GELU_BACKENDS)}")
