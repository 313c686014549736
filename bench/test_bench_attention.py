"""Attention fwd / bwd / bwd-of-bwd per backend (pytest-benchmark).

A backend that cannot run an op (no second derivative, not installed) is skipped with the first
line of the error it raised; `energyvit bench` records the same as table rows.
"""
import pytest

from _sizes import DEVICE, SIZES, synced
from energyvit.benchmark import ATTN_OPS, DTYPES, Unavailable, attention_backends, attention_op, first_line


@pytest.mark.parametrize("shape", SIZES["attn"], ids=lambda s: "B{}H{}N{}d{}".format(*s))
@pytest.mark.parametrize("op", ATTN_OPS)
@pytest.mark.parametrize("backend", attention_backends(DEVICE))
def test_attention(benchmark, backend, op, shape):
    try:
        fn = attention_op(backend, op, shape, DTYPES[SIZES["attn_dtype"]], DEVICE)
    except Unavailable as e:
        pytest.skip(f"unavailable: {e}")
    except Exception as e:  # noqa: BLE001
        if backend in ("math-eager", "fused"):
            raise
        pytest.skip(f"unsupported: {first_line(e)}")
    B, H, N, d = shape
    benchmark.extra_info.update(backend=backend, op=op, flop=4.0 * B * H * N * N * d * {"fwd": 1, "bwd": 2.5, "bwdbwd": 6}[op])
    benchmark.pedantic(synced(fn), rounds=5 if DEVICE.type == "cpu" else 50, warmup_rounds=1, iterations=1)
