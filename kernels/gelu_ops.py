"""Fused exact (erf) GELU as chained torch.library custom ops (namespace ``energyvit``):

    gelu_fwd(x)               -> y
    gelu_bwd(x, dy)           -> dx
    gelu_bwdbwd(x, dy, gdx)   -> (gx, gdy)

The autograd formula of gelu_fwd calls gelu_bwd, whose formula calls gelu_bwdbwd (total
derivatives w.r.t. x and dy; no formula of its own: a third derivative raises). float64 runs the
torch reference formulas (kernels/triton_gelu.py). The ops trust their inputs;
``energyvit.kernels.gelu`` validates once per chain.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import triton_gelu as _k


@torch.library.custom_op("energyvit::gelu_fwd", mutates_args=())
def gelu_fwd(x: Tensor) -> Tensor:
    return _k.gelu_fwd(x, validate_inputs=False)


@gelu_fwd.register_fake
def _gelu_fwd_fake(x):
    return x.new_empty(x.shape)


@torch.library.custom_op("energyvit::gelu_bwd", mutates_args=())
def gelu_bwd(x: Tensor, dy: Tensor) -> Tensor:
    return _k.gelu_bwd(x, dy, validate_inputs=False)


@gelu_bwd.register_fake
def _gelu_bwd_fake(x, dy):
    return x.new_empty(x.shape)


@torch.library.custom_op("energyvit::gelu_bwdbwd", mutates_args=())
def gelu_bwdbwd(x: Tensor, dy: Tensor, gdx: Tensor) -> tuple[Tensor, Tensor]:
    return _k.gelu_bwdbwd(x, dy, gdx, validate_inputs=False)


@gelu_bwdbwd.register_fake
def _gelu_bwdbwd_fake(x, dy, gdx):
    return x.new_empty(x.shape), x.new_empty(x.shape)


def _fwd_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, dy):
    if dy is None:
        return None
    (x,) = ctx.saved_tensors
    return gelu_bwd(x, dy)


def _bwd_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.set_materialize_grads(False)


def _bwd_backward(ctx, gdx):
    if gdx is None:
        return None, None
    x, dy = ctx.saved_tensors
    return gelu_bwdbwd(x, dy, gdx)


gelu_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)
gelu_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)
