"""Fused softmax attention in Triton: forward, backward and backward-of-backward kernels.

The kernels never write an N x N tensor to global memory. Notation (one head; docs/kernels.md
has the derivation):

    S = scale * Q K^T,  P = softmax(S) (row-wise),  O = P V,  lse = logsumexp(S) (row-wise)
    dP = dO V^T,  D = rowsum(dO * O),  dS = P * (dP - D)
    dQ = scale * dS K,  dK = scale * dS^T Q,  dV = P^T dO

Backward-of-backward, for cotangents (gdQ, gdK, gdV) of (dQ, dK, dV):

    G = scale * (gdQ K^T + Q gdK^T),  H = dO gdV^T
    C = rowsum(P * G),  E0 = rowsum(P * (G * (dP - D) + H))
    dS2 = P * ((G - C) * (dP - D) + H - E0),  Z = P * (G - C)
    gQ  = scale * (dS gdK + dS2 K)
    gK  = scale * (dS^T gdQ + dS2^T Q)
    gV  = Z^T dO
    gdO = P gdV + Z V

Kernels (one launcher each, below):
    _attn_fwd_kernel       query blocks, one sweep over keys: O, lse (online softmax)
    _attn_bwd_dq_kernel    query blocks: D = rowsum(dO*O) (stored), dQ
    _attn_bwd_dkdv_kernel  key blocks, sweep over queries: dK, dV (reads D)
    _attn_bwdbwd_q_kernel  query blocks: gQ, gdO and row stats D, C, E0; one sweep over keys
                           (gQ, gdO by a linear split) or two (variant TWO_SWEEP)
    _attn_bwdbwd_kv_kernel key blocks, sweep over queries: gK, gV (reads D, C, E0)

Cancellation. Only G - C enters the results, so the query kernel shifts G by a row constant r
(G at a reference key row) before any sum, and every dot with K on the query side (dS K, dS2 K,
and the split's (P*W0) K, P K) is corrected by the row sums of its rounded left tile times the
reference key row k_ref (mean of the first REF_ROWS keys): a large component that every key
shares (a key bias) then cancels in fp32 instead of multiplying each tile's rounding error
(docs/kernels.md, "Cancellation").

Layouts. Every (N, head_dim) matrix of one (batch b, head h) is addressed with three strides
(b, h, row); the head-dim stride must be 1. Three stride families per kernel:
    q family  (s_q*): the inputs q, k, v (k and v share q's strides)
    g family  (s_g*): dq, dk, dv / gq, gk, gv outputs and the gdq, gdk, gdv cotangents
    o family  (s_o*): o, do, gdo
So the same kernels serve (batch, heads, N, head_dim) tensors and the packed layout of a qkv
projection, qkv (B, N, 3, H, d) with o in (B, N, H, d), without copies. Offsets are int64 (the
(batch, head) offset and row * row stride both pass 2^31 on large inputs). Row statistics (lse,
D, C, E0) are fp32, (B, H, N) contiguous. Grid: (cdiv(N, BLOCK), H, B).

Tail blocks: the last block of a grid and the last trip of a sweep run with TAIL_ROWS (16) rows
when their valid rows fit (N = 197 = 3 x 64 + 5: 16 rows computed instead of 64); tile_blocks()
says how a length is cut, for every config (a config may opt out with TAIL = 0).

No atomics: every output tile is written by exactly one program, so a given config gives
bit-identical results run to run. Configs differ in rounding, though (block sizes and warps change
the fp32 summation order; TWO_SWEEP is another formula), and which config runs is decided per
launch key by kernels/config_choice.py: autotuned on GPU (never inside a CUDA-graph capture), pinned
in deterministic mode (ENERGYVIT_DETERMINISTIC=1 or DETERMINISTIC = True), or loaded from a file
(save_tuned_configs / load_tuned_configs). Under the Triton interpreter (TRITON_INTERPRET=1, CPU
tensors) a single fixed config is used. fp32 inputs use TF32 tensor-core dots on GPU unless
``ALLOW_TF32`` is set to False (then IEEE fp32 dots). In the interpreter fp32 dots are IEEE.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import config_choice
from .config_choice import ConfigChooser, LaunchKey, deterministic_from_env

try:  # triton >= 3.2 reads TRITON_INTERPRET through knobs; the jit decorator decides at import.
    from triton import knobs as _knobs

    INTERPRET: bool = bool(_knobs.runtime.interpret)
except Exception:  # pragma: no cover - older triton
    import os

    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Debug/test flag: when True, launchers allocate every output (and internal row-statistics
#: buffer) filled with NaN instead of torch.empty, so a tile that a kernel forgets to write shows up.
POISON_OUTPUTS: bool = False
#: fp32 inputs: use TF32 tensor-core dots on GPU (True) or IEEE fp32 dots (False).
ALLOW_TF32: bool = True
#: Largest supported head dim (BLOCK_D = next power of two >= max(head_dim, 16)).
MAX_HEAD_DIM: int = 128
#: Grid dimensions 1 and 2 (heads, batch) are limited to 65535 programs.
MAX_GRID_YZ: int = 65535
#: Block sizes used under the interpreter (one program at a time; small keeps tests fast and
#: still exercises multi-block loops and masking at N = 50 or 197).
INTERPRET_BLOCKS: dict = {"BLOCK_M": 32, "BLOCK_N": 32}
#: Rows of the last block of a grid or a sweep when its valid rows fit (tl.dot's smallest tile
#: side): at N = 197 = 3 x 64 + 5 the last block computes 16 rows instead of 64 (or 32).
TAIL_ROWS: int = 16
#: Variant constexprs and their defaults: an autotune config may override them; the interpreter
#: runs the defaults (the tests flip them to cover every variant).
VARIANT_DEFAULTS: dict = {"bwdbwd_q": {"TWO_SWEEP": False}}
#: Rows averaged into the reference key row (k_ref, gdk_ref) of the dq and bwd-of-bwd query
#: kernels: a component every key shares cancels against it (docs/kernels.md, "Cancellation").
REF_ROWS: int = 16

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(base, rows, mask_r, offs_d, mask_d, s_n):
    """Load a (len(rows), BLOCK_D) tile of an (N, head_dim) matrix with row stride s_n, zero-padded.
    Row offsets are int64: rows * s_n passes 2^31 once N * s_n does (e.g. N * 3 * H * d, packed)."""
    return tl.load(base + _row_offsets(rows, offs_d, s_n), mask=mask_r[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _store_rows(base, rows, mask_r, offs_d, mask_d, s_n, val):
    tl.store(base + _row_offsets(rows, offs_d, s_n), val.to(base.dtype.element_ty),
             mask=mask_r[:, None] & mask_d[None, :])


@triton.jit
def _row_offsets(rows, offs_d, s_n):
    """int64 element offsets of a (len(rows), BLOCK_D) tile."""
    return rows[:, None].to(tl.int64) * s_n + offs_d[None, :]


@triton.jit
def _head_offset(s_b, s_h):
    """Element offset of this program's (batch, head), program ids (2, 1), in int64: h * s_h alone
    passes 2^31 when H * N * d does."""
    return tl.program_id(2).to(tl.int64) * s_b + tl.program_id(1).to(tl.int64) * s_h


@triton.jit
def _row_stats_offset(N, H):
    """Offset of this program's (batch, head) rows in a (B, H, N) fp32 row-statistics buffer (int64)."""
    return (tl.program_id(2).to(tl.int64) * H + tl.program_id(1)) * N


@triton.jit
def _ref_row(base, N, offs_d, mask_d, s_n, REF_ROWS: tl.constexpr):
    """fp32 mean of the first min(N, REF_ROWS) rows of an (N, head_dim) matrix: the reference key row."""
    rows = tl.arange(0, REF_ROWS)
    t = _load_rows(base, rows, rows < N, offs_d, mask_d, s_n).to(tl.float32)
    return tl.sum(t, 0) / tl.minimum(N, REF_ROWS).to(tl.float32)


@triton.jit
def _rounded(x, dtype):
    """x cast to the dot's input dtype, and the row sums of the cast values (fp32)."""
    xc = x.to(dtype)
    return xc, tl.sum(xc.to(tl.float32), 1)


@triton.jit
def _main_end(N, BLOCK: tl.constexpr, TAIL: tl.constexpr):
    """End of a sweep's full BLOCK-row trips: N less its remainder when the remainder fits one
    TAIL-row trip (run before them), else N (the last BLOCK-row trip is padded, as with TAIL = 0)."""
    rem = N % BLOCK
    return N - tl.where(rem <= TAIL, rem, 0)


# Tail blocks. At N = 197 = 3 x 64 + 5 a last block of 64 (or 32) rows holds 5 valid ones. Every
# kernel therefore runs its last resident block and its last sweep trip with TAIL (16) rows when
# the remainder fits: each kernel is a `_rows` function instantiated for BLOCK and TAIL resident
# rows, and each sweep is at most one TAIL trip of a `_trip` function, then a `for` over the full
# trips. The tail trip goes first: its operand layouts are dead before the loop's are made (after
# the loop, ptxas kept both live: bwdbwd_q (32, 32, 4 warps) went from 244 registers to 255 and
# 192 bytes of spills). A config with TAIL = 0 has no tail blocks (AUTOTUNE_CONFIGS: where they
# cost spills). tile_blocks() below is the same tiling in Python (bench/attention_work.py counts
# from it).
@triton.jit
def _fwd_trip(q, K, V, q_off, start_n, N, offs_d, mask_d, s_qn, qk_scale, m_i, l_i, acc,
              PREC: tl.constexpr, COLS: tl.constexpr):
    offs_n = start_n + tl.arange(0, COLS)
    mask_n = offs_n < N
    k = _load_rows(K + q_off, offs_n, mask_n, offs_d, mask_d, s_qn)
    v = _load_rows(V + q_off, offs_n, mask_n, offs_d, mask_d, s_qn)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # log2 units
    s = tl.where(mask_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: the first trip (tail or block 0) has a valid key
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_rows(
    Q, K, V, O, LSE, start_m, N, H, s_qb, s_qh, s_qn, s_ob, s_oh, s_on, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL: tl.constexpr,
):
    q_off = _head_offset(s_qb, s_qh)
    o_off = _head_offset(s_ob, s_oh)
    row0 = _row_stats_offset(N, H)
    offs_m = start_m + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_D

    q = _load_rows(Q + q_off, offs_m, mask_m, offs_d, mask_d, s_qn)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    n_main = _main_end(N, BLOCK_N, TAIL)
    if TAIL > 0:
        if n_main < N:
            m_i, l_i, acc = _fwd_trip(q, K, V, q_off, n_main, N, offs_d, mask_d, s_qn, qk_scale, m_i, l_i, acc,
                                      PREC, TAIL)
    for start_n in range(0, n_main, BLOCK_N):
        m_i, l_i, acc = _fwd_trip(q, K, V, q_off, start_n, N, offs_d, mask_d, s_qn, qk_scale, m_i, l_i, acc,
                                  PREC, BLOCK_N)
    acc = acc / l_i[:, None]
    _store_rows(O + o_off, offs_m, mask_m, offs_d, mask_d, s_on, acc)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural-log logsumexp of S
    tl.store(LSE + row0 + offs_m, lse, mask=mask_m)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    N, H, s_qb, s_qh, s_qn, s_ob, s_oh, s_on, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL: tl.constexpr,
):
    tl.static_assert(TAIL < BLOCK_M)
    tl.static_assert(TAIL < BLOCK_N)
    start_m = tl.program_id(0) * BLOCK_M
    if TAIL == 0:  # no tail blocks (configs where they cost spills)
        _attn_fwd_rows(Q, K, V, O, LSE, start_m, N, H, s_qb, s_qh, s_qn, s_ob, s_oh, s_on, qk_scale,
                       HEAD_D, BLOCK_D, PREC, BLOCK_M, BLOCK_N, TAIL)
    elif start_m + TAIL >= N:
        _attn_fwd_rows(Q, K, V, O, LSE, start_m, N, H, s_qb, s_qh, s_qn, s_ob, s_oh, s_on, qk_scale,
                       HEAD_D, BLOCK_D, PREC, TAIL, BLOCK_N, TAIL)
    else:
        _attn_fwd_rows(Q, K, V, O, LSE, start_m, N, H, s_qb, s_qh, s_qn, s_ob, s_oh, s_on, qk_scale,
                       HEAD_D, BLOCK_D, PREC, BLOCK_M, BLOCK_N, TAIL)


@triton.jit
def _bwd_dq_trip(q, do, K, V, q_off, start_n, N, mask_m, offs_d, mask_d, s_qn, lse2, delta, qk_scale, dq, ds_sum,
                 PREC: tl.constexpr, COLS: tl.constexpr):
    offs_n = start_n + tl.arange(0, COLS)
    mask_n = offs_n < N
    k = _load_rows(K + q_off, offs_n, mask_n, offs_d, mask_d, s_qn)
    v = _load_rows(V + q_off, offs_n, mask_n, offs_d, mask_d, s_qn)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    valid = mask_m[:, None] & mask_n[None, :]
    p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds, ds_rows = _rounded(p * (dp - delta[:, None]), k.dtype)
    return tl.dot(ds, k, dq, input_precision=PREC), ds_sum + ds_rows


@triton.jit
def _attn_bwd_dq_rows(
    Q, K, V, O, LSE, DO, DQ, DELTA, start_m,
    N, H, s_qb, s_qh, s_qn, s_gb, s_gh, s_gn, s_ob, s_oh, s_on, qk_scale, scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL: tl.constexpr, REF_ROWS: tl.constexpr,
):
    q_off = _head_offset(s_qb, s_qh)
    g_off = _head_offset(s_gb, s_gh)
    o_off = _head_offset(s_ob, s_oh)
    row0 = _row_stats_offset(N, H)
    offs_m = start_m + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_D

    q = _load_rows(Q + q_off, offs_m, mask_m, offs_d, mask_d, s_qn)
    do = _load_rows(DO + o_off, offs_m, mask_m, offs_d, mask_d, s_on)
    o = _load_rows(O + o_off, offs_m, mask_m, offs_d, mask_d, s_on)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + row0 + offs_m, delta, mask=mask_m)
    lse2 = tl.load(LSE + row0 + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634

    dq = tl.zeros([ROWS, BLOCK_D], tl.float32)
    ds_sum = tl.zeros([ROWS], tl.float32)  # row sums of the rounded dS tiles
    n_main = _main_end(N, BLOCK_N, TAIL)
    if TAIL > 0:
        if n_main < N:
            dq, ds_sum = _bwd_dq_trip(q, do, K, V, q_off, n_main, N, mask_m, offs_d, mask_d, s_qn, lse2, delta,
                                      qk_scale, dq, ds_sum, PREC, TAIL)
    for start_n in range(0, n_main, BLOCK_N):
        dq, ds_sum = _bwd_dq_trip(q, do, K, V, q_off, start_n, N, mask_m, offs_d, mask_d, s_qn, lse2, delta,
                                  qk_scale, dq, ds_sum, PREC, BLOCK_N)
    # dS K = dS (K - k_ref) as rowsum(dS) = 0: a component all keys share cancels here, in fp32,
    # instead of being multiplied with the rounding error of each dS tile.
    k_ref = _ref_row(K + q_off, N, offs_d, mask_d, s_qn, REF_ROWS)  # loaded here: not live in the loop
    dq -= ds_sum[:, None] * k_ref[None, :]
    _store_rows(DQ + g_off, offs_m, mask_m, offs_d, mask_d, s_gn, dq * scale)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, O, LSE, DO, DQ, DELTA,
    N, H, s_qb, s_qh, s_qn, s_gb, s_gh, s_gn, s_ob, s_oh, s_on, qk_scale, scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL: tl.constexpr, REF_ROWS: tl.constexpr,
):
    tl.static_assert(TAIL < BLOCK_M)
    tl.static_assert(TAIL < BLOCK_N)
    start_m = tl.program_id(0) * BLOCK_M
    if TAIL == 0:  # no tail blocks (configs where they cost spills)
        _attn_bwd_dq_rows(Q, K, V, O, LSE, DO, DQ, DELTA, start_m, N, H, s_qb, s_qh, s_qn, s_gb, s_gh, s_gn,
                          s_ob, s_oh, s_on, qk_scale, scale, HEAD_D, BLOCK_D, PREC, BLOCK_M, BLOCK_N, TAIL, REF_ROWS)
    elif start_m + TAIL >= N:
        _attn_bwd_dq_rows(Q, K, V, O, LSE, DO, DQ, DELTA, start_m, N, H, s_qb, s_qh, s_qn, s_gb, s_gh, s_gn,
                          s_ob, s_oh, s_on, qk_scale, scale, HEAD_D, BLOCK_D, PREC, TAIL, BLOCK_N, TAIL, REF_ROWS)
    else:
        _attn_bwd_dq_rows(Q, K, V, O, LSE, DO, DQ, DELTA, start_m, N, H, s_qb, s_qh, s_qn, s_gb, s_gh, s_gn,
                          s_ob, s_oh, s_on, qk_scale, scale, HEAD_D, BLOCK_D, PREC, BLOCK_M, BLOCK_N, TAIL, REF_ROWS)


@triton.jit
def _bwd_dkdv_trip(k, v, Q, DO, LSE, DELTA, q_off, o_off, row0, start_m, N, mask_n, offs_d, mask_d, s_qn, s_on,
                   qk_scale, dk, dv, PREC: tl.constexpr, COLS: tl.constexpr):
    offs_m = start_m + tl.arange(0, COLS)
    mask_m = offs_m < N
    q = _load_rows(Q + q_off, offs_m, mask_m, offs_d, mask_d, s_qn)
    do = _load_rows(DO + o_off, offs_m, mask_m, offs_d, mask_d, s_on)
    lse2 = tl.load(LSE + row0 + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row0 + offs_m, mask=mask_m, other=0.0)
    # transposed tiles: rows are keys (this program's block), columns are queries
    st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
    valid = mask_n[:, None] & mask_m[None, :]
    pt = tl.where(valid, tl.exp2(st - lse2[None, :]), 0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_rows(
    Q, K, V, LSE, DO, DELTA, DK, DV, start_n,
    N, H, s_qb, s_qh, s_qn, s_gb, s_gh, s_gn, s_ob, s_oh, s_on, qk_scale, scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, ROWS: tl.constexpr, TAIL: tl.constexpr,
):
    q_off = _head_offset(s_qb, s_qh)
    g_off = _head_offset(s_gb, s_gh)
    o_off = _head_offset(s_ob, s_oh)
    row0 = _row_stats_offset(N, H)
    offs_n = start_n + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < HEAD_D

    k = _load_rows(K + q_off, offs_n, mask_n, offs_d, mask_d, s_qn)
    v = _load_rows(V + q_off, offs_n, mask_n, offs_d, mask_d, s_qn)
    dk = tl.zeros([ROWS, BLOCK_D], tl.float32)
    dv = tl.zeros([ROWS, BLOCK_D], tl.float32)
    m_main = _main_end(N, BLOCK_M, TAIL)
    if TAIL > 0:
        if m_main < N:
            dk, dv = _bwd_dkdv_trip(k, v, Q, DO, LSE, DELTA, q_off, o_off, row0, m_main, N, mask_n, offs_d, mask_d,
                                    s_qn, s_on, qk_scale, dk, dv, PREC, TAIL)
    for start_m in range(0, m_main, BLOCK_M):
        dk, dv = _bwd_dkdv_trip(k, v, Q, DO, LSE, DELTA, q_off, o_off, row0, start_m, N, mask_n, offs_d, mask_d,
                                s_qn, s_on, qk_scale, dk, dv, PREC, BLOCK_M)
    _store_rows(DK + g_off, offs_n, mask_n, offs_d, mask_d, s_gn, dk * scale)
    _store_rows(DV + g_off, offs_n, mask_n, offs_d, mask_d, s_gn, dv)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, LSE, DO, DELTA, DK, DV,
    N, H, s_qb, s_qh, s_qn, s_gb, s_gh, s_gn, s_ob, s_oh, s_on, qk_scale, scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL: tl.constexpr,
):
    tl.static_assert(TAIL < BLOCK_M)
    tl.static_assert(TAIL < BLOCK_N)
    start_n = tl.program_id(0) * BLOCK_N
    if TAIL == 0:  # no tail blocks (configs where they cost spills)
        _attn_bwd_dkdv_rows(Q, K, V, LSE, DO, DELTA, DK, DV, start_n, N, H, s_qb, s_qh, s_qn, s_gb, s_gh, s_gn,
                            s_ob, s_oh, s_on, qk_scale, scale, HEAD_D, BLOCK_D, PREC, BLOCK_M, BLOCK_N, TAIL)
    elif start_n + TAIL >= N:
        _attn_bwd_dkdv_rows(Q, K, V, LSE, DO, DELTA, DK, DV, start_n, N, H, s_qb, s_qh, s_qn, s_gb, s_gh, s_gn,
                            s_ob, s_oh, s_on, qk_scale, scale, HEAD_D, BLOCK_D, PREC, BLOCK_M, TAIL, TAIL)
    else:
        _attn_bwd_dkdv_rows(Q, K, V, LSE, DO, DELTA, DK, DV, start_n, N, H, s_qb, s_qh, s_qn, s_gb, s_gh, s_gn,
                            s_ob, s_oh, s_on, qk_scale, scale, HEAD_D, BLOCK_D, PREC, BLOCK_M, BLOCK_N, TAIL)


@triton.jit
def _bwdbwd_q_tile(q, do, gdq, K, V, GDK, GDV, q_off, g_off, start_n, N, offs_d, mask_d, s_qn, s_gn,
                   lse2, mask_m, r, qk_scale, scale, PREC: tl.constexpr, COLS: tl.constexpr):
    """One key tile seen from a query block: k, gdk, v, gdv and P, dP, G - r, H (fp32 tiles)."""
    offs_n = start_n + tl.arange(0, COLS)
    mask_n = offs_n < N
    k = _load_rows(K + q_off, offs_n, mask_n, offs_d, mask_d, s_qn)
    v = _load_rows(V + q_off, offs_n, mask_n, offs_d, mask_d, s_qn)
    gdk = _load_rows(GDK + g_off, offs_n, mask_n, offs_d, mask_d, s_gn)
    gdv = _load_rows(GDV + g_off, offs_n, mask_n, offs_d, mask_d, s_gn)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    p = tl.where(mask_m[:, None] & mask_n[None, :], tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    g = tl.dot(q, tl.trans(gdk), tl.dot(gdq, tl.trans(k), input_precision=PREC), input_precision=PREC) * scale
    h = tl.dot(do, tl.trans(gdv), input_precision=PREC)
    return k, v, gdk, gdv, p, dp, g - r[:, None], h


@triton.jit
def _bwdbwd_q_stats_trip(q, do, gdq, K, V, GDK, GDV, q_off, g_off, start_n, N, offs_d, mask_d, s_qn, s_gn,
                         lse2, mask_m, r, delta, qk_scale, scale, c_i, e0_i, PREC: tl.constexpr, COLS: tl.constexpr):
    """Two-sweep variant, sweep 1: the row sums C - r and E0 of one key tile."""
    k, v, gdk, gdv, p, dp, g, h_ = _bwdbwd_q_tile(q, do, gdq, K, V, GDK, GDV, q_off, g_off, start_n, N, offs_d,
                                                  mask_d, s_qn, s_gn, lse2, mask_m, r, qk_scale, scale, PREC, COLS)
    return c_i + tl.sum(p * g, 1), e0_i + tl.sum(p * (g * (dp - delta[:, None]) + h_), 1)


@triton.jit
def _bwdbwd_q_direct_trip(q, do, gdq, K, V, GDK, GDV, q_off, g_off, start_n, N, offs_d, mask_d, s_qn, s_gn,
                          lse2, mask_m, r, delta, qk_scale, scale, c_i, e0_i, acc_q, k_sum, acc_do,
                          PREC: tl.constexpr, COLS: tl.constexpr):
    """Two-sweep variant, sweep 2: dS2 and Z of one key tile from the finished C, E0."""
    k, v, gdk, gdv, p, dp, g, h_ = _bwdbwd_q_tile(q, do, gdq, K, V, GDK, GDV, q_off, g_off, start_n, N, offs_d,
                                                  mask_d, s_qn, s_gn, lse2, mask_m, r, qk_scale, scale, PREC, COLS)
    dpd = dp - delta[:, None]
    gc = g - c_i[:, None]                            # G - C
    ds2, ds2_rows = _rounded(p * (gc * dpd + h_ - e0_i[:, None]), k.dtype)
    acc_q = tl.dot((p * dpd).to(k.dtype), gdk, acc_q, input_precision=PREC)
    acc_q = tl.dot(ds2, k, acc_q, input_precision=PREC)
    acc_do = tl.dot(p.to(v.dtype), gdv, acc_do, input_precision=PREC)
    acc_do = tl.dot((p * gc).to(v.dtype), v, acc_do, input_precision=PREC)  # Z V
    return acc_q, k_sum + ds2_rows, acc_do


@triton.jit
def _bwdbwd_q_split_trip(q, do, gdq, K, V, GDK, GDV, q_off, g_off, start_n, N, offs_d, mask_d, s_qn, s_gn,
                         lse2, mask_m, r, delta, qk_scale, scale,
                         c_i, e0_i, acc_q, acc_dsk, acc_pk, acc_do, pw0_sum, ds_sum, p_sum,
                         PREC: tl.constexpr, COLS: tl.constexpr):
    """One-sweep variant: one key tile into the linear split's accumulators and row sums."""
    k, v, gdk, gdv, p, dp, g, h_ = _bwdbwd_q_tile(q, do, gdq, K, V, GDK, GDV, q_off, g_off, start_n, N, offs_d,
                                                  mask_d, s_qn, s_gn, lse2, mask_m, r, qk_scale, scale, PREC, COLS)
    dpd = dp - delta[:, None]
    pg = p * g
    pw0 = p * (g * dpd + h_)
    c_i += tl.sum(pg, 1)
    e0_i += tl.sum(pw0, 1)
    ds, ds_rows = _rounded(p * dpd, k.dtype)
    pw0, pw0_rows = _rounded(pw0, k.dtype)
    pc, p_rows = _rounded(p, k.dtype)
    acc_q = tl.dot(ds, gdk, acc_q, input_precision=PREC)
    acc_q = tl.dot(pw0, k, acc_q, input_precision=PREC)
    acc_dsk = tl.dot(ds, k, acc_dsk, input_precision=PREC)
    acc_pk = tl.dot(pc, k, acc_pk, input_precision=PREC)
    acc_do = tl.dot(pc, gdv, acc_do, input_precision=PREC)
    acc_do = tl.dot(pg.to(v.dtype), v, acc_do, input_precision=PREC)
    return (c_i, e0_i, acc_q, acc_dsk, acc_pk, acc_do,
            pw0_sum + pw0_rows, ds_sum + ds_rows, p_sum + p_rows)


@triton.jit
def _attn_bwdbwd_q_rows(
    Q, K, V, O, LSE, DO, GDQ, GDK, GDV, GQ, GDO, STATS, start_m,
    N, H, s_qb, s_qh, s_qn, s_gb, s_gh, s_gn, s_ob, s_oh, s_on, qk_scale, scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL: tl.constexpr, REF_ROWS: tl.constexpr,
    TWO_SWEEP: tl.constexpr,
):
    q_off = _head_offset(s_qb, s_qh)
    g_off = _head_offset(s_gb, s_gh)
    o_off = _head_offset(s_ob, s_oh)
    row0 = _row_stats_offset(N, H)
    offs_m = start_m + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_D

    q = _load_rows(Q + q_off, offs_m, mask_m, offs_d, mask_d, s_qn)
    do = _load_rows(DO + o_off, offs_m, mask_m, offs_d, mask_d, s_on)
    gdq = _load_rows(GDQ + g_off, offs_m, mask_m, offs_d, mask_d, s_gn)
    o = _load_rows(O + o_off, offs_m, mask_m, offs_d, mask_d, s_on)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse2 = tl.load(LSE + row0 + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    # r = G at the reference key row: scale * (gdq . k_ref + q . gdk_ref)
    r = tl.sum(gdq.to(tl.float32) * _ref_row(K + q_off, N, offs_d, mask_d, s_qn, REF_ROWS)[None, :]
               + q.to(tl.float32) * _ref_row(GDK + g_off, N, offs_d, mask_d, s_gn, REF_ROWS)[None, :], 1) * scale

    c_i = tl.zeros([ROWS], tl.float32)    # rowsum(P * (G - r)) = C - r
    e0_i = tl.zeros([ROWS], tl.float32)   # E0 = rowsum(P * ((G - r) * (dP - D) + H))
    acc_do = tl.zeros([ROWS, BLOCK_D], tl.float32)
    n_main = _main_end(N, BLOCK_N, TAIL)
    if TWO_SWEEP:
        if TAIL > 0:
            if n_main < N:
                c_i, e0_i = _bwdbwd_q_stats_trip(q, do, gdq, K, V, GDK, GDV, q_off, g_off, n_main, N, offs_d, mask_d,
                                                 s_qn, s_gn, lse2, mask_m, r, delta, qk_scale, scale, c_i, e0_i,
                                                 PREC, TAIL)
        for start_n in range(0, n_main, BLOCK_N):
            c_i, e0_i = _bwdbwd_q_stats_trip(q, do, gdq, K, V, GDK, GDV, q_off, g_off, start_n, N, offs_d, mask_d,
                                             s_qn, s_gn, lse2, mask_m, r, delta, qk_scale, scale, c_i, e0_i,
                                             PREC, BLOCK_N)
        acc_q = tl.zeros([ROWS, BLOCK_D], tl.float32)  # dS gdK + dS2 K
        k_sum = tl.zeros([ROWS], tl.float32)           # rowsum of the rounded dS2 tiles
        if TAIL > 0:
            if n_main < N:
                acc_q, k_sum, acc_do = _bwdbwd_q_direct_trip(
                    q, do, gdq, K, V, GDK, GDV, q_off, g_off, n_main, N, offs_d, mask_d, s_qn, s_gn, lse2, mask_m, r,
                    delta, qk_scale, scale, c_i, e0_i, acc_q, k_sum, acc_do, PREC, TAIL)
        for start_n in range(0, n_main, BLOCK_N):
            acc_q, k_sum, acc_do = _bwdbwd_q_direct_trip(
                q, do, gdq, K, V, GDK, GDV, q_off, g_off, start_n, N, offs_d, mask_d, s_qn, s_gn, lse2, mask_m, r,
                delta, qk_scale, scale, c_i, e0_i, acc_q, k_sum, acc_do, PREC, BLOCK_N)
        k_ref = _ref_row(K + q_off, N, offs_d, mask_d, s_qn, REF_ROWS)  # reloaded: not live in the loops
        gq = (acc_q - k_sum[:, None] * k_ref[None, :]) * scale
        gdo = acc_do
    else:
        acc_q = tl.zeros([ROWS, BLOCK_D], tl.float32)    # dS gdK + (P*W0) K
        acc_dsk = tl.zeros([ROWS, BLOCK_D], tl.float32)  # dS K
        acc_pk = tl.zeros([ROWS, BLOCK_D], tl.float32)   # P K
        pw0_sum = tl.zeros([ROWS], tl.float32)           # row sums of the rounded P*W0, dS, P tiles
        ds_sum = tl.zeros([ROWS], tl.float32)
        p_sum = tl.zeros([ROWS], tl.float32)
        if TAIL > 0:
            if n_main < N:
                c_i, e0_i, acc_q, acc_dsk, acc_pk, acc_do, pw0_sum, ds_sum, p_sum = _bwdbwd_q_split_trip(
                    q, do, gdq, K, V, GDK, GDV, q_off, g_off, n_main, N, offs_d, mask_d, s_qn, s_gn, lse2, mask_m, r,
                    delta, qk_scale, scale, c_i, e0_i, acc_q, acc_dsk, acc_pk, acc_do, pw0_sum, ds_sum, p_sum,
                    PREC, TAIL)
        for start_n in range(0, n_main, BLOCK_N):
            c_i, e0_i, acc_q, acc_dsk, acc_pk, acc_do, pw0_sum, ds_sum, p_sum = _bwdbwd_q_split_trip(
                q, do, gdq, K, V, GDK, GDV, q_off, g_off, start_n, N, offs_d, mask_d, s_qn, s_gn, lse2, mask_m, r,
                delta, qk_scale, scale, c_i, e0_i, acc_q, acc_dsk, acc_pk, acc_do, pw0_sum, ds_sum, p_sum,
                PREC, BLOCK_N)
        # dS2 = P*W0 - (C - r) dS - E0 P per element, so dS2 K = (P*W0) K - (C - r)(dS K) - E0 (P K)
        k_sum = pw0_sum - c_i * ds_sum - e0_i * p_sum
        k_ref = _ref_row(K + q_off, N, offs_d, mask_d, s_qn, REF_ROWS)
        gq = (acc_q - c_i[:, None] * acc_dsk - e0_i[:, None] * acc_pk - k_sum[:, None] * k_ref[None, :]) * scale
        # o is loaded again rather than kept live across the sweep (a [ROWS, d] tile of registers)
        o = _load_rows(O + o_off, offs_m, mask_m, offs_d, mask_d, s_on).to(tl.float32)
        gdo = acc_do - c_i[:, None] * o   # Z V = (P*(G - r)) V - (C - r) O
    _store_rows(GQ + g_off, offs_m, mask_m, offs_d, mask_d, s_gn, gq)
    _store_rows(GDO + o_off, offs_m, mask_m, offs_d, mask_d, s_on, gdo)
    # STATS is (3, B*H, N) fp32: D, C, E0
    zn = tl.num_programs(2).to(tl.int64) * H * N
    tl.store(STATS + row0 + offs_m, delta, mask=mask_m)
    tl.store(STATS + zn + row0 + offs_m, c_i + r, mask=mask_m)
    tl.store(STATS + 2 * zn + row0 + offs_m, e0_i, mask=mask_m)


@triton.jit
def _attn_bwdbwd_q_kernel(
    Q, K, V, O, LSE, DO, GDQ, GDK, GDV, GQ, GDO, STATS,
    N, H, s_qb, s_qh, s_qn, s_gb, s_gh, s_gn, s_ob, s_oh, s_on, qk_scale, scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL: tl.constexpr, REF_ROWS: tl.constexpr,
    TWO_SWEEP: tl.constexpr,
):
    """Query side of bwd-of-bwd: gQ, gdO and the row statistics D, C, E0.

    TWO_SWEEP=False: one sweep over the keys with four [BLOCK_M, d] fp32 accumulators (gQ by the
    linear split). TWO_SWEEP=True: sweep 1 accumulates the row statistics, sweep 2 forms dS2 and
    Z with the finished statistics and accumulates gQ and gdO: 14 instead of 11 tile matmuls per
    key tile, but two live accumulators instead of four, which is what lets BLOCK_M = 64/128 tiles
    (Hopper wgmma) fit in registers.

    Cancellation: G is used shifted by a row constant r (its value at the reference key row), which
    changes none of the results (only G - C enters) but keeps a large component that every key
    shares out of the sums; and every dot with K is corrected by the row sums of its rounded left
    tile times the reference key row (see _attn_bwd_dq_rows). docs/kernels.md has the derivation.
    """
    tl.static_assert(TAIL < BLOCK_M)
    tl.static_assert(TAIL < BLOCK_N)
    start_m = tl.program_id(0) * BLOCK_M
    if TAIL == 0:  # no tail blocks (configs where they cost spills)
        _attn_bwdbwd_q_rows(Q, K, V, O, LSE, DO, GDQ, GDK, GDV, GQ, GDO, STATS, start_m, N, H, s_qb, s_qh, s_qn,
                            s_gb, s_gh, s_gn, s_ob, s_oh, s_on, qk_scale, scale, HEAD_D, BLOCK_D, PREC,
                            BLOCK_M, BLOCK_N, TAIL, REF_ROWS, TWO_SWEEP)
    elif start_m + TAIL >= N:
        _attn_bwdbwd_q_rows(Q, K, V, O, LSE, DO, GDQ, GDK, GDV, GQ, GDO, STATS, start_m, N, H, s_qb, s_qh, s_qn,
                            s_gb, s_gh, s_gn, s_ob, s_oh, s_on, qk_scale, scale, HEAD_D, BLOCK_D, PREC,
                            TAIL, BLOCK_N, TAIL, REF_ROWS, TWO_SWEEP)
    else:
        _attn_bwdbwd_q_rows(Q, K, V, O, LSE, DO, GDQ, GDK, GDV, GQ, GDO, STATS, start_m, N, H, s_qb, s_qh, s_qn,
                            s_gb, s_gh, s_gn, s_ob, s_oh, s_on, qk_scale, scale, HEAD_D, BLOCK_D, PREC,
                            BLOCK_M, BLOCK_N, TAIL, REF_ROWS, TWO_SWEEP)


@triton.jit
def _bwdbwd_kv_trip(k, v, gdk, gdv, Q, DO, GDQ, LSE, STATS, q_off, g_off, o_off, row0, zn, start_m, N, mask_n,
                    offs_d, mask_d, s_qn, s_gn, s_on, qk_scale, scale, acc_k, acc_v,
                    PREC: tl.constexpr, COLS: tl.constexpr):
    offs_m = start_m + tl.arange(0, COLS)
    mask_m = offs_m < N
    q = _load_rows(Q + q_off, offs_m, mask_m, offs_d, mask_d, s_qn)
    do = _load_rows(DO + o_off, offs_m, mask_m, offs_d, mask_d, s_on)
    gdq = _load_rows(GDQ + g_off, offs_m, mask_m, offs_d, mask_d, s_gn)
    row = row0 + offs_m
    lse2 = tl.load(LSE + row, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(STATS + row, mask=mask_m, other=0.0)
    c_i = tl.load(STATS + zn + row, mask=mask_m, other=0.0)
    e0_i = tl.load(STATS + 2 * zn + row, mask=mask_m, other=0.0)
    # transposed tiles: rows are keys, columns are queries
    st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
    valid = mask_n[:, None] & mask_m[None, :]
    pt = tl.where(valid, tl.exp2(st - lse2[None, :]), 0.0)
    dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
    gt = tl.dot(gdk, tl.trans(q), tl.dot(k, tl.trans(gdq), input_precision=PREC),
                input_precision=PREC) * scale
    ht = tl.dot(gdv, tl.trans(do), input_precision=PREC)
    dpd = dpt - delta[None, :]
    gc = gt - c_i[None, :]  # G - C per element: a row constant of G cancels here, in fp32
    ds2t = pt * (gc * dpd + ht - e0_i[None, :])
    acc_k = tl.dot((pt * dpd).to(q.dtype), gdq, acc_k, input_precision=PREC)
    acc_k = tl.dot(ds2t.to(q.dtype), q, acc_k, input_precision=PREC)
    acc_v = tl.dot((pt * gc).to(do.dtype), do, acc_v, input_precision=PREC)
    return acc_k, acc_v


@triton.jit
def _attn_bwdbwd_kv_rows(
    Q, K, V, LSE, DO, GDQ, GDK, GDV, STATS, GK, GV, start_n,
    N, H, s_qb, s_qh, s_qn, s_gb, s_gh, s_gn, s_ob, s_oh, s_on, qk_scale, scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, ROWS: tl.constexpr, TAIL: tl.constexpr,
):
    q_off = _head_offset(s_qb, s_qh)
    g_off = _head_offset(s_gb, s_gh)
    o_off = _head_offset(s_ob, s_oh)
    row0 = _row_stats_offset(N, H)
    offs_n = start_n + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < HEAD_D
    zn = tl.num_programs(2).to(tl.int64) * H * N

    k = _load_rows(K + q_off, offs_n, mask_n, offs_d, mask_d, s_qn)
    v = _load_rows(V + q_off, offs_n, mask_n, offs_d, mask_d, s_qn)
    gdk = _load_rows(GDK + g_off, offs_n, mask_n, offs_d, mask_d, s_gn)
    gdv = _load_rows(GDV + g_off, offs_n, mask_n, offs_d, mask_d, s_gn)
    acc_k = tl.zeros([ROWS, BLOCK_D], tl.float32)
    acc_v = tl.zeros([ROWS, BLOCK_D], tl.float32)
    m_main = _main_end(N, BLOCK_M, TAIL)
    if TAIL > 0:
        if m_main < N:
            acc_k, acc_v = _bwdbwd_kv_trip(k, v, gdk, gdv, Q, DO, GDQ, LSE, STATS, q_off, g_off, o_off, row0, zn, m_main,
                                           N, mask_n, offs_d, mask_d, s_qn, s_gn, s_on, qk_scale, scale, acc_k, acc_v,
                                           PREC, TAIL)
    for start_m in range(0, m_main, BLOCK_M):
        acc_k, acc_v = _bwdbwd_kv_trip(k, v, gdk, gdv, Q, DO, GDQ, LSE, STATS, q_off, g_off, o_off, row0, zn, start_m,
                                       N, mask_n, offs_d, mask_d, s_qn, s_gn, s_on, qk_scale, scale, acc_k, acc_v,
                                       PREC, BLOCK_M)
    _store_rows(GK + g_off, offs_n, mask_n, offs_d, mask_d, s_gn, acc_k * scale)
    _store_rows(GV + g_off, offs_n, mask_n, offs_d, mask_d, s_gn, acc_v)


@triton.jit
def _attn_bwdbwd_kv_kernel(
    Q, K, V, LSE, DO, GDQ, GDK, GDV, STATS, GK, GV,
    N, H, s_qb, s_qh, s_qn, s_gb, s_gh, s_gn, s_ob, s_oh, s_on, qk_scale, scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL: tl.constexpr,
):
    """Key side of bwd-of-bwd: gK, gV (needs the finished row statistics D, C, E0)."""
    tl.static_assert(TAIL < BLOCK_M)
    tl.static_assert(TAIL < BLOCK_N)
    start_n = tl.program_id(0) * BLOCK_N
    if TAIL == 0:  # no tail blocks (configs where they cost spills)
        _attn_bwdbwd_kv_rows(Q, K, V, LSE, DO, GDQ, GDK, GDV, STATS, GK, GV, start_n, N, H, s_qb, s_qh, s_qn,
                             s_gb, s_gh, s_gn, s_ob, s_oh, s_on, qk_scale, scale, HEAD_D, BLOCK_D, PREC,
                             BLOCK_M, BLOCK_N, TAIL)
    elif start_n + TAIL >= N:
        _attn_bwdbwd_kv_rows(Q, K, V, LSE, DO, GDQ, GDK, GDV, STATS, GK, GV, start_n, N, H, s_qb, s_qh, s_qn,
                             s_gb, s_gh, s_gn, s_ob, s_oh, s_on, qk_scale, scale, HEAD_D, BLOCK_D, PREC,
                             BLOCK_M, TAIL, TAIL)
    else:
        _attn_bwdbwd_kv_rows(Q, K, V, LSE, DO, GDQ, GDK, GDV, STATS, GK, GV, start_n, N, H, s_qb, s_qh, s_qn,
                             s_gb, s_gh, s_gn, s_ob, s_oh, s_on, qk_scale, scale, HEAD_D, BLOCK_D, PREC,
                             BLOCK_M, BLOCK_N, TAIL)


# --------------------------------------------------------------------------------------------
# Block configs: fixed under the interpreter, an autotune set on GPU
# --------------------------------------------------------------------------------------------
#: kernel name -> its @triton.jit function's attribute name (bench/ptxas_report.py compiles these)
KERNEL_FUNCTIONS = {
    "fwd": "_attn_fwd_kernel",
    "bwd_dq": "_attn_bwd_dq_kernel",
    "bwd_dkdv": "_attn_bwd_dkdv_kernel",
    "bwdbwd_q": "_attn_bwdbwd_q_kernel",
    "bwdbwd_kv": "_attn_bwdbwd_kv_kernel",
}
#: GPU autotune sets, (BLOCK_M, BLOCK_N, num_warps, num_stages[, variant constexprs]). BLOCK_M
#: counts queries and BLOCK_N keys; the resident block of a program (BLOCK_M on the query side,
#: BLOCK_N on the key side) is the M dimension of its matmuls, and Hopper's warpgroup MMA (wgmma)
#: needs it >= 64. Picked from ahead-of-time sm_90a builds (bench/ptxas_report.py, table in
#: docs/kernels.md): at bf16, head_dim 64 each kernel has configs with a resident block >= 64 on
#: wgmma without spills, and keeps the configs the H200 chose before (32-row blocks on mma.sync).
#: At N = 197 (ViT-B/16) blocks of 64/128 pad to 256 rows (23% padding), 32 to 224 (12%): larger
#: blocks waste more there, but only they get wgmma and fewer K/V re-reads, so the sets mix a
#: resident 64/128 with a swept 32 (padding 224) and the GPU's autotuner decides.
AUTOTUNE_CONFIGS = {
    "fwd": [(64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 4, 2)],
    "bwd_dq": [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2)],
    "bwd_dkdv": [(32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2)],
    "bwdbwd_q": [(32, 32, 4, 1), (32, 32, 4, 2), (32, 64, 8, 2), (64, 32, 8, 2)]
    + [(m, n, w, s, {"TWO_SWEEP": True}) for m, n, w, s in ((64, 32, 4, 2), (64, 32, 8, 2))]
    # without tail blocks: with them this one spills (8 bytes at head_dim 64, sm_90a)
    + [(128, 32, 8, 2, {"TWO_SWEEP": True, "TAIL": 0})],
    "bwdbwd_kv": [(32, 32, 4, 2), (32, 64, 4, 1), (32, 64, 4, 2), (32, 128, 8, 1)],
}
#: One config per kernel and head-dim class (BLOCK_D <= 64, or 128) for deterministic mode and for
#: a CUDA-graph capture of a shape that was never tuned. Not timed: chosen from the static sm_90a
#: report (bench/ptxas_report.py, docs/kernels.md) among configs without spills at bf16, head_dim 64
#: (resp. the fewest spills at 80), preferring the H200 autotuner's picks of 2026-11-29. The same
#: table serves every device (a launch key's capability only separates tuned choices).
PINNED_CONFIGS = {
    "fwd": {64: (64, 64, 4, 3), 128: (64, 32, 4, 3)},
    "bwd_dq": {64: (64, 64, 4, 2), 128: (64, 32, 4, 2)},
    "bwd_dkdv": {64: (32, 64, 4, 2), 128: (32, 128, 8, 2)},
    "bwdbwd_q": {64: (32, 32, 4, 1), 128: (32, 64, 8, 2)},
    "bwdbwd_kv": {64: (32, 64, 4, 1), 128: (32, 32, 4, 2)},
}
#: Deterministic mode (see kernels/config_choice.py): pinned configs, nothing timed. Read from
#: ENERGYVIT_DETERMINISTIC at import; may be set here at run time.
DETERMINISTIC: bool = deterministic_from_env()


def tile_blocks(n: int, block: int, tail: int = TAIL_ROWS) -> list:
    """How the kernels tile a length-n dimension with blocks of `block` rows, as (rows computed,
    rows valid) per block: the resident blocks of a grid and the trips of a sweep alike
    (bench/attention_work.py counts the executed work from this). The last block runs with
    `tail` rows when its valid rows fit (the kernels' `_rows` / `_trip` instances for TAIL; a
    config's TAIL, config_meta)."""
    out = []
    for start in range(0, n, block):
        valid = min(block, n - start)
        out.append((tail if valid <= tail else block, valid))
    return out


def pinned_config(name: str, head_dim: int) -> tuple:
    return PINNED_CONFIGS[name][64 if head_dim <= 64 else 128]


def config_meta(name: str, cfg: tuple) -> dict:
    """The constexprs one autotune config sets (block sizes, the tail block, and the variant where a
    kernel has one)."""
    extra = cfg[4] if len(cfg) > 4 else {}
    return {"BLOCK_M": cfg[0], "BLOCK_N": cfg[1], "TAIL": TAIL_ROWS, **VARIANT_DEFAULTS.get(name, {}), **extra}


def _meta(name: str) -> dict:
    """Constexprs of the interpreter's fixed config (the tests flip VARIANT_DEFAULTS to cover variants)."""
    return {**INTERPRET_BLOCKS, "TAIL": TAIL_ROWS, **VARIANT_DEFAULTS.get(name, {})}


def _config_failures() -> tuple:
    """Exceptions that rule a config out while timing (as triton's own autotuner treats them)."""
    from triton.runtime import errors

    names = ("OutOfResources", "PTXASError")
    found = tuple(getattr(errors, n) for n in names if hasattr(errors, n))
    try:
        from triton.compiler.errors import CompileTimeAssertionFailure
        found += (CompileTimeAssertionFailure,)
    except ImportError:  # pragma: no cover - older triton
        pass
    return found


class _Launcher:
    """``kernel[grid, key](*args, **constexprs)``: launch one jit kernel with the config its
    ConfigChooser picks for the LaunchKey ``key`` (GPU), or with the interpreter's fixed config."""

    def __init__(self, name: str):
        self.name = name
        self.fn = globals()[KERNEL_FUNCTIONS[name]]
        self.chooser = ConfigChooser(name, AUTOTUNE_CONFIGS[name], lambda d, n=name: pinned_config(n, d))
        self.best_config = None  # the last launch's config (bench/gpu_check.py reports it)
        self._kwargs: dict = {}  # id(config) -> (config, launch kwargs): built once per config

    def __getitem__(self, grid_key):
        grid, key = grid_key
        return lambda *args, **kw: self._launch(grid, key, args, kw)

    def _launch(self, grid, key, args, kw):
        if INTERPRET:
            meta = _meta(self.name)
        else:
            cfg = None if DETERMINISTIC else self.chooser.cache.get(key)  # the common case, inlined
            if cfg is None:
                cfg = self.chooser.choose(key, DETERMINISTIC, torch.cuda.is_current_stream_capturing,
                                          lambda c: self._time(grid, args, kw, c))
            self.best_config = cfg
            meta = self._kwargs.get(id(cfg))
            if meta is None or meta[0] is not cfg:  # (cfg, kwargs) kept: the id stays cfg's
                meta = self._kwargs[id(cfg)] = (cfg, {**config_meta(self.name, cfg), "num_warps": cfg[2],
                                                      "num_stages": cfg[3]})
            meta = meta[1]
        self.fn[grid(meta)](*args, **kw, **meta)

    def _time(self, grid, args, kw, cfg) -> float:
        """Median ms of one config. Every output is fully rewritten by each launch (no atomics, no
        accumulation into outputs), so repeated launches need no restore."""
        from triton.testing import do_bench

        meta = config_meta(self.name, cfg)
        try:
            return do_bench(
                lambda: self.fn[grid(meta)](*args, **kw, **meta, num_warps=cfg[2], num_stages=cfg[3]),
                warmup=5, rep=25)
        except _config_failures():
            return float("inf")


_fwd = _Launcher("fwd")
_bwd_dq = _Launcher("bwd_dq")
_bwd_dkdv = _Launcher("bwd_dkdv")
_bwdbwd_q = _Launcher("bwdbwd_q")
_bwdbwd_kv = _Launcher("bwdbwd_kv")
LAUNCHERS = {"fwd": _fwd, "bwd_dq": _bwd_dq, "bwd_dkdv": _bwd_dkdv, "bwdbwd_q": _bwdbwd_q, "bwdbwd_kv": _bwdbwd_kv}


def save_tuned_configs(path: str) -> None:
    """Write the configs tuned so far (every kernel, every launch key) to a JSON file."""
    config_choice.save({n: launcher.chooser for n, launcher in LAUNCHERS.items()}, path)


def load_tuned_configs(path: str) -> None:
    """Use the configs of a file written by save_tuned_configs for its keys, without timing:
    runs that load one file launch the same configs (bit-identical results on the same device)."""
    config_choice.load({n: launcher.chooser for n, launcher in LAUNCHERS.items()}, path)


_CAPABILITY: dict = {}


def _capability(index: int) -> tuple:
    cap = _CAPABILITY.get(index)
    if cap is None:
        cap = _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return cap


def _launch_key(t: torch.Tensor, b: int, h: int, n: int, d: int, *strides: tuple) -> LaunchKey | None:
    """What changes the best config (kernels/config_choice.py); None under the interpreter. The
    strides are the launchers' (batch, head, row) tuples."""
    if INTERPRET:
        return None
    return LaunchKey(_capability(t.get_device()), str(t.dtype), b, h, n, d, strides)


# --------------------------------------------------------------------------------------------
# Validation (once per call of a public entry point; the custom ops trust their inputs)
# --------------------------------------------------------------------------------------------
def _check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu":
        if not INTERPRET:
            raise ValueError(
                f"{name} is a CPU tensor but the Triton interpreter is off: set TRITON_INTERPRET=1 "
                "before triton is imported to run the fused attention kernels on CPU, or use CUDA tensors"
            )
        return
    raise ValueError(f"{name} is on device {t.device}; fused attention supports CUDA (or CPU with TRITON_INTERPRET=1)")


def _check_dtype_device(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {t.dtype}; fused attention supports float32, float16, bfloat16")
    _check_device(t, name)
    if t.dtype == torch.bfloat16 and t.device.type == "cpu":
        raise TypeError(
            "bfloat16 is not supported under the Triton interpreter (bf16 tl.dot is wrong there, "
            "triton#11584); use float32/float16 on CPU or run on CUDA"
        )


def _check_sizes(b: int, h: int, n: int, d: int, shape) -> None:
    if b * h == 0 or n == 0:
        raise ValueError(f"empty attention input of shape {tuple(shape)}: batch*heads and N must be >= 1")
    if b > MAX_GRID_YZ or h > MAX_GRID_YZ:
        raise ValueError(f"batch {b} or heads {h} exceeds the grid limit {MAX_GRID_YZ}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"unsupported head_dim {d}; fused attention supports 1 <= head_dim <= {MAX_HEAD_DIM}")


def _check_scale(scale) -> None:
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise TypeError(f"scale must be a finite Python float, got {scale!r}")


def validate_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale=None) -> None:
    """Raise one clear ValueError/TypeError if (q, k, v, scale) cannot go to the kernels."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.ndim != 4:
        raise ValueError(f"q must be 4-D (batch, heads, N, head_dim), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"{name} shape {tuple(t.shape)} does not match q shape {tuple(q.shape)}; "
                "fused attention needs q, k, v of identical shape (batch, heads, N, head_dim)"
            )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match q dtype {q.dtype}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {q.dtype}; fused attention supports float32, float16, bfloat16")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must share one device")
    _check_dtype_device(q, "q")
    _check_sizes(*q.shape, q.shape)
    _check_scale(scale)


def validate_packed(qkv: torch.Tensor, scale=None) -> None:
    """Raise one clear ValueError/TypeError if a packed qkv (B, N, 3, H, d) cannot go to the kernels."""
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be 5-D (batch, N, 3, heads, head_dim), got shape {tuple(qkv.shape)}")
    _check_dtype_device(qkv, "qkv")
    b, n, _, h, d = qkv.shape
    _check_sizes(b, h, n, d, qkv.shape)
    _check_scale(scale)


def _check_like(shape, ref: torch.Tensor, t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} does not match the expected {tuple(shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} dtype {t.dtype} does not match q dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but q is on {ref.device}")


def _check_lse(shape, ref: torch.Tensor, lse: torch.Tensor) -> None:
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"lse must be a torch.Tensor, got {type(lse).__name__}")
    if lse.shape != shape:
        raise ValueError(f"lse shape {tuple(lse.shape)} must be (batch, heads, N) = {tuple(shape)}")
    if lse.dtype != torch.float32:
        raise TypeError(f"lse must be float32, got {lse.dtype}")
    if lse.device != ref.device:
        raise ValueError(f"lse is on {lse.device} but q is on {ref.device}")


def validate_bwd(q, k, v, o, lse, do, scale=None, cotangents=()) -> None:
    """validate_qkv plus the forward's o, lse, the cotangent do and (bwd-of-bwd) gdq, gdk, gdv."""
    validate_qkv(q, k, v, scale)
    for name, t in (("o", o), ("do", do), *zip(("gdq", "gdk", "gdv"), cotangents)):
        _check_like(q.shape, q, t, name)
    _check_lse(q.shape[:-1], q, lse)


def validate_packed_bwd(qkv, o, lse, do, scale=None, gdqkv=None) -> None:
    """validate_packed plus o, do (B, N, H, d), lse (B, H, N) and (bwd-of-bwd) gdqkv like qkv."""
    validate_packed(qkv, scale)
    b, n, _, h, d = qkv.shape
    _check_like((b, n, h, d), qkv, o, "o")
    _check_like((b, n, h, d), qkv, do, "do")
    _check_lse((b, h, n), qkv, lse)
    if gdqkv is not None:
        _check_like(qkv.shape, qkv, gdqkv, "gdqkv")


# --------------------------------------------------------------------------------------------
# Layout helpers and allocation
# --------------------------------------------------------------------------------------------
def _alloc(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same element addressing (strides of size-1 dims do not matter)."""
    sa, sb = a.stride(), b.stride()
    return sa == sb or all(n == 1 or x == y for n, x, y in zip(a.shape, sa, sb))


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels need a unit head-dim stride; anything else (e.g. an expanded grad) is copied once."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t addressed with ref's strides (ref is contiguous, as every tensor the launchers allocate)."""
    return t if _same_strides(t, ref) else t.contiguous()


def _qkv_bhnd(q, k, v):
    """(B, H, N, d) q, k, v that share one set of strides (views of one projection do): no copy."""
    if q.stride(-1) == 1 and _same_strides(k, q) and _same_strides(v, q):
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


def _launch_consts(dtype, d: int, scale: float):
    block_d = max(16, 1 << (d - 1).bit_length())  # next power of two (triton's helper costs ~1.5 us a call)
    prec = "tf32" if (ALLOW_TF32 or dtype != torch.float32) else "ieee"
    return block_d, prec, scale * LOG2E


# --------------------------------------------------------------------------------------------
# Launchers on (B, H, N, d)-indexed operands. sq, sg, so: (batch, head, row) strides of the q,
# g and o families; q, k, v, ... are tensors whose first element is that of (b, h) = (0, 0).
# --------------------------------------------------------------------------------------------
# Grids use -(-n // block) for cdiv: triton.cdiv is a JIT callable that costs ~1.5 us per launch.
def _launch_fwd(q, k, v, o, lse, b, h, n, d, sq, so, scale):
    block_d, prec, qk_scale = _launch_consts(q.dtype, d, scale)
    grid = lambda meta: (-(-n // meta["BLOCK_M"]), h, b)  # noqa: E731
    _fwd[grid, _launch_key(q, b, h, n, d, sq, so)](q, k, v, o, lse, n, h, *sq, *so, qk_scale,
                                                   HEAD_D=d, BLOCK_D=block_d, PREC=prec)


def _launch_bwd(q, k, v, o, lse, do, dq, dk, dv, b, h, n, d, sq, sg, so, scale):
    block_d, prec, qk_scale = _launch_consts(q.dtype, d, scale)
    delta = _alloc((b, h, n), torch.float32, q.device)
    grid_m = lambda meta: (-(-n // meta["BLOCK_M"]), h, b)  # noqa: E731
    grid_n = lambda meta: (-(-n // meta["BLOCK_N"]), h, b)  # noqa: E731
    key = _launch_key(q, b, h, n, d, sq, sg, so)
    _bwd_dq[grid_m, key](q, k, v, o, lse, do, dq, delta, n, h, *sq, *sg, *so, qk_scale, scale,
                         HEAD_D=d, BLOCK_D=block_d, PREC=prec, REF_ROWS=REF_ROWS)
    _bwd_dkdv[grid_n, key](q, k, v, lse, do, delta, dk, dv, n, h, *sq, *sg, *so, qk_scale, scale,
                           HEAD_D=d, BLOCK_D=block_d, PREC=prec)


def _launch_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, gq, gk, gv, gdo, b, h, n, d, sq, sg, so, scale):
    block_d, prec, qk_scale = _launch_consts(q.dtype, d, scale)
    stats = _alloc((3, b, h, n), torch.float32, q.device)  # D, C, E0 per row
    grid_m = lambda meta: (-(-n // meta["BLOCK_M"]), h, b)  # noqa: E731
    grid_n = lambda meta: (-(-n // meta["BLOCK_N"]), h, b)  # noqa: E731
    key = _launch_key(q, b, h, n, d, sq, sg, so)
    _bwdbwd_q[grid_m, key](q, k, v, o, lse, do, gdq, gdk, gdv, gq, gdo, stats, n, h, *sq, *sg, *so, qk_scale,
                           scale, HEAD_D=d, BLOCK_D=block_d, PREC=prec, REF_ROWS=REF_ROWS)
    _bwdbwd_kv[grid_n, key](q, k, v, lse, do, gdq, gdk, gdv, stats, gk, gv, n, h, *sq, *sg, *so, qk_scale, scale,
                            HEAD_D=d, BLOCK_D=block_d, PREC=prec)


def _bhn(t: torch.Tensor):
    return t.stride()[:3]


# --------------------------------------------------------------------------------------------
# (batch, heads, N, head_dim) entry points. Outputs are contiguous; q, k, v are read in place
# when they share strides with a unit head-dim stride (e.g. permuted views of one projection).
# validate=False is for the custom ops, whose inputs the public API has checked once per chain.
# --------------------------------------------------------------------------------------------
def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, validate: bool = True):
    """Forward: returns (o, lse); o (batch, heads, N, head_dim) contiguous, lse (batch, heads, N) float32."""
    if validate:
        validate_qkv(q, k, v, scale)
    q, k, v = _qkv_bhnd(q, k, v)
    b, h, n, d = q.shape
    o = _alloc((b, h, n, d), q.dtype, q.device)
    lse = _alloc((b, h, n), torch.float32, q.device)
    _launch_fwd(q, k, v, o, lse, b, h, n, d, _bhn(q), _bhn(o), float(scale))
    return o, lse


def attn_bwd(q, k, v, o, lse, do, scale: float, validate: bool = True):
    """Backward: returns (dq, dk, dv) given the forward's o, lse and the output cotangent do."""
    if validate:
        validate_bwd(q, k, v, o, lse, do, scale)
    q, k, v = _qkv_bhnd(q, k, v)
    o, lse = o.contiguous(), lse.contiguous()
    do = _like(do, o)
    b, h, n, d = q.shape
    dq, dk, dv = (_alloc((b, h, n, d), q.dtype, q.device) for _ in range(3))
    _launch_bwd(q, k, v, o, lse, do, dq, dk, dv, b, h, n, d, _bhn(q), _bhn(dq), _bhn(o), float(scale))
    return dq, dk, dv


def attn_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, scale: float, validate: bool = True):
    """Backward of backward: total derivatives (gq, gk, gv, gdo) of <gdq,dq>+<gdk,dk>+<gdv,dv>."""
    if validate:
        validate_bwd(q, k, v, o, lse, do, scale, (gdq, gdk, gdv))
    q, k, v = _qkv_bhnd(q, k, v)
    o, lse = o.contiguous(), lse.contiguous()
    do = _like(do, o)
    b, h, n, d = q.shape
    gq, gk, gv, gdo = (_alloc((b, h, n, d), q.dtype, q.device) for _ in range(4))
    gdq, gdk, gdv = _like(gdq, gq), _like(gdk, gq), _like(gdv, gq)
    _launch_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, gq, gk, gv, gdo, b, h, n, d,
                   _bhn(q), _bhn(gq), _bhn(o), float(scale))
    return gq, gk, gv, gdo


# --------------------------------------------------------------------------------------------
# Packed entry points: qkv (B, N, 3, H, d) as the qkv projection lays it out, o/do/gdo
# (B, N, H, d), dqkv/gqkv/gdqkv (B, N, 3, H, d) contiguous: nothing is permuted or copied.
# --------------------------------------------------------------------------------------------
def _packed(qkv):
    b, n, _, h, d = qkv.shape
    sb, sn, _, sh, _ = qkv.stride()
    q, k, v = qkv.unbind(2)
    return q, k, v, b, h, n, d, (sb, sh, sn)


def _bnh(t: torch.Tensor):
    """(batch, head, row) strides of a (B, N, ..., H, d) tensor."""
    s = t.stride()
    return s[0], s[-2], s[1]


def attn_packed_fwd(qkv: torch.Tensor, scale: float, validate: bool = True):
    """Forward on packed qkv (B, N, 3, H, d): returns o (B, N, H, d) contiguous and lse (B, H, N) float32."""
    if validate:
        validate_packed(qkv, scale)
    q, k, v, b, h, n, d, sq = _packed(_unit_last(qkv))
    o = _alloc((b, n, h, d), qkv.dtype, qkv.device)
    lse = _alloc((b, h, n), torch.float32, qkv.device)
    _launch_fwd(q, k, v, o, lse, b, h, n, d, sq, _bnh(o), float(scale))
    return o, lse


def attn_packed_bwd(qkv, o, lse, do, scale: float, validate: bool = True):
    """Backward on packed qkv: returns dqkv (B, N, 3, H, d) contiguous."""
    if validate:
        validate_packed_bwd(qkv, o, lse, do, scale)
    qkv = _unit_last(qkv)
    o, lse = o.contiguous(), lse.contiguous()
    do = _like(do, o)
    q, k, v, b, h, n, d, sq = _packed(qkv)
    dqkv = _alloc((b, n, 3, h, d), qkv.dtype, qkv.device)
    dq, dk, dv = dqkv.unbind(2)
    _launch_bwd(q, k, v, o, lse, do, dq, dk, dv, b, h, n, d, sq, _bnh(dq), _bnh(o), float(scale))
    return dqkv


def attn_packed_bwdbwd(qkv, o, lse, do, gdqkv, scale: float, validate: bool = True):
    """Backward of backward on packed qkv: (gqkv (B, N, 3, H, d), gdo (B, N, H, d)), both contiguous."""
    if validate:
        validate_packed_bwd(qkv, o, lse, do, scale, gdqkv)
    qkv = _unit_last(qkv)
    o, lse = o.contiguous(), lse.contiguous()
    do = _like(do, o)
    q, k, v, b, h, n, d, sq = _packed(qkv)
    gqkv = _alloc((b, n, 3, h, d), qkv.dtype, qkv.device)
    gdo = _alloc((b, n, h, d), qkv.dtype, qkv.device)
    gq, gk, gv = gqkv.unbind(2)
    gdq, gdk, gdv = _like(gdqkv, gqkv).unbind(2)
    _launch_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, gq, gk, gv, gdo, b, h, n, d,
                   sq, _bnh(gq), _bnh(o), float(scale))
    return gqkv, gdo
