"""Exact (erf) GELU, as F.gelu's default and timm's nn.GELU: forward, backward and
backward-of-backward Triton kernels, fp32 math inside whatever the input dtype.

    Phi(x) = (1 + erf(x / sqrt 2)) / 2,  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
    y = x Phi,   y' = Phi + x phi,   y'' = phi (2 - x^2)
    bwd:     dx = dy y'
    bwdbwd:  for the cotangent gdx of dx:  gx = gdx dy y'',  gdy = gdx y'

One elementwise kernel per op (the backward of backward writes both outputs in one pass); inputs
are read with their own layout when contiguous, otherwise copied once. float64 runs
``reference_*`` (the same formulas in torch ops).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import launch_common as _c

BLOCK: int = 1024
NUM_WARPS: int = 4
_INV_SQRT2 = 1 / math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


@triton.jit
def _phi(x):
    """(Phi(x), phi(x)) in fp32 (constants 1/sqrt 2 and 1/sqrt(2 pi))."""
    return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)), 0.3989422804014327 * tl.exp(-0.5 * x * x)


@triton.jit
def _gelu_fwd_kernel(X, Y, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    cdf, _ = _phi(x)
    tl.store(Y + offs, (x * cdf).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(X, DY, DX, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    cdf, pdf = _phi(x)
    tl.store(DX + offs, (dy * (cdf + x * pdf)).to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwdbwd_kernel(X, DY, GDX, GX, GDY, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    gdx = tl.load(GDX + offs, mask=mask, other=0.0).to(tl.float32)
    cdf, pdf = _phi(x)
    tl.store(GX + offs, (gdx * dy * pdf * (2.0 - x * x)).to(GX.dtype.element_ty), mask=mask)
    tl.store(GDY + offs, (gdx * (cdf + x * pdf)).to(GDY.dtype.element_ty), mask=mask)


KERNEL_FUNCTIONS = {"gelu_fwd": "_gelu_fwd_kernel", "gelu_bwd": "_gelu_bwd_kernel", "gelu_bwdbwd": "_gelu_bwdbwd_kernel"}


# --------------------------------------------------------------------------------------------
# Reference formulas (float64, and the tests' ground truth for the kernels)
# --------------------------------------------------------------------------------------------
def _cdf_pdf(x):
    return 0.5 * (1.0 + torch.erf(x * _INV_SQRT2)), _INV_SQRT_2PI * torch.exp(-0.5 * x * x)


def reference_fwd(x):
    return x * _cdf_pdf(x)[0]


def reference_bwd(x, dy):
    cdf, pdf = _cdf_pdf(x)
    return dy * (cdf + x * pdf)


def reference_bwdbwd(x, dy, gdx):
    cdf, pdf = _cdf_pdf(x)
    return gdx * dy * pdf * (2.0 - x * x), gdx * (cdf + x * pdf)


def validate(x, *others) -> None:
    """One clear TypeError/ValueError if x (and the cotangents `others`, (name, tensor) pairs) cannot
    go to the GELU kernels."""
    _c.check_tensor(x, "x", "fused GELU")
    for name, t in others:
        if not isinstance(t, torch.Tensor) or t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} must be a {x.dtype} tensor of x's shape {tuple(x.shape)} on {x.device}")


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _grid(numel: int) -> tuple:
    return (max(1, -(-numel // BLOCK)),)


# --------------------------------------------------------------------------------------------
# Launchers: outputs contiguous, like x
# --------------------------------------------------------------------------------------------
def gelu_fwd(x: torch.Tensor, validate_inputs: bool = True) -> torch.Tensor:
    if validate_inputs:
        validate(x)
    if _c.uses_reference(x):
        return reference_fwd(x)
    x = _flat(x)
    y = _c.alloc(x.shape, x.dtype, x.device)
    if x.numel():
        _gelu_fwd_kernel[_grid(x.numel())](x, y, x.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y


def gelu_bwd(x: torch.Tensor, dy: torch.Tensor, validate_inputs: bool = True) -> torch.Tensor:
    if validate_inputs:
        validate(x, ("dy", dy))
    if _c.uses_reference(x):
        return reference_bwd(x, dy)
    x, dy = _flat(x), _flat(dy)
    dx = _c.alloc(x.shape, x.dtype, x.device)
    if x.numel():
        _gelu_bwd_kernel[_grid(x.numel())](x, dy, dx, x.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dx


def gelu_bwdbwd(x: torch.Tensor, dy: torch.Tensor, gdx: torch.Tensor, validate_inputs: bool = True):
    """(gx, gdy): total derivatives of <gdx, dx> w.r.t. x and dy."""
    if validate_inputs:
        validate(x, ("dy", dy), ("gdx", gdx))
    if _c.uses_reference(x):
        return reference_bwdbwd(x, dy, gdx)
    x, dy, gdx = _flat(x), _flat(dy), _flat(gdx)
    gx, gdy = _c.alloc(x.shape, x.dtype, x.device), _c.alloc(x.shape, x.dtype, x.device)
    if x.numel():
        _gelu_bwdbwd_kernel[_grid(x.numel())](x, dy, gdx, gx, gdy, x.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return gx, gdy

