"""Fused attention as three chained torch.library custom ops (namespace ``energyvit``).

    attn_fwd(q, k, v, scale)                              -> (o, lse)
    attn_bwd(q, k, v, o, lse, do, scale)                  -> (dq, dk, dv)
    attn_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, scale) -> (gq, gk, gv, gdo)

The autograd formula of attn_fwd calls attn_bwd, and the autograd formula of attn_bwd calls
attn_bwdbwd, so autograd records every kernel call and the composition is differentiable to
second order (no autograd.Function whose backward launches a kernel: that would silently drop
the second-order terms). o and lse are treated as caches of (q, k, v): attn_bwd is a function
of (q, k, v, do) and attn_bwdbwd returns total derivatives w.r.t. (q, k, v, do); the gradients
w.r.t. the o and lse inputs are None. lse is marked non-differentiable. attn_bwdbwd has no
autograd formula: a third derivative raises instead of being silently wrong.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import triton_attention as _k


@torch.library.custom_op("energyvit::attn_fwd", mutates_args=())
def attn_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return _k.attn_fwd(q, k, v, scale)


@attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("energyvit::attn_bwd", mutates_args=())
def attn_bwd(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
             scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _k.attn_bwd(q, k, v, o, lse, do, scale)


@attn_bwd.register_fake
def _attn_bwd_fake(q, k, v, o, lse, do, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


@torch.library.custom_op("energyvit::attn_bwdbwd", mutates_args=())
def attn_bwdbwd(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
                gdq: Tensor, gdk: Tensor, gdv: Tensor,
                scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _k.attn_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, scale)


@attn_bwdbwd.register_fake
def _attn_bwdbwd_fake(q, k, v, o, lse, do, gdq, gdk, gdv, scale):
    return tuple(q.new_empty(q.shape) for _ in range(4))


# ------------------------------------------------------------------ autograd formulas
def _fwd_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)
    # Undefined incoming grads stay None (not zeros). In a double backward the attn_bwd node
    # returns None for its o input, and materialized zeros would launch a useless attn_bwd.
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, do, dlse):
    if do is None:
        return None, None, None, None
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = attn_bwd(q, k, v, o, lse, do, ctx.scale)
    return dq, dk, dv, None


attn_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _bwd_setup_context(ctx, inputs, output):
    q, k, v, o, lse, do, scale = inputs
    ctx.save_for_backward(q, k, v, o, lse, do)
    ctx.scale = scale
    ctx.set_materialize_grads(False)


def _bwd_backward(ctx, gdq, gdk, gdv):
    if gdq is None and gdk is None and gdv is None:
        return None, None, None, None, None, None, None
    q, k, v, o, lse, do = ctx.saved_tensors
    gdq = torch.zeros_like(q) if gdq is None else gdq
    gdk = torch.zeros_like(q) if gdk is None else gdk
    gdv = torch.zeros_like(q) if gdv is None else gdv
    gq, gk, gv, gdo = attn_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, ctx.scale)
    # o and lse are caches of (q, k, v): their contribution is already in gq, gk, gv.
    return gq, gk, gv, None, None, gdo, None


attn_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)
