"""Fused softmax attention in Triton: forward, backward and backward-of-backward kernels.

All kernels work on (batch * heads, N, head_dim) contiguous tensors and never write an N x N
tensor to global memory. Notation (one head; docs/kernels.md has the derivation):

    S = scale * Q K^T,  P = softmax(S) (row-wise),  O = P V,  lse = logsumexp(S) (row-wise)
    dP = dO V^T,  D = rowsum(dO * O),  dS = P * (dP - D)
    dQ = scale * dS K,  dK = scale * dS^T Q,  dV = P^T dO

Backward-of-backward, for cotangents (gdQ, gdK, gdV) of (dQ, dK, dV):

    G = scale * (gdQ K^T + Q gdK^T),  H = dO gdV^T
    C = rowsum(P * G),  W0 = G * (dP - D) + H,  E0 = rowsum(P * W0),  E = E0 - C * D
    W = W0 - C * dP,  dS2 = P * (W - E),  Z = P * (G - C)
    gQ  = scale * (dS gdK + dS2 K)      = scale * (dS gdK + (P*W0) K - C * (dS K) - E0 * (P K))
    gK  = scale * (dS^T gdQ + dS2^T Q)
    gV  = Z^T dO
    gdO = P gdV + Z V                   = P gdV + (P*G) V - C * O

Kernels (one launcher each, below):
    _attn_fwd_kernel       query blocks, one sweep over keys: O, lse (online softmax)
    _attn_bwd_dq_kernel    query blocks: D = rowsum(dO*O) (stored), dQ
    _attn_bwd_dkdv_kernel  key blocks, sweep over queries: dK, dV (reads D)
    _attn_bwdbwd_q_kernel  query blocks, one sweep over keys: gQ, gdO and row stats D, C, E
                           (gQ uses the linear split above, so no second sweep is needed)
    _attn_bwdbwd_kv_kernel key blocks, sweep over queries: gK, gV (reads D, C, E)

No atomics: every output tile is written by exactly one program (deterministic).

Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) a single fixed block config is
used; on GPU a small autotune set. fp32 inputs use TF32 tensor-core dots on GPU unless
``ALLOW_TF32`` is set to False (then IEEE fp32 dots). In the interpreter fp32 dots are IEEE.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

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
#: Block sizes used under the interpreter (one program at a time; small keeps tests fast and
#: still exercises multi-block loops and masking at N = 50 or 197).
INTERPRET_BLOCKS: dict = {"BLOCK_M": 32, "BLOCK_N": 32}

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(base, rows, mask_r, offs_d, mask_d, stride_n):
    """Load a (len(rows), BLOCK_D) tile of a row-major (N, head_dim) matrix, zero-padded."""
    ptrs = base + rows[:, None] * stride_n + offs_d[None, :]
    return tl.load(ptrs, mask=mask_r[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _store_rows(base, rows, mask_r, offs_d, mask_d, stride_n, val):
    ptrs = base + rows[:, None] * stride_n + offs_d[None, :]
    tl.store(ptrs, val.to(base.dtype.element_ty), mask=mask_r[:, None] & mask_d[None, :])


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    N, stride_z, stride_n, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)
    off = z * stride_z
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_D

    q = _load_rows(Q + off, offs_m, mask_m, offs_d, mask_d, stride_n)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < N
        k = _load_rows(K + off, offs_n, mask_n, offs_d, mask_d, stride_n)
        v = _load_rows(V + off, offs_n, mask_n, offs_d, mask_d, stride_n)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # log2 units
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: block 0 always has a valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    _store_rows(O + off, offs_m, mask_m, offs_d, mask_d, stride_n, acc)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural-log logsumexp of S
    tl.store(LSE + z * N + offs_m, lse, mask=mask_m)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, O, LSE, DO, DQ, DELTA,
    N, stride_z, stride_n, qk_scale, scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)
    off = z * stride_z
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_D

    q = _load_rows(Q + off, offs_m, mask_m, offs_d, mask_d, stride_n)
    do = _load_rows(DO + off, offs_m, mask_m, offs_d, mask_d, stride_n)
    o = _load_rows(O + off, offs_m, mask_m, offs_d, mask_d, stride_n)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + z * N + offs_m, delta, mask=mask_m)
    lse2 = tl.load(LSE + z * N + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < N
        k = _load_rows(K + off, offs_n, mask_n, offs_d, mask_d, stride_n)
        v = _load_rows(V + off, offs_n, mask_n, offs_d, mask_d, stride_n)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        valid = mask_m[:, None] & mask_n[None, :]
        p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    _store_rows(DQ + off, offs_m, mask_m, offs_d, mask_d, stride_n, dq * scale)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, LSE, DO, DELTA, DK, DV,
    N, stride_z, stride_n, qk_scale, scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)
    off = z * stride_z
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < HEAD_D

    k = _load_rows(K + off, offs_n, mask_n, offs_d, mask_d, stride_n)
    v = _load_rows(V + off, offs_n, mask_n, offs_d, mask_d, stride_n)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < N
        q = _load_rows(Q + off, offs_m, mask_m, offs_d, mask_d, stride_n)
        do = _load_rows(DO + off, offs_m, mask_m, offs_d, mask_d, stride_n)
        lse2 = tl.load(LSE + z * N + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + z * N + offs_m, mask=mask_m, other=0.0)
        # transposed tiles: rows are keys (this program's block), columns are queries
        st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
        valid = mask_n[:, None] & mask_m[None, :]
        pt = tl.where(valid, tl.exp2(st - lse2[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    _store_rows(DK + off, offs_n, mask_n, offs_d, mask_d, stride_n, dk * scale)
    _store_rows(DV + off, offs_n, mask_n, offs_d, mask_d, stride_n, dv)


@triton.jit
def _attn_bwdbwd_q_kernel(
    Q, K, V, O, LSE, DO, GDQ, GDK, GDV, GQ, GDO, STATS,
    N, stride_z, stride_n, qk_scale, scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Query side of bwd-of-bwd: gQ, gdO and the row statistics D, C, E (one sweep)."""
    pid_m = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)
    off = z * stride_z
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_D

    q = _load_rows(Q + off, offs_m, mask_m, offs_d, mask_d, stride_n)
    do = _load_rows(DO + off, offs_m, mask_m, offs_d, mask_d, stride_n)
    gdq = _load_rows(GDQ + off, offs_m, mask_m, offs_d, mask_d, stride_n)
    o = _load_rows(O + off, offs_m, mask_m, offs_d, mask_d, stride_n).to(tl.float32)
    delta = tl.sum(do.to(tl.float32) * o, 1)
    lse2 = tl.load(LSE + z * N + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634

    acc_q = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)   # dS gdK + (P*W0) K
    acc_dsk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # dS K
    acc_pk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)   # P K
    acc_do = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)   # P gdV + (P*G) V
    c_i = tl.zeros([BLOCK_M], tl.float32)                # rowsum(P*G)
    e0_i = tl.zeros([BLOCK_M], tl.float32)               # rowsum(P*W0)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < N
        k = _load_rows(K + off, offs_n, mask_n, offs_d, mask_d, stride_n)
        v = _load_rows(V + off, offs_n, mask_n, offs_d, mask_d, stride_n)
        gdk = _load_rows(GDK + off, offs_n, mask_n, offs_d, mask_d, stride_n)
        gdv = _load_rows(GDV + off, offs_n, mask_n, offs_d, mask_d, stride_n)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        valid = mask_m[:, None] & mask_n[None, :]
        p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        g = (tl.dot(gdq, tl.trans(k), input_precision=PREC)
             + tl.dot(q, tl.trans(gdk), input_precision=PREC)) * scale
        h = tl.dot(do, tl.trans(gdv), input_precision=PREC)
        dpd = dp - delta[:, None]
        ds = p * dpd
        pg = p * g
        pw0 = p * (g * dpd + h)
        c_i += tl.sum(pg, 1)
        e0_i += tl.sum(pw0, 1)
        acc_q += tl.dot(ds.to(k.dtype), gdk, input_precision=PREC)
        acc_q += tl.dot(pw0.to(k.dtype), k, input_precision=PREC)
        acc_dsk += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        acc_pk += tl.dot(p.to(k.dtype), k, input_precision=PREC)
        acc_do += tl.dot(p.to(v.dtype), gdv, input_precision=PREC)
        acc_do += tl.dot(pg.to(v.dtype), v, input_precision=PREC)
    gq = (acc_q - c_i[:, None] * acc_dsk - e0_i[:, None] * acc_pk) * scale
    gdo = acc_do - c_i[:, None] * o
    _store_rows(GQ + off, offs_m, mask_m, offs_d, mask_d, stride_n, gq)
    _store_rows(GDO + off, offs_m, mask_m, offs_d, mask_d, stride_n, gdo)
    # STATS is (3, BH, N) fp32: D, C, E
    stat_off = z * N + offs_m
    zn = tl.num_programs(1).to(tl.int64) * N
    tl.store(STATS + stat_off, delta, mask=mask_m)
    tl.store(STATS + zn + stat_off, c_i, mask=mask_m)
    tl.store(STATS + 2 * zn + stat_off, e0_i - c_i * delta, mask=mask_m)


@triton.jit
def _attn_bwdbwd_kv_kernel(
    Q, K, V, LSE, DO, GDQ, GDK, GDV, STATS, GK, GV,
    N, stride_z, stride_n, qk_scale, scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Key side of bwd-of-bwd: gK, gV (needs the finished row statistics D, C, E)."""
    pid_n = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)
    off = z * stride_z
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < HEAD_D
    zn = tl.num_programs(1).to(tl.int64) * N

    k = _load_rows(K + off, offs_n, mask_n, offs_d, mask_d, stride_n)
    v = _load_rows(V + off, offs_n, mask_n, offs_d, mask_d, stride_n)
    gdk = _load_rows(GDK + off, offs_n, mask_n, offs_d, mask_d, stride_n)
    gdv = _load_rows(GDV + off, offs_n, mask_n, offs_d, mask_d, stride_n)
    acc_k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    acc_v = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < N
        q = _load_rows(Q + off, offs_m, mask_m, offs_d, mask_d, stride_n)
        do = _load_rows(DO + off, offs_m, mask_m, offs_d, mask_d, stride_n)
        gdq = _load_rows(GDQ + off, offs_m, mask_m, offs_d, mask_d, stride_n)
        row = z * N + offs_m
        lse2 = tl.load(LSE + row, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(STATS + row, mask=mask_m, other=0.0)
        c_i = tl.load(STATS + zn + row, mask=mask_m, other=0.0)
        e_i = tl.load(STATS + 2 * zn + row, mask=mask_m, other=0.0)
        # transposed tiles: rows are keys, columns are queries
        st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
        valid = mask_n[:, None] & mask_m[None, :]
        pt = tl.where(valid, tl.exp2(st - lse2[None, :]), 0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        gt = (tl.dot(k, tl.trans(gdq), input_precision=PREC)
              + tl.dot(gdk, tl.trans(q), input_precision=PREC)) * scale
        ht = tl.dot(gdv, tl.trans(do), input_precision=PREC)
        dst = pt * (dpt - delta[None, :])
        wt = gt * (dpt - delta[None, :]) + ht - c_i[None, :] * dpt
        ds2t = pt * (wt - e_i[None, :])
        zt = pt * (gt - c_i[None, :])
        acc_k += tl.dot(dst.to(q.dtype), gdq, input_precision=PREC)
        acc_k += tl.dot(ds2t.to(q.dtype), q, input_precision=PREC)
        acc_v += tl.dot(zt.to(do.dtype), do, input_precision=PREC)
    _store_rows(GK + off, offs_n, mask_n, offs_d, mask_d, stride_n, acc_k * scale)
    _store_rows(GV + off, offs_n, mask_n, offs_d, mask_d, stride_n, acc_v)


# --------------------------------------------------------------------------------------------
# Block configs: fixed under the interpreter, a small autotune set on GPU
# --------------------------------------------------------------------------------------------
def _cfgs(triples):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in triples]


if INTERPRET:
    _fwd = _attn_fwd_kernel
    _bwd_dq = _attn_bwd_dq_kernel
    _bwd_dkdv = _attn_bwd_dkdv_kernel
    _bwdbwd_q = _attn_bwdbwd_q_kernel
    _bwdbwd_kv = _attn_bwdbwd_kv_kernel
else:
    _KEY = ["N", "HEAD_D"]  # autotune also keys on the tensor dtypes
    _fwd = triton.autotune(_cfgs([(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 2)]), key=_KEY)(
        _attn_fwd_kernel)
    _bwd_dq = triton.autotune(_cfgs([(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2)]), key=_KEY)(
        _attn_bwd_dq_kernel)
    _bwd_dkdv = triton.autotune(_cfgs([(64, 64, 4, 2), (64, 128, 8, 2), (32, 64, 4, 2)]), key=_KEY)(
        _attn_bwd_dkdv_kernel)
    # bwd-of-bwd keeps 4 (query side) / 2 (key side) fp32 accumulators plus 4 input tiles: small
    # blocks. Picked from ptxas -v of sm_90a builds (triton 3.6 and 3.9, no GPU run): at head_dim
    # 64 these have no or small register spills; at head_dim 128 the query kernel spills.
    _bwdbwd_q = triton.autotune(
        _cfgs([(32, 32, 4, 1), (32, 32, 4, 2), (32, 64, 8, 1), (64, 32, 8, 1)]), key=_KEY)(_attn_bwdbwd_q_kernel)
    _bwdbwd_kv = triton.autotune(
        _cfgs([(32, 32, 4, 2), (64, 32, 8, 1), (32, 64, 4, 1)]), key=_KEY)(_attn_bwdbwd_kv_kernel)


def _meta() -> dict:
    return dict(INTERPRET_BLOCKS) if INTERPRET else {}


# --------------------------------------------------------------------------------------------
# Validation and allocation
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
    _check_device(q, "q")
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        raise TypeError(
            "bfloat16 is not supported under the Triton interpreter (bf16 tl.dot is wrong there, "
            "triton#11584); use float32/float16 on CPU or run on CUDA"
        )
    b, h, n, d = q.shape
    if b * h == 0 or n == 0:
        raise ValueError(f"empty attention input of shape {tuple(q.shape)}: batch*heads and N must be >= 1")
    if b * h > 65535:
        raise ValueError(f"batch*heads = {b * h} exceeds the grid limit 65535")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"unsupported head_dim {d}; fused attention supports 1 <= head_dim <= {MAX_HEAD_DIM}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise TypeError(f"scale must be a finite Python float, got {scale!r}")


def _check_like(ref: torch.Tensor, t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != ref.shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} does not match q shape {tuple(ref.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} dtype {t.dtype} does not match q dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but q is on {ref.device}")


def _check_lse(q: torch.Tensor, lse: torch.Tensor) -> None:
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"lse must be a torch.Tensor, got {type(lse).__name__}")
    if lse.shape != q.shape[:-1]:
        raise ValueError(f"lse shape {tuple(lse.shape)} must be q.shape[:-1] = {tuple(q.shape[:-1])}")
    if lse.dtype != torch.float32:
        raise TypeError(f"lse must be float32, got {lse.dtype}")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device} but q is on {q.device}")


def _alloc(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _flat(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.contiguous().view(b * h, n, d)


def _common(q: torch.Tensor, scale: float):
    b, h, n, d = q.shape
    block_d = max(16, triton.next_power_of_2(d))
    prec = "tf32" if (ALLOW_TF32 or q.dtype != torch.float32) else "ieee"
    scale = float(scale)
    return b * h, n, d, block_d, prec, scale, scale * LOG2E


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Forward: returns (o, lse); o like q (contiguous), lse (batch, heads, N) float32."""
    validate_qkv(q, k, v, scale)
    bh, n, d, block_d, prec, scale, qk_scale = _common(q, scale)
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    o = _alloc(qf.shape, q.dtype, q.device)
    lse = _alloc((bh, n), torch.float32, q.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), bh)  # noqa: E731
    _fwd[grid](qf, kf, vf, o, lse, n, qf.stride(0), qf.stride(1), qk_scale,
               HEAD_D=d, BLOCK_D=block_d, PREC=prec, **_meta())
    return o.view(q.shape), lse.view(q.shape[:-1])


def attn_bwd(q, k, v, o, lse, do, scale: float):
    """Backward: returns (dq, dk, dv) given the forward's o, lse and the output cotangent do."""
    validate_qkv(q, k, v, scale)
    _check_like(q, o, "o")
    _check_like(q, do, "do")
    _check_lse(q, lse)
    bh, n, d, block_d, prec, scale, qk_scale = _common(q, scale)
    qf, kf, vf, of, dof = _flat(q), _flat(k), _flat(v), _flat(o), _flat(do)
    lsef = lse.contiguous().view(bh, n)
    dq = _alloc(qf.shape, q.dtype, q.device)
    dk = _alloc(qf.shape, q.dtype, q.device)
    dv = _alloc(qf.shape, q.dtype, q.device)
    delta = _alloc((bh, n), torch.float32, q.device)
    sz, sn = qf.stride(0), qf.stride(1)
    grid_m = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), bh)  # noqa: E731
    grid_n = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), bh)  # noqa: E731
    _bwd_dq[grid_m](qf, kf, vf, of, lsef, dof, dq, delta, n, sz, sn, qk_scale, scale,
                    HEAD_D=d, BLOCK_D=block_d, PREC=prec, **_meta())
    _bwd_dkdv[grid_n](qf, kf, vf, lsef, dof, delta, dk, dv, n, sz, sn, qk_scale, scale,
                      HEAD_D=d, BLOCK_D=block_d, PREC=prec, **_meta())
    return dq.view(q.shape), dk.view(q.shape), dv.view(q.shape)


def attn_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, scale: float):
    """Backward of backward: total derivatives (gq, gk, gv, gdo) of <gdq,dq>+<gdk,dk>+<gdv,dv>."""
    validate_qkv(q, k, v, scale)
    for name, t in (("o", o), ("do", do), ("gdq", gdq), ("gdk", gdk), ("gdv", gdv)):
        _check_like(q, t, name)
    _check_lse(q, lse)
    bh, n, d, block_d, prec, scale, qk_scale = _common(q, scale)
    qf, kf, vf, of, dof = _flat(q), _flat(k), _flat(v), _flat(o), _flat(do)
    gdqf, gdkf, gdvf = _flat(gdq), _flat(gdk), _flat(gdv)
    lsef = lse.contiguous().view(bh, n)
    gq = _alloc(qf.shape, q.dtype, q.device)
    gk = _alloc(qf.shape, q.dtype, q.device)
    gv = _alloc(qf.shape, q.dtype, q.device)
    gdo = _alloc(qf.shape, q.dtype, q.device)
    stats = _alloc((3, bh, n), torch.float32, q.device)  # D, C, E per row
    sz, sn = qf.stride(0), qf.stride(1)
    grid_m = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), bh)  # noqa: E731
    grid_n = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), bh)  # noqa: E731
    _bwdbwd_q[grid_m](qf, kf, vf, of, lsef, dof, gdqf, gdkf, gdvf, gq, gdo, stats,
                      n, sz, sn, qk_scale, scale,
                      HEAD_D=d, BLOCK_D=block_d, PREC=prec, **_meta())
    _bwdbwd_kv[grid_n](qf, kf, vf, lsef, dof, gdqf, gdkf, gdvf, stats, gk, gv,
                       n, sz, sn, qk_scale, scale,
                       HEAD_D=d, BLOCK_D=block_d, PREC=prec, **_meta())
    shp = q.shape
    return gq.view(shp), gk.view(shp), gv.view(shp), gdo.view(shp)
