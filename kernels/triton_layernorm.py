"""LayerNorm over the last dim with affine weight and bias: forward, backward and
backward-of-backward Triton kernels, fp32 math inside whatever the input dtype.

Per row (D features; m(.) is the mean over the row, r = rstd; docs/kernels.md has the derivation):

    mu = m(x),  r = (m((x - mu)^2) + eps)^-1/2,  xhat = (x - mu) r,  y = xhat w + b
    g = w dy:   dx = r (g - m(g) - xhat m(g xhat)),   dw = sum_rows dy xhat,   db = sum_rows dy

Backward of backward, for cotangents (a = gdx, gdw, gdb) of (dx, dw, db):

    ga  = r (a - m(a) - xhat m(a xhat))                  (the backward formula applied to a)
    gdy = w ga + xhat gdw + gdb
    gw  = sum_rows dy ga
    c   = -r (a m(g xhat) + g m(a xhat)) + dy gdw         (cotangent of xhat)
    gx  = r (c - m(c) - xhat m(c xhat)) - r^2 xhat (m(a g) - m(a) m(g) - m(a xhat) m(g xhat))

b does not enter the backward, so the backward-of-backward has no gradient for it. mean and rstd
(fp32, one per row) are caches of x: the backward ops are functions of (x, w, dy).

Kernels: the forward owns BLOCK_M rows per program, every row whole in registers (BLOCK_D = next
power of two >= D). The backward kernels are persistent (about 2 programs per SM, each looping over
row blocks) so the parameter gradients are summed in registers and written once per program as a
(programs, D) fp32 partial; ``_col_sum_kernel`` adds the partials up (no atomics: a given grid
gives bit-identical results run to run). Launches per call: forward 1, backward 2, backward of
backward 2. No autotuning: block sizes and warps follow from D (``_blocks``).

float64 inputs run ``reference_*`` (the same formulas in torch ops): the path of the float64
gradcheck / gradgradcheck of the custom ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch_common as _c

#: Largest normalized width: one row lives in registers (BLOCK_D = next power of two >= D).
MAX_DIM: int = 4096
#: Persistent backward grids: programs per SM on GPU; under the interpreter a few programs, so
#: every program loops over several row blocks even in small tests.
PROGRAMS_PER_SM: int = 2
INTERPRET_PROGRAMS: int = 3


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _tile(base, rows, cols, s_m, mask):
    """fp32 (len(rows), BLOCK_D) tile of an (M, D) matrix with row stride s_m, zero-padded (int64 offsets)."""
    return tl.load(base + rows[:, None].to(tl.int64) * s_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(base, rows, cols, s_m, mask, val):
    tl.store(base + rows[:, None].to(tl.int64) * s_m + cols[None, :], val.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _ln_fwd_kernel(X, W, B, Y, MEAN, RSTD, M, D, s_x, s_y, eps,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask_m, mask_d = rows < M, cols < D
    mask = mask_m[:, None] & mask_d[None, :]
    x = _tile(X, rows, cols, s_x, mask)
    mean = tl.sum(x, 1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)  # two-pass variance: the row is in registers
    w = tl.load(W + cols, mask=mask_d, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask_d, other=0.0).to(tl.float32)
    _store_tile(Y, rows, cols, s_y, mask, xc * rstd[:, None] * w[None, :] + b[None, :])
    tl.store(MEAN + rows, mean, mask=mask_m)
    tl.store(RSTD + rows, rstd, mask=mask_m)


@triton.jit
def _ln_bwd_kernel(X, W, MEAN, RSTD, DY, DX, PART, M, D, s_x, s_dy, s_dx,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx per row; this program's sums of dy * xhat and dy into PART[pid, 0:2, :]."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    w = tl.load(W + cols, mask=mask_d, other=0.0).to(tl.float32)
    acc_dw = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_db = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(pid * BLOCK_M, M, programs * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask_m = rows < M
        mask = mask_m[:, None] & mask_d[None, :]
        mean = tl.load(MEAN + rows, mask=mask_m, other=0.0)
        rstd = tl.load(RSTD + rows, mask=mask_m, other=0.0)
        xhat = tl.where(mask, (_tile(X, rows, cols, s_x, mask) - mean[:, None]) * rstd[:, None], 0.0)
        dy = _tile(DY, rows, cols, s_dy, mask)
        g = dy * w[None, :]
        m_g = tl.sum(g, 1) / D
        m_gx = tl.sum(g * xhat, 1) / D
        _store_tile(DX, rows, cols, s_dx, mask, rstd[:, None] * (g - m_g[:, None] - xhat * m_gx[:, None]))
        acc_dw += dy * xhat
        acc_db += dy
    part = PART + pid.to(tl.int64) * 2 * D
    tl.store(part + cols, tl.sum(acc_dw, 0), mask=mask_d)
    tl.store(part + D + cols, tl.sum(acc_db, 0), mask=mask_d)


@triton.jit
def _ln_bwdbwd_kernel(X, W, MEAN, RSTD, DY, GDX, GDW, GDB, GX, GDY, PART, M, D, s_x, s_dy, s_gdx, s_gx, s_gdy,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """gx, gdy per row; this program's sum of dy * ga into PART[pid, :]."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    w = tl.load(W + cols, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    gdw = tl.load(GDW + cols, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    gdb = tl.load(GDB + cols, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    acc_gw = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(pid * BLOCK_M, M, programs * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask_m = rows < M
        mask = mask_m[:, None] & mask_d[None, :]
        mean = tl.load(MEAN + rows, mask=mask_m, other=0.0)
        r = tl.load(RSTD + rows, mask=mask_m, other=0.0)[:, None]
        xhat = tl.where(mask, (_tile(X, rows, cols, s_x, mask) - mean[:, None]) * r, 0.0)
        dy = _tile(DY, rows, cols, s_dy, mask)
        a = _tile(GDX, rows, cols, s_gdx, mask)
        g = dy * w
        m_a = (tl.sum(a, 1) / D)[:, None]
        m_ax = (tl.sum(a * xhat, 1) / D)[:, None]
        m_g = (tl.sum(g, 1) / D)[:, None]
        m_gx = (tl.sum(g * xhat, 1) / D)[:, None]
        m_ag = (tl.sum(a * g, 1) / D)[:, None]
        ga = r * (a - m_a - xhat * m_ax)
        _store_tile(GDY, rows, cols, s_gdy, mask, tl.where(mask, w * ga + xhat * gdw + gdb, 0.0))
        acc_gw += dy * ga
        c = -r * (a * m_gx + g * m_ax) + dy * gdw  # zero in padded columns: a, g, dy are
        m_c = (tl.sum(c, 1) / D)[:, None]
        m_cx = (tl.sum(c * xhat, 1) / D)[:, None]
        gx = r * (c - m_c - xhat * m_cx) - r * r * xhat * (m_ag - m_a * m_g - m_ax * m_gx)
        _store_tile(GX, rows, cols, s_gx, mask, gx)
    tl.store(PART + pid.to(tl.int64) * D + cols, tl.sum(acc_gw, 0), mask=mask_d)


@triton.jit
def _col_sum_kernel(PART, OUT0, OUT1, P, D, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT{j}[c] = sum_p PART[p, j, c] for a (P, J, D) fp32 buffer, J = 1 or 2 (program_id(1) = j)."""
    j = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < D
    stride = tl.num_programs(1) * D
    acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(PART + ps[:, None].to(tl.int64) * stride + j * D + cols[None, :],
                       mask=(ps < P)[:, None] & mask_c[None, :], other=0.0)
    total = tl.sum(acc, 0)
    if j == 0:
        tl.store(OUT0 + cols, total.to(OUT0.dtype.element_ty), mask=mask_c)
    else:
        tl.store(OUT1 + cols, total.to(OUT1.dtype.element_ty), mask=mask_c)


KERNEL_FUNCTIONS = {"ln_fwd": "_ln_fwd_kernel", "ln_bwd": "_ln_bwd_kernel", "ln_bwdbwd": "_ln_bwdbwd_kernel",
                    "col_sum": "_col_sum_kernel"}


# --------------------------------------------------------------------------------------------
# Block sizes (no autotuning: fixed by D, so a shape always launches the same code)
# --------------------------------------------------------------------------------------------
def _blocks(name: str, d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) of a row kernel: about 4096 (forward) or 2048 (backward)
    fp32 elements per tile, 32 or more per thread."""
    block_d = max(16, 1 << (d - 1).bit_length())
    elems = 4096 if name == "ln_fwd" else 2048
    block_m = max(1, min(16, elems // block_d))
    warps = max(1, min(8, block_m * block_d // 256))
    return block_m, block_d, warps


COL_SUM_BLOCKS = (32, 64, 4)  # BLOCK_P, BLOCK_C, num_warps


def _programs(m: int, block_m: int, device: torch.device) -> int:
    blocks = -(-m // block_m)
    cap = INTERPRET_PROGRAMS if device.type == "cpu" else PROGRAMS_PER_SM * _c.sm_count(device)
    return max(1, min(blocks, cap))


def _col_sum(part: torch.Tensor, outs: list[torch.Tensor]) -> None:
    p, j, d = part.shape
    bp, bc, warps = COL_SUM_BLOCKS
    _col_sum_kernel[(-(-d // bc), j)](part, outs[0], outs[-1], p, d, BLOCK_P=bp, BLOCK_C=bc, num_warps=warps)


# --------------------------------------------------------------------------------------------
# Reference formulas (float64, and the tests' ground truth for the kernels)
# --------------------------------------------------------------------------------------------
def _xhat(x, mean, rstd):
    return (x - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)


def reference_fwd(x, w, b, eps: float):
    mean = x.mean(-1)
    rstd = ((x - mean.unsqueeze(-1)).pow(2).mean(-1) + eps).rsqrt()
    return _xhat(x, mean, rstd) * w + b, mean, rstd


def reference_bwd(x, w, mean, rstd, dy):
    xhat, r = _xhat(x, mean, rstd), rstd.unsqueeze(-1)
    g = dy * w
    dx = r * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    lead = tuple(range(x.ndim - 1))
    return dx, (dy * xhat).sum(lead), dy.sum(lead)


def reference_bwdbwd(x, w, mean, rstd, dy, gdx, gdw, gdb):
    xhat, r, a = _xhat(x, mean, rstd), rstd.unsqueeze(-1), gdx
    g = dy * w
    m = lambda t: t.mean(-1, keepdim=True)  # noqa: E731
    m_a, m_ax, m_g, m_gx, m_ag = m(a), m(a * xhat), m(g), m(g * xhat), m(a * g)
    ga = r * (a - m_a - xhat * m_ax)
    gdy = w * ga + xhat * gdw + gdb
    c = -r * (a * m_gx + g * m_ax) + dy * gdw
    gx = r * (c - m(c) - xhat * m(c * xhat)) - r * r * xhat * (m_ag - m_a * m_g - m_ax * m_gx)
    return gx, (dy * ga).sum(tuple(range(x.ndim - 1))), gdy


# --------------------------------------------------------------------------------------------
# Validation (once per public call; the custom ops trust their inputs)
# --------------------------------------------------------------------------------------------
def validate(x, w, b=None, eps=None, mean=None, rstd=None, dy=(), param_cotangents=()) -> None:
    """One clear TypeError/ValueError if the operands cannot go to the LayerNorm kernels."""
    _c.check_tensor(x, "x", "fused LayerNorm")
    if x.ndim < 1 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty tensor (..., D), got shape {tuple(x.shape)}")
    d = x.shape[-1]
    if d > MAX_DIM:
        raise ValueError(f"normalized width {d} exceeds fused LayerNorm's maximum {MAX_DIM}")
    for name, t in (("weight", w), ("bias", b), *param_cotangents):
        if name == "bias" and t is None:
            continue
        _c.check_tensor(t, name, "fused LayerNorm")
        if t.shape != (d,):
            raise ValueError(f"{name} shape {tuple(t.shape)} must be ({d},), the normalized width of x")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if (t.dtype == torch.float64) != (x.dtype == torch.float64):
            raise TypeError(f"{name} dtype {t.dtype} and x dtype {x.dtype}: float64 runs the reference, "
                            "so both or neither must be float64")
    if b is not None and b.dtype != w.dtype:
        raise TypeError(f"bias dtype {b.dtype} does not match weight dtype {w.dtype}")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0):
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    stats = torch.float64 if x.dtype == torch.float64 else torch.float32
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != x.shape[:-1] or t.dtype != stats or t.device != x.device:
            raise ValueError(f"{name} must be a {stats} tensor of shape {tuple(x.shape[:-1])} on {x.device}")
    for name, t in dy:
        if not isinstance(t, torch.Tensor) or t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} must be a {x.dtype} tensor of x's shape {tuple(x.shape)} on {x.device}")


# --------------------------------------------------------------------------------------------
# Launchers: outputs are contiguous, in x's shape (gradients of w in w's dtype)
# --------------------------------------------------------------------------------------------
def ln_fwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float, validate_inputs: bool = True):
    """(y, mean, rstd): y like x, mean and rstd (x.shape[:-1]) fp32 (float64 for float64 x)."""
    if validate_inputs:
        validate(x, w, b, eps)
    if _c.uses_reference(x):
        return reference_fwd(x, w, b, eps)
    d = x.shape[-1]
    x2 = _c.rows(x, d)
    m = x2.shape[0]
    y = _c.alloc(x.shape, x.dtype, x.device)
    mean = _c.alloc(x.shape[:-1], torch.float32, x.device)
    rstd = _c.alloc(x.shape[:-1], torch.float32, x.device)
    block_m, block_d, warps = _blocks("ln_fwd", d)
    _ln_fwd_kernel[(-(-m // block_m),)](x2, w, b, y, mean, rstd, m, d, x2.stride(0), d, float(eps),
                                        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
    return y, mean, rstd


def ln_bwd(x, w, mean, rstd, dy, validate_inputs: bool = True):
    """(dx, dw, db) for the output cotangent dy."""
    if validate_inputs:
        validate(x, w, mean=mean, rstd=rstd, dy=[("dy", dy)])
    if _c.uses_reference(x):
        return reference_bwd(x, w, mean, rstd, dy)
    d = x.shape[-1]
    x2, dy2 = _c.rows(x, d), _c.rows(dy, d)
    m = x2.shape[0]
    block_m, block_d, warps = _blocks("ln_bwd", d)
    programs = _programs(m, block_m, x.device)
    dx = _c.alloc(x.shape, x.dtype, x.device)
    part = _c.alloc((programs, 2, d), torch.float32, x.device)
    _ln_bwd_kernel[(programs,)](x2, w, mean.contiguous(), rstd.contiguous(), dy2, dx, part, m, d,
                                x2.stride(0), dy2.stride(0), d, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
    dw, db = _c.alloc((d,), w.dtype, w.device), _c.alloc((d,), w.dtype, w.device)
    _col_sum(part, [dw, db])
    return dx, dw, db


def ln_bwdbwd(x, w, mean, rstd, dy, gdx, gdw, gdb, validate_inputs: bool = True):
    """(gx, gw, gdy): total derivatives of <gdx, dx> + <gdw, dw> + <gdb, db> w.r.t. x, w and dy."""
    if validate_inputs:
        validate(x, w, mean=mean, rstd=rstd, dy=[("dy", dy), ("gdx", gdx)],
                 param_cotangents=[("gdw", gdw), ("gdb", gdb)])
    if _c.uses_reference(x):
        return reference_bwdbwd(x, w, mean, rstd, dy, gdx, gdw, gdb)
    d = x.shape[-1]
    x2, dy2, gdx2 = _c.rows(x, d), _c.rows(dy, d), _c.rows(gdx, d)
    m = x2.shape[0]
    block_m, block_d, warps = _blocks("ln_bwdbwd", d)
    programs = _programs(m, block_m, x.device)
    gx, gdy = _c.alloc(x.shape, x.dtype, x.device), _c.alloc(x.shape, x.dtype, x.device)
    part = _c.alloc((programs, 1, d), torch.float32, x.device)
    _ln_bwdbwd_kernel[(programs,)](x2, w, mean.contiguous(), rstd.contiguous(), dy2, gdx2, gdw.contiguous(),
                                   gdb.contiguous(), gx, gdy, part, m, d, x2.stride(0), dy2.stride(0),
                                   gdx2.stride(0), d, d, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
    gw = _c.alloc((d,), w.dtype, w.device)
    _col_sum(part, [gw])
    return gx, gw, gdy
