"""Fused Triton attention (energyvit.kernels) against the eager math path.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
when CUDA is unavailable). The interpreter has no float64, so the fused ops run in float32 /
float16 and are compared with energyvit.attention.math_attention evaluated in float64.

Error metric: relative Frobenius error ||fused - ref|| / ||ref|| per output tensor.
Tolerances (``TOL[(device, dtype)]``), all levels (forward, first and second derivatives):
  - CPU interpreter float32: 2e-5  (fp32 dots are exact IEEE there; measured ~4e-7 .. 2e-6)
  - CPU interpreter float16: 1e-2  (fp16 tiles and outputs; measured ~3e-4 .. 1e-3)
  - CUDA float32: 1e-2 (tl.dot on fp32 uses TF32 on GPU by default)
  - CUDA float16: 1e-2, CUDA bfloat16: 5e-2
bfloat16 is tested on CUDA only (bf16 tl.dot is wrong in the interpreter, triton#11584).
gradgradcheck runs in float32 (fast mode, eps=1e-2, atol=1e-3, rtol=1e-2): central
differences in fp32 with eps=1e-2 carry ~1e-4 truncation and ~1e-5 rounding error.

Every test runs with POISON_OUTPUTS=True: launchers allocate outputs (and the internal
row-statistics buffers) filled with NaN, and every compared tensor must come out finite.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from energyvit.attention import math_attention
from energyvit.kernels import attention, attn_bwd, attn_bwdbwd, attn_fwd

from energyvit.kernels import triton_attention as K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
TOL = {
    ("cpu", torch.float32): 2e-5,
    ("cpu", torch.float16): 1e-2,
    ("cuda", torch.float32): 1e-2,
    ("cuda", torch.float16): 1e-2,
    ("cuda", torch.bfloat16): 5e-2,
}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(K, "POISON_OUTPUTS", True)
    if not ON_GPU:
        assert K.INTERPRET, "tests on CPU need TRITON_INTERPRET=1 before triton is imported"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite values in fused output (unwritten poisoned tile?)"
    out, ref = out.double().cpu(), ref.double().cpu()
    denom = ref.norm()
    if denom == 0:
        return out.norm().item()
    return ((out - ref).norm() / denom).item()


def rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=DEVICE, dtype=dtype)


def qkv(shape, dtype, seed=0):
    return [rand(shape, dtype, seed + i) for i in range(3)]


def check(outs, refs, dtype, what):
    tol = TOL[(DEVICE, dtype)]
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert o.shape == r.shape and o.dtype == dtype, (what, i, o.shape, o.dtype)
        err = rel_err(o, r)
        assert err < tol, f"{what}[{i}] rel err {err:.3e} >= {tol:.1e}"


# -------------------------------------------------------------------------------- forward
FWD_CASES = [  # (batch, heads, N, head_dim, dtype)
    (1, 3, 197, 40, torch.float32),
    (5, 1, 50, 64, torch.float32),
    (3, 1, 1, 32, torch.float32),
    (1, 2, 50, 80, torch.float16),
    (1, 1, 33, 128, torch.float32),
    (1, 2, 50, 64, torch.bfloat16),
]


@pytest.mark.parametrize("b,h,n,d,dtype", FWD_CASES)
def test_forward(b, h, n, d, dtype):
    if dtype not in DTYPES:
        pytest.skip("bfloat16 only on CUDA (interpreter bf16 tl.dot is wrong)")
    q, k, v = qkv((b, h, n, d), dtype)
    scale = 0.7 * d ** -0.5
    o, lse = attn_fwd(q, k, v, scale)
    qd, kd, vd = (t.double() for t in (q, k, v))
    s = torch.matmul(qd, kd.transpose(-2, -1)) * scale
    check([o], [math_attention(qd, kd, vd, scale)], dtype, "o")
    assert lse.dtype == torch.float32 and lse.shape == (b, h, n)
    assert rel_err(lse, torch.logsumexp(s, -1)) < 1e-5
    check([attention(q, k, v)], [math_attention(qd, kd, vd)], dtype, "attention(default scale)")


# -------------------------------------------------------------------------------- first derivatives
BWD_CASES = [
    (1, 3, 197, 40, torch.float32),
    (5, 1, 50, 32, torch.float32),
    (3, 1, 1, 64, torch.float32),
    (1, 2, 50, 80, torch.float16),
    (1, 1, 40, 128, torch.float32),
    (2, 1, 100, 64, torch.bfloat16),
]


@pytest.mark.parametrize("b,h,n,d,dtype", BWD_CASES)
def test_first_derivatives(b, h, n, d, dtype):
    if dtype not in DTYPES:
        pytest.skip("bfloat16 only on CUDA")
    shape = (b, h, n, d)
    q, k, v = (t.requires_grad_() for t in qkv(shape, dtype))
    do = rand(shape, dtype, 10)
    grads = torch.autograd.grad(attention(q, k, v), (q, k, v), do)
    refs_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    refs = torch.autograd.grad(math_attention(*refs_in), refs_in, do.double())
    check(grads, refs, dtype, "dq,dk,dv")


# -------------------------------------------------------------------------------- second derivatives
def _restoration_like(att, q, k, v, w, r):
    """E = <w, att(q,k,v)>; g = dE/d(q,k,v) with create_graph; L = <r, g>; returns dL/d(q,k,v,w)."""
    e = (att(q, k, v) * w).sum()
    g = torch.autograd.grad(e, (q, k, v), create_graph=True)
    loss = sum((gi * ri).sum() for gi, ri in zip(g, r))
    return torch.autograd.grad(loss, (q, k, v, w))


BWDBWD_CASES = [
    (1, 3, 197, 40, torch.float32),
    (1, 3, 50, 40, torch.float32),
    (1, 1, 40, 128, torch.float32),
    (5, 1, 37, 32, torch.float32),
    (3, 1, 1, 64, torch.float32),
    (1, 1, 33, 80, torch.float32),
    (1, 2, 40, 64, torch.float16),
    (2, 1, 100, 64, torch.bfloat16),
]


@pytest.mark.parametrize("b,h,n,d,dtype", BWDBWD_CASES)
def test_second_derivatives(b, h, n, d, dtype):
    """Double backward vs float64 math; w requires grad, so the gdo output is checked too."""
    if dtype not in DTYPES:
        pytest.skip("bfloat16 only on CUDA")
    shape = (b, h, n, d)
    ins = [t.requires_grad_() for t in qkv(shape, dtype)] + [rand(shape, dtype, 20).requires_grad_()]
    r = [rand(shape, dtype, 30 + i) for i in range(3)]
    got = _restoration_like(attention, *ins, r)
    ins_d = [t.detach().double().requires_grad_() for t in ins]
    ref = _restoration_like(math_attention, *ins_d, [t.double() for t in r])
    check(got, ref, dtype, "d2 wrt q,k,v,w")


def test_unrolled_restoration_parameter_grads():
    """Two gradient steps x <- x - a dE/dx (create_graph) then loss.backward(): weight grads."""
    n, c, heads, d = 30, 24, 2, 16

    def run(att, dtype):
        g = torch.Generator().manual_seed(11)
        w_qkv = (torch.randn(c, 3 * heads * d, generator=g) * 0.3).to(DEVICE, dtype).requires_grad_()
        x = torch.randn(2, n, c, generator=g).to(DEVICE, dtype).requires_grad_()
        target = torch.randn(2, n, heads * d, generator=g).to(DEVICE, dtype)

        def energy(x):
            q, k, v = (x @ w_qkv).view(2, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
            o = att(q, k, v)
            return 0.5 * (o ** 2).sum() + (o.transpose(1, 2).reshape(2, n, heads * d) * target).sum()

        for _ in range(2):
            (gx,) = torch.autograd.grad(energy(x), x, create_graph=True)
            x = x - 0.1 * gx
        loss = (x ** 2).sum()
        loss.backward()
        return w_qkv.grad

    got, ref = run(attention, torch.float32), run(math_attention, torch.float64)
    check([got], [ref], torch.float32, "dloss/dW_qkv")


def test_second_derivatives_partial_cotangents():
    """Only dq feeds the outer loss: the None cotangents of dk, dv must be handled as zeros."""
    shape = (1, 2, 45, 32)
    q, k, v = (t.requires_grad_() for t in qkv(shape, torch.float32, seed=3))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = []
    for att, (a, b, c) in ((attention, (q, k, v)), (math_attention, (qd, kd, vd))):
        (gq,) = torch.autograd.grad((att(a, b, c) ** 2).sum(), a, create_graph=True)
        out.append(torch.autograd.grad((gq ** 3).sum(), (a, b, c)))
    check(out[0], out[1], torch.float32, "d2 (dq only)")


def test_bwdbwd_op_against_autograd_of_math():
    """attn_bwdbwd directly: total derivatives of <gdq,dq>+<gdk,dk>+<gdv,dv> w.r.t. q, k, v, do."""
    shape, scale = (1, 3, 70, 40), 0.3
    q, k, v, do, gdq, gdk, gdv = (rand(shape, torch.float32, 40 + i) for i in range(7))
    o, lse = attn_fwd(q, k, v, scale)
    got = attn_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, scale)
    xd = [t.double().requires_grad_() for t in (q, k, v, do)]
    dq, dk, dv = torch.autograd.grad(math_attention(*xd[:3], scale), xd[:3], xd[3], create_graph=True)
    loss = (dq * gdq.double()).sum() + (dk * gdk.double()).sum() + (dv * gdv.double()).sum()
    check(got, torch.autograd.grad(loss, xd), torch.float32, "gq,gk,gv,gdo")


def test_gradcheck_and_gradgradcheck_fp32():
    """Finite-difference checks of the fused path itself (fp32, fast mode; see module doc)."""
    ins = [t.requires_grad_() for t in qkv((1, 2, 7, 8), torch.float32, seed=5)]
    fn = lambda a, b, c: attention(a, b, c, scale=0.6)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "inputs are not double precision"
        assert torch.autograd.gradcheck(fn, ins, eps=1e-2, atol=1e-3, rtol=1e-2, fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, ins, eps=1e-2, atol=1e-3, rtol=1e-2, fast_mode=True)


def test_double_backward_launches_only_bwdbwd(monkeypatch):
    """Each level launches exactly its own kernels (no wasted attn_bwd on zero cotangents)."""
    calls = []
    for name in ("attn_fwd", "attn_bwd", "attn_bwdbwd"):
        fn = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _f=fn, _n=name: calls.append(_n) or _f(*a))
    q, k, v, do = (rand((1, 2, 20, 16), torch.float32, i).requires_grad_() for i in range(4))
    o = attention(q, k, v)
    g = torch.autograd.grad(o, (q, k, v), do, create_graph=True)
    assert calls == ["attn_fwd", "attn_bwd"]
    torch.autograd.grad(g, (q, k, v, do), [rand(q.shape, torch.float32, 9 + i) for i in range(3)])
    assert calls == ["attn_fwd", "attn_bwd", "attn_bwdbwd"]


def test_third_derivative_raises():
    """attn_bwdbwd has no autograd formula: a third derivative must fail loudly, not be dropped."""
    q = rand((1, 1, 8, 16), torch.float32, 0).requires_grad_()
    k, v = rand((1, 1, 8, 16), torch.float32, 1), rand((1, 1, 8, 16), torch.float32, 2)
    (g,) = torch.autograd.grad((attention(q, k, v) ** 2).sum(), q, create_graph=True)
    (g2,) = torch.autograd.grad((g ** 2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="attn_bwdbwd"):
        torch.autograd.grad(g2.sum(), q)


# -------------------------------------------------------------------------------- layout, poison, determinism
def test_non_contiguous_inputs_and_expanded_grad():
    b, n, h, d = 2, 50, 3, 40
    qkv_packed = rand((b, n, 3, h, d), torch.float32, 7)
    q, k, v = (t.requires_grad_() for t in qkv_packed.permute(2, 0, 3, 1, 4).unbind(0))
    assert not q.is_contiguous()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    o = attention(q, k, v)
    assert o.is_contiguous()
    check([o], [math_attention(qd, kd, vd)], torch.float32, "o")
    # o.sum() backward feeds an expanded (stride-0) cotangent to the kernels
    check(torch.autograd.grad(o.sum(), (q, k, v)),
          torch.autograd.grad(math_attention(qd, kd, vd).sum(), (qd, kd, vd)), torch.float32, "grads")


def test_poison_is_active_and_overwritten():
    assert K._alloc((2, 3), torch.float32, DEVICE).isnan().all()
    shape, scale = (1, 3, 197, 40), 0.2
    q, k, v, do, gdq, gdk, gdv = (rand(shape, torch.float32, 50 + i) for i in range(7))
    o, lse = attn_fwd(q, k, v, scale)
    outs = [o, lse, *attn_bwd(q, k, v, o, lse, do, scale)]
    outs += attn_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, scale)
    for i, t in enumerate(outs):
        assert torch.isfinite(t).all(), f"output {i} has unwritten (NaN) entries"


def test_deterministic():
    shape, scale = (1, 2, 70, 32), 0.25
    q, k, v, do, gdq, gdk, gdv = (rand(shape, torch.float32, 60 + i) for i in range(7))
    o, lse = attn_fwd(q, k, v, scale)
    a = attn_bwd(q, k, v, o, lse, do, scale) + attn_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, scale)
    b = attn_bwd(q, k, v, o, lse, do, scale) + attn_bwdbwd(q, k, v, o, lse, do, gdq, gdk, gdv, scale)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# -------------------------------------------------------------------------------- torch.library
def test_opcheck():
    shape, scale = (1, 2, 20, 16), 0.25
    q, k, v, do, gdq, gdk, gdv = (rand(shape, torch.float32, 70 + i) for i in range(7))
    o, lse = attn_fwd(q, k, v, scale)
    ops = torch.ops.energyvit
    cases = [
        (ops.attn_fwd.default, (q.clone().requires_grad_(), k.clone().requires_grad_(), v, scale)),
        (ops.attn_bwd.default, (q.clone().requires_grad_(), k, v, o, lse, do.clone().requires_grad_(), scale)),
        (ops.attn_bwdbwd.default, (q, k, v, o, lse, do, gdq, gdk, gdv, scale)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# -------------------------------------------------------------------------------- clear errors
def _good(shape=(1, 2, 8, 16), dtype=torch.float32):
    return qkv(shape, dtype)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: [t[0] for t in _good()], ValueError, "4-D"),
        (lambda: (lambda q, k, v: (q, k[:, :, :5], v))(*_good()), ValueError, "does not match q shape"),
        (lambda: (lambda q, k, v: (q, k.half(), v))(*_good()), TypeError, "dtype"),
        (lambda: _good(dtype=torch.float64), TypeError, "unsupported dtype"),
        (lambda: [t.to(torch.int32) for t in _good()], TypeError, "unsupported dtype"),
        (lambda: _good(shape=(1, 1, 8, 129)), ValueError, "head_dim"),
        (lambda: _good(shape=(1, 1, 0, 16)), ValueError, "empty"),
        (lambda: (lambda q, k, v: (q, k.to("meta"), v))(*_good()), ValueError, "device|on meta"),
        (lambda: (lambda q, k, v: (q.numpy(), k, v))(*[t.cpu() for t in _good()]), TypeError, "torch.Tensor"),
    ],
)
def test_clear_errors(make, exc, match):
    q, k, v = make()
    with pytest.raises(exc, match=match):
        attention(q, k, v)
    with pytest.raises(exc, match=match):
        K.attn_fwd(q, k, v, 0.5)


def test_error_bf16_under_interpreter_and_cpu_without_interpreter(monkeypatch):
    if ON_GPU:
        pytest.skip("CPU-only behaviour")
    with pytest.raises(TypeError, match="bfloat16"):
        attention(*_good(dtype=torch.bfloat16))
    monkeypatch.setattr(K, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        attention(*_good())


def test_error_bad_scale_and_bwd_inputs():
    q, k, v = _good()
    with pytest.raises(TypeError, match="scale"):
        attention(q, k, v, scale=float("nan"))
    o, lse = attn_fwd(q, k, v, 0.5)
    with pytest.raises(TypeError, match="lse must be float32"):
        K.attn_bwd(q, k, v, o, lse.half(), o, 0.5)
    with pytest.raises(ValueError, match="do shape"):
        K.attn_bwd(q, k, v, o, lse, o[:, :1], 0.5)
    with pytest.raises(ValueError, match="gdv shape"):
        K.attn_bwdbwd(q, k, v, o, lse, o, o, o, o[..., :8], 0.5)
