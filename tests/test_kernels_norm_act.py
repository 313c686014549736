"""Fused LayerNorm and GELU (energyvit.kernels.layer_norm / gelu) against aten, to second order.

Two paths are checked:
- float64 runs the ops' torch reference formulas (kernels/triton_layernorm.py, triton_gelu.py)
  through the same chained custom ops: float64 gradcheck and gradgradcheck (the derivation and
  the autograd wiring), and agreement with autograd of F.layer_norm / F.gelu to ~1e-13.
- float32 and float16 run the Triton kernels (under the interpreter on CPU; tests/conftest.py sets
  TRITON_INTERPRET=1) and are compared with the float64 reference on the same rounded inputs, every
  level (forward, backward, backward of backward), with outputs poisoned (NaN) before the kernels
  write them. Relative Frobenius error per output; tolerances TOL (fp32 in the interpreter measured
  ~1e-7, fp16 ~3e-4: outputs rounded to fp16; bf16 only on CUDA).
Shapes: awkward widths (40, 80, 192, 1), row counts 197, 50, 1, a 3-D input and a strided one.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from energyvit.kernels import gelu, gelu_ops, launch_common, layer_norm, layernorm_ops
from energyvit.kernels import triton_gelu as G
from energyvit.kernels import triton_layernorm as L

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
EPS = 1e-6
LN_SHAPES = [(197, 40), (50, 80), (1, 192), (2, 25, 192), (3, 1)]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch_common, "POISON_OUTPUTS", True)
    if not ON_GPU:
        assert launch_common.INTERPRET, "tests on CPU need TRITON_INTERPRET=1 before triton is imported"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite values in a fused output (an unwritten poisoned element?)"
    out, ref = out.double().cpu(), ref.double().cpu()
    denom = ref.norm()
    return (out - ref).norm().item() if denom == 0 else ((out - ref).norm() / denom).item()


def rand(shape, seed, dtype=torch.float64, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(device=DEVICE, dtype=dtype)


def ln_operands(shape, dtype, seed=0):
    """x (offset and scaled, as a residual stream), w, b, dy, gdx, gdw, gdb, rounded to dtype."""
    d = shape[-1]
    return [rand(shape, seed, dtype, 3.0, 1.0), rand((d,), seed + 1, dtype, 0.5, 1.0), rand((d,), seed + 2, dtype),
            rand(shape, seed + 3, dtype), rand(shape, seed + 4, dtype), rand((d,), seed + 5, dtype),
            rand((d,), seed + 6, dtype)]


# -------------------------------------------------------------------------- float64: the derivation
@pytest.mark.parametrize("shape", [(2, 5, 12), (7, 3), (1, 33)])
def test_layer_norm_gradcheck_and_gradgradcheck_float64(shape):
    x, w, b = (t.requires_grad_() for t in ln_operands(shape, torch.float64)[:3])
    fn = lambda x, w, b: layer_norm(x, w, b, EPS)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_gelu_gradcheck_and_gradgradcheck_float64():
    x = rand((4, 37), 0, scale=2.0).requires_grad_()
    assert torch.autograd.gradcheck(gelu, (x,))
    assert torch.autograd.gradgradcheck(gelu, (x,))


def _second_order(fn, ins, dy, cotangents):
    """Output, first derivatives (create_graph) and the total derivatives of <cotangents, firsts>."""
    y = fn(*ins)
    firsts = torch.autograd.grad(y, ins, dy, create_graph=True)
    pulled = sum((f * c).sum() for f, c in zip(firsts, cotangents))
    seconds = torch.autograd.grad(pulled, (*ins, dy), allow_unused=True)
    return y, firsts, [torch.zeros_like(t) if s is None else s for s, t in zip(seconds, (*ins, dy))]


def test_layer_norm_reference_matches_aten_float64():
    x, w, b, dy, gdx, gdw, gdb = ln_operands((197, 40), torch.float64)
    ins = [t.clone().requires_grad_() for t in (x, w, b)]
    dy = dy.clone().requires_grad_()
    ref = _second_order(lambda x, w, b: F.layer_norm(x, (40,), w, b, EPS), ins, dy, (gdx, gdw, gdb))
    got = _second_order(lambda x, w, b: layer_norm(x, w, b, EPS), ins, dy, (gdx, gdw, gdb))
    for level_got, level_ref in zip(got, ref):
        for g, r in zip(level_got if isinstance(level_got, list | tuple) else [level_got],
                        level_ref if isinstance(level_ref, list | tuple) else [level_ref]):
            assert rel_err(g, r) < 1e-12


def test_gelu_reference_matches_aten_float64():
    x, dy, gdx = rand((50, 80), 0, scale=2.0).requires_grad_(), rand((50, 80), 1).requires_grad_(), rand((50, 80), 2)
    ref = _second_order(F.gelu, [x], dy, [gdx])
    got = _second_order(gelu, [x], dy, [gdx])
    assert rel_err(got[0], ref[0]) < 1e-14
    assert rel_err(got[1][0], ref[1][0]) < 1e-14
    for g, r in zip(got[2], ref[2]):
        assert rel_err(g, r) < 1e-13


# -------------------------------------------------------------------------- kernels vs the reference
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LN_SHAPES, ids=str)
def test_layer_norm_kernels(shape, dtype):
    ops = ln_operands(shape, dtype)
    x, w, b, dy, gdx, gdw, gdb = ops
    xd, wd, bd, dyd, gdxd, gdwd, gdbd = (t.double() for t in ops)
    y, mean, rstd = L.ln_fwd(x, w, b, EPS)
    y_ref, mean_ref, rstd_ref = L.reference_fwd(xd, wd, bd, EPS)
    assert y.dtype == dtype and mean.dtype == rstd.dtype == torch.float32 and mean.shape == shape[:-1]
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(mean, mean_ref) < 1e-6 and rel_err(rstd, rstd_ref) < 1e-6
    firsts = L.ln_bwd(x, w, mean, rstd, dy)
    refs = L.reference_bwd(xd, wd, mean_ref, rstd_ref, dyd)
    seconds = L.ln_bwdbwd(x, w, mean, rstd, dy, gdx, gdw, gdb)
    refs2 = L.reference_bwdbwd(xd, wd, mean_ref, rstd_ref, dyd, gdxd, gdwd, gdbd)
    for name, got, ref in zip(("dx", "dw", "db", "gx", "gw", "gdy"), (*firsts, *seconds), (*refs, *refs2)):
        assert got.dtype == dtype and got.shape == ref.shape, name
        if shape[-1] == 1 and name in ("dx", "dw", "gx", "gw"):  # xhat = 0: exactly zero
            assert rel_err(got, ref) == 0, name
            continue
        assert rel_err(got, ref) < TOL[dtype] * (4 if name in ("gx", "gw") else 1), name


def test_layer_norm_strided_input_and_fp32_parameters():
    """x a strided view (row stride 2D, read in place), fp16 x with fp32 weight and bias (gradients
    of the parameters in their own dtype)."""
    base, w, b, dy, gdx, gdw, gdb = ln_operands((50, 160), torch.float32)
    x = base[:, :80]  # row stride 160: a view the kernels read in place
    w, b, gdw, gdb = w[:80], b[:80], gdw[:80], gdb[:80]
    dy, gdx = dy[:, :80].contiguous(), gdx[:, :80].contiguous()
    args = (x.half(), w, b)
    y, mean, rstd = L.ln_fwd(*args, EPS)
    dx, dw, db = L.ln_bwd(x.half(), w, mean, rstd, dy.half())
    gx, gw, gdy = L.ln_bwdbwd(x.half(), w, mean, rstd, dy.half(), gdx.half(), gdw, gdb)
    assert y.dtype == dx.dtype == gx.dtype == gdy.dtype == torch.float16
    assert dw.dtype == db.dtype == gw.dtype == torch.float32
    xd = x.half().double()
    y_ref, m_ref, r_ref = L.reference_fwd(xd, w.double(), b.double(), EPS)
    refs = L.reference_bwd(xd, w.double(), m_ref, r_ref, dy.half().double())
    refs2 = L.reference_bwdbwd(xd, w.double(), m_ref, r_ref, dy.half().double(), gdx.half().double(),
                               gdw.double(), gdb.double())
    for got, ref in zip((y, dx, dw, db, gx, gw, gdy), (y_ref, *refs, *refs2)):
        assert rel_err(got, ref) < 8e-3
    # the same numbers as from a contiguous copy: the row stride was honoured
    torch.testing.assert_close(L.ln_fwd(x, w, b, EPS)[0], L.ln_fwd(x.contiguous(), w, b, EPS)[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(197, 40), (1, 1), (3, 50, 192), (1025,)], ids=str)
def test_gelu_kernels(shape, dtype):
    x, dy, gdx = rand(shape, 0, dtype, 2.5), rand(shape, 1, dtype), rand(shape, 2, dtype)
    xd, dyd, gdxd = x.double(), dy.double(), gdx.double()
    assert rel_err(G.gelu_fwd(x), F.gelu(xd)) < TOL[dtype]
    assert rel_err(G.gelu_bwd(x, dy), G.reference_bwd(xd, dyd)) < TOL[dtype]
    for got, ref in zip(G.gelu_bwdbwd(x, dy, gdx), G.reference_bwdbwd(xd, dyd, gdxd)):
        assert got.dtype == dtype and rel_err(got, ref) < TOL[dtype]
    # a transposed input is read through one contiguous copy, same values
    xt = rand(shape[::-1], 3, dtype).transpose(0, -1) if len(shape) > 1 else x
    assert rel_err(G.gelu_fwd(xt), F.gelu(xt.double())) < TOL[dtype]


# -------------------------------------------------------------------------- second order through the ops
def _restoration_like(ln, act, x, w, b, w2, r):
    """E = <w2, act(ln(x))>, g = dE/dx with create_graph, loss = <r, g>: gradients of the loss
    w.r.t. x, w, b, w2 (a restoration step's second-order structure, both ops chained)."""
    energy = (act(ln(x, w, b)) * w2).sum()
    g, = torch.autograd.grad(energy, x, create_graph=True)
    return torch.autograd.grad((g * r).sum(), (x, w, b, w2))


def test_second_order_chain_fp32_kernels_match_float64_aten():
    x, w, b, w2, r = ln_operands((197, 40), torch.float32)[:5]
    ins = [t.clone().requires_grad_() for t in (x, w, b, w2)]
    got = _restoration_like(lambda x, w, b: layer_norm(x, w, b, EPS), gelu, *ins, r)
    ins_d = [t.detach().double().requires_grad_() for t in (x, w, b, w2)]
    ref = _restoration_like(lambda x, w, b: F.layer_norm(x, (40,), w, b, EPS), F.gelu, *ins_d, r.double())
    for name, g_, r_ in zip(("x", "w", "b", "w2"), got, ref):
        assert rel_err(g_, r_) < 1e-5, name


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_double_backward_runs_the_fused_ops_only():
    """The inner create_graph gradient runs ln_bwd / gelu_bwd, the outer backward ln_bwdbwd /
    gelu_bwdbwd and ln_bwd once more (gelu_bwdbwd's gx reaches x through the LayerNorm), never
    aten's LayerNorm or GELU."""
    x, w, b, w2, r = (t.requires_grad_() for t in ln_operands((50, 80), torch.float32)[:5])
    with _Ops() as mode:
        _restoration_like(lambda x, w, b: layer_norm(x, w, b, EPS), gelu, x, w, b, w2, r)
    ours = [n for n in mode.names if n.startswith("energyvit::")]
    assert sorted(ours) == sorted(["energyvit::ln_fwd", "energyvit::gelu_fwd", "energyvit::gelu_bwd",
                                   "energyvit::ln_bwd", "energyvit::ln_bwdbwd", "energyvit::gelu_bwdbwd",
                                   "energyvit::ln_bwd"]), ours
    assert not [n for n in mode.names if ("layer_norm" in n or "gelu" in n) and not n.startswith("energyvit::")]


def test_third_derivative_raises():
    x = rand((3, 8), 0, torch.float32).requires_grad_()
    y = gelu(x)
    g, = torch.autograd.grad(y.sum(), x, create_graph=True)
    gg, = torch.autograd.grad((g * g).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gg.sum(), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(dtype):
    x, w, b, dy, gdx, gdw, gdb = ln_operands((13, 40), dtype)
    _, mean, rstd = L.ln_fwd(x, w, b, EPS)
    cases = [(layernorm_ops.ln_fwd, (x, w, b, EPS)), (layernorm_ops.ln_bwd, (x, w, mean, rstd, dy)),
             (layernorm_ops.ln_bwdbwd, (x, w, mean, rstd, dy, gdx, gdw, gdb)),
             (gelu_ops.gelu_fwd, (x,)), (gelu_ops.gelu_bwd, (x, dy)), (gelu_ops.gelu_bwdbwd, (x, dy, gdx))]
    for op, args in cases:
        # inputs of the fwd and bwd ops require grad, so opcheck exercises their autograd formulas
        # (the bwdbwd ops have none: a third derivative raises)
        if "bwdbwd" not in op._name:
            args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.dtype == dtype else a
                         for a in args)
        torch.library.opcheck(op, args)


# -------------------------------------------------------------------------- bad inputs
def test_bad_inputs_are_one_clear_error():
    x, w, b = ln_operands((4, 8), torch.float32)[:3]
    with pytest.raises(ValueError, match=r"weight shape \(7,\) must be \(8,\)"):
        layer_norm(x, w[:7], b)
    with pytest.raises(TypeError, match="unsupported dtype torch.int64"):
        gelu(torch.ones(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="exceeds fused LayerNorm's maximum"):
        layer_norm(torch.zeros(1, L.MAX_DIM + 1, device=DEVICE), torch.ones(L.MAX_DIM + 1, device=DEVICE),
                   torch.zeros(L.MAX_DIM + 1, device=DEVICE))
    with pytest.raises(ValueError, match="eps must be a positive float"):
        layer_norm(x, w, b, eps=0.0)
    with pytest.raises(TypeError, match="both or neither must be float64"):
        layer_norm(x.double(), w, b)
    if not ON_GPU:
        with pytest.raises(TypeError, match="bfloat16"):
            gelu(x.bfloat16())
