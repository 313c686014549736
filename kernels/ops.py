"""Fused attention as chained torch.library custom ops (namespace ``energyvit``).

(batch, heads, N, head_dim) operands:

    attn_fwd(q, k, v, scale)                              -> (o, lse)
    attn_bwd(q, k, v, o, lse, do, scale)                  -> (dq, dk, dv)
    attn_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, scale) -> (gq, gk, gv, gdo)

Packed operands, as a qkv projection lays them out: qkv (B, N, 3, H, d), o (B, N, H, d):

    attn_packed_fwd(qkv, scale)                           -> (o, lse)
    attn_packed_bwd(qkv, o, lse, do, scale)               -> dqkv
    attn_packed_bwdbwd(qkv, o, lse, do, gdqkv, scale)     -> (gqkv, gdo)

The autograd formula of each fwd op calls its bwd op, and the autograd formula of each bwd op
calls its bwdbwd op, so autograd records every kernel call and the composition is
differentiable to second order (no autograd.Function whose backward launches a kernel: that
would silently drop the second-order terms). o and lse are treated as caches of the inputs:
bwd is a function of (inputs, do) and bwdbwd returns total derivatives w.r.t. (inputs, do);
the gradients w.r.t. the o and lse inputs are None. lse is marked non-differentiable. The
bwdbwd ops have no autograd formula: a third derivative raises instead of being silently wrong.

The ops do not validate their inputs: the public entry points (``energyvit.kernels.attention``,
``attention_packed`` and the checked wrappers in ``energyvit.kernels``) validate once per
chain, and inside a chain every input is either saved by these ops or a cotangent that autograd
has already matched to the output's shape, dtype and device.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import triton_attention as _k


# ------------------------------------------------------------------ (batch, heads, N, head_dim)
@torch.library.custom_op("energyvit::attn_fwd", mutates_args=())
def attn_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return _k.attn_fwd(q, k, v, scale, validate=False)


@attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("energyvit::attn_bwd", mutates_args=())
def attn_bwd(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
             scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _k.attn_bwd(q, k, v, o, lse, do, scale, validate=False)


@attn_bwd.register_fake
def _attn_bwd_fake(q, k, v, o, lse, do, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


@torch.library.custom_op("energyvit::attn_bwdbwd", mutates_args=())
def attn_bwdbwd(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
                gdq: Tensor, gdk: Tensor, gdv: Tensor,
                scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _k.attn_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, scale, validate=False)


@attn_bwdbwd.register_fake
def _attn_bwdbwd_fake(q, k, v, o, lse, do, gdq, gdk, gdv, scale):
    return tuple(q.new_empty(q.shape) for _ in range(4))


# ------------------------------------------------------------------ packed qkv
@torch.library.custom_op("energyvit::attn_packed_fwd", mutates_args=())
def attn_packed_fwd(qkv: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return _k.attn_packed_fwd(qkv, scale, validate=False)


@attn_packed_fwd.register_fake
def _attn_packed_fwd_fake(qkv, scale):
    b, n, _, h, d = qkv.shape
    return qkv.new_empty((b, n, h, d)), qkv.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op("energyvit::attn_packed_bwd", mutates_args=())
def attn_packed_bwd(qkv: Tensor, o: Tensor, lse: Tensor, do: Tensor, scale: float) -> Tensor:
    return _k.attn_packed_bwd(qkv, o, lse, do, scale, validate=False)


@attn_packed_bwd.register_fake
def _attn_packed_bwd_fake(qkv, o, lse, do, scale):
    return qkv.new_empty(qkv.shape)


@torch.library.custom_op("energyvit::attn_packed_bwdbwd", mutates_args=())
def attn_packed_bwdbwd(qkv: Tensor, o: Tensor, lse: Tensor, do: Tensor, gdqkv: Tensor,
                       scale: float) -> tuple[Tensor, Tensor]:
    return _k.attn_packed_bwdbwd(qkv, o, lse, do, gdqkv, scale, validate=False)


@attn_packed_bwdbwd.register_fake
def _attn_packed_bwdbwd_fake(qkv, o, lse, do, gdqkv, scale):
    return qkv.new_empty(qkv.shape), o.new_empty(o.shape)


# ------------------------------------------------------------------ autograd formulas
def _fwd_setup_context(ctx, inputs, output):
    *qkv, scale = inputs
    o, lse = output
    ctx.save_for_backward(*qkv, o, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)
    # Undefined incoming grads stay None (not zeros). In a double backward the bwd node
    # returns None for its o input, and materialized zeros would launch a useless bwd.
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, do, dlse):
    if do is None:
        return None, None, None, None
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = attn_bwd(q, k, v, o, lse, do, ctx.scale)
    return dq, dk, dv, None


def _bwd_setup_context(ctx, inputs, output):
    *saved, scale = inputs
    ctx.save_for_backward(*saved)
    ctx.scale = scale
    ctx.set_materialize_grads(False)


def _bwd_backward(ctx, gdq, gdk, gdv):
    if gdq is None and gdk is None and gdv is None:
        return None, None, None, None, None, None, None
    q, k, v, o, lse, do = ctx.saved_tensors
    # zeros in the outputs' (contiguous) layout: the kernels read them without a copy
    gdq = q.new_zeros(q.shape) if gdq is None else gdq
    gdk = q.new_zeros(q.shape) if gdk is None else gdk
    gdv = q.new_zeros(q.shape) if gdv is None else gdv
    gq, gk, gv, gdo = attn_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, ctx.scale)
    # o and lse are caches of (q, k, v): their contribution is already in gq, gk, gv.
    return gq, gk, gv, None, None, gdo, None


attn_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)
attn_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)


def _packed_fwd_backward(ctx, do, dlse):
    if do is None:
        return None, None
    qkv, o, lse = ctx.saved_tensors
    return attn_packed_bwd(qkv, o, lse, do, ctx.scale), None


def _packed_bwd_backward(ctx, gdqkv):
    if gdqkv is None:
        return None, None, None, None, None
    qkv, o, lse, do = ctx.saved_tensors
    gqkv, gdo = attn_packed_bwdbwd(qkv, o, lse, do, gdqkv, ctx.scale)
    return gqkv, None, None, gdo, None


attn_packed_fwd.register_autograd(_packed_fwd_backward, setup_context=_fwd_setup_context)
attn_packed_bwd.register_autograd(_packed_bwd_backward, setup_context=_bwd_setup_context)
