"""Fused LayerNorm as chained torch.library custom ops (namespace ``energyvit``):

    ln_fwd(x, w, b, eps)                              -> (y, mean, rstd)
    ln_bwd(x, w, mean, rstd, dy)                      -> (dx, dw, db)
    ln_bwdbwd(x, w, mean, rstd, dy, gdx, gdw, gdb)    -> (gx, gw, gdy)

Wired as the attention ops are (kernels/ops.py): the autograd formula of ln_fwd calls ln_bwd and
that of ln_bwd calls ln_bwdbwd, so a create_graph=True gradient and the backward through it both
run the kernels, and autograd records every call. mean and rstd are caches of x (marked
non-differentiable; the formulas return None for them), ln_bwdbwd returns total derivatives
w.r.t. (x, w, dy) and has no autograd formula (a third derivative raises). The bias does not
enter the backward. float64 operands run the torch reference formulas
(kernels/triton_layernorm.py): the path float64 gradcheck and gradgradcheck take. The ops trust
their inputs; ``energyvit.kernels.layer_norm`` validates once per chain.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import triton_layernorm as _k


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("energyvit::ln_fwd", mutates_args=())
def ln_fwd(x: Tensor, w: Tensor, b: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _k.ln_fwd(x, w, b, eps, validate_inputs=False)


@ln_fwd.register_fake
def _ln_fwd_fake(x, w, b, eps):
    stats = x.shape[:-1]
    return x.new_empty(x.shape), x.new_empty(stats, dtype=_stats_dtype(x)), x.new_empty(stats, dtype=_stats_dtype(x))


@torch.library.custom_op("energyvit::ln_bwd", mutates_args=())
def ln_bwd(x: Tensor, w: Tensor, mean: Tensor, rstd: Tensor, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _k.ln_bwd(x, w, mean, rstd, dy, validate_inputs=False)


@ln_bwd.register_fake
def _ln_bwd_fake(x, w, mean, rstd, dy):
    return x.new_empty(x.shape), w.new_empty(w.shape), w.new_empty(w.shape)


@torch.library.custom_op("energyvit::ln_bwdbwd", mutates_args=())
def ln_bwdbwd(x: Tensor, w: Tensor, mean: Tensor, rstd: Tensor, dy: Tensor, gdx: Tensor, gdw: Tensor,
              gdb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _k.ln_bwdbwd(x, w, mean, rstd, dy, gdx, gdw, gdb, validate_inputs=False)


@ln_bwdbwd.register_fake
def _ln_bwdbwd_fake(x, w, mean, rstd, dy, gdx, gdw, gdb):
    return x.new_empty(x.shape), w.new_empty(w.shape), x.new_empty(x.shape)


def _fwd_setup_context(ctx, inputs, output):
    x, w, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, w, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    # None stays None: in a double backward the bwd node returns None for y's cotangent path.
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, dy, dmean, drstd):
    if dy is None:
        return None, None, None, None
    x, w, mean, rstd = ctx.saved_tensors
    dx, dw, db = ln_bwd(x, w, mean, rstd, dy)
    return dx, dw, db, None


def _bwd_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.set_materialize_grads(False)


def _bwd_backward(ctx, gdx, gdw, gdb):
    if gdx is None and gdw is None and gdb is None:
        return None, None, None, None, None
    x, w, mean, rstd, dy = ctx.saved_tensors
    # restoration differentiates dx only: gdw, gdb are None there (zeros of width D cost nothing)
    gdx = x.new_zeros(x.shape) if gdx is None else gdx
    gdw = w.new_zeros(w.shape) if gdw is None else gdw
    gdb = w.new_zeros(w.shape) if gdb is None else gdb
    gx, gw, gdy = ln_bwdbwd(x, w, mean, rstd, dy, gdx, gdw, gdb)
    # mean and rstd are caches of x: their contribution is already in gx
    return gx, gw, None, None, gdy


ln_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)
ln_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)
