"""bench/attention_work.py: the executed-work counter of the attention kernels (counts, not times).

Checked by hand on a small case, and against the real kernels: the interpreter runs fwd, bwd and
bwd-of-bwd and every executed tl.dot is recorded with its shape, per kernel.
"""
from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest
import torch

from energyvit.kernels import triton_attention as K

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def W():
    spec = importlib.util.spec_from_file_location("attention_work", ROOT / "bench" / "attention_work.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_counts_by_hand(W):
    """N = 50, d = 40 (BLOCK_D 64), 32 x 32 blocks: 2 blocks of queries (32 and 18 valid rows) and
    2 of keys. fwd: 2 programs x 2 trips x 2 dots = 8 dots of 32 x 64 x 32 MACs; useful MACs are
    the two N x N x d matmuls, 2 * 50 * 50 * 40. One-sweep bwd-of-bwd: 2 x 2 x 11 dots in the query
    kernel (5 of 32 x 64 x 32, 6 of 32 x 32 x 64) and 2 x 2 x 8 in the key kernel."""
    fwd = W.kernel_work("fwd", (32, 32, 4, 1), 50, 40)
    assert fwd == dict(programs=2, dots=8, macs=8 * 32 * 64 * 32, useful_macs=2 * 50 * 50 * 40)
    q = W.kernel_work("bwdbwd_q", (32, 32, 4, 1, {"TWO_SWEEP": False}), 50, 40)
    assert q == dict(programs=2, dots=44, macs=44 * 32 * 64 * 32, useful_macs=11 * 50 * 50 * 40)
    kv = W.kernel_work("bwdbwd_kv", (32, 32, 4, 1), 50, 40)
    assert (kv["dots"], kv["useful_macs"]) == (32, 8 * 50 * 50 * 40)
    two = W.kernel_work("bwdbwd_q", (32, 32, 4, 1, {"TWO_SWEEP": True}), 50, 40)
    assert (two["dots"], two["useful_macs"]) == (56, 14 * 50 * 50 * 40)
    # the uniform tiling pads 50 to 64 on both sides
    assert W.kernel_work("fwd", (32, 32, 4, 1), 50, 40, W.uniform_blocks)["macs"] == 2 * 64 * 64 * 64
    # N = 197, 64 x 64 blocks, d = 64: 4 x 4 trips of 2 dots either way; 3 x 64 + 16 = 208 rows per
    # side with the 16-row tail blocks, 256 without
    assert W.kernel_work("fwd", (64, 64, 4, 3), 197, 64) == dict(programs=4, dots=32, macs=2 * 208 * 64 * 208,
                                                                 useful_macs=2 * 197 * 197 * 64)
    assert W.kernel_work("fwd", (64, 64, 4, 3), 197, 64, W.uniform_blocks)["macs"] == 2 * 256 * 64 * 256


def _model_dots(W, name, cfg, n, d) -> Counter:
    """The (M, K, N) of every dot the counter's table says a launch executes (one head)."""
    block_d = K._launch_consts(torch.float32, d, 1.0)[0]
    res, swept = (cfg[1], cfg[0]) if name in W.KEY_SIDE else cfg[:2]
    tail = K.config_meta(name, cfg)["TAIL"]
    out = Counter()
    for r, _ in K.tile_blocks(n, res, tail):
        for sweep in W.SWEEPS[name][W.variant_of(name, cfg)]:
            for s, _ in K.tile_blocks(n, swept, tail):
                for dims in sweep:
                    out[tuple({"R": r, "S": s, "D": block_d}[x] for x in dims)] += 1
    return out


@pytest.mark.parametrize("two_sweep", [False, True], ids=["one_sweep", "two_sweep"])
@pytest.mark.parametrize("n,d", [(197, 64), (50, 40), (1, 32)])
def test_counter_matches_the_kernels(W, n, d, two_sweep):
    """The table and the tiling give exactly the dots the interpreter executes, for the pinned
    configs (mixed 32/64 blocks), for 32 x 32 blocks and for configs without tail blocks (TAIL 0)."""
    variant = {"TWO_SWEEP": two_sweep}
    pinned = dict(W.pinned_configs(64), bwdbwd_q=(*K.pinned_config("bwdbwd_q", 64)[:4], variant))
    small = {name: (32, 32, 4, 1, variant) if name == "bwdbwd_q" else (32, 32, 4, 1) for name in W.SWEEPS}
    no_tail = {name: (64, 32, 4, 1, {**variant, "TAIL": 0}) for name in W.SWEEPS}
    for configs in (pinned, small, no_tail):
        got = W.interpreter_dots(configs, 1, 2, n, d)
        for name, cfg in configs.items():
            want = _model_dots(W, name, cfg, n, d)
            assert Counter(got[name]) == Counter({k: 2 * v for k, v in want.items()}), (name, cfg, n, d)
            w = W.kernel_work(name, cfg, n, d)
            assert 2 * w["dots"] == len(got[name]) and 2 * w["macs"] == sum(a * b * c for a, b, c in got[name])


def test_report_rows(W):
    rows = W.report()
    one = [r for r in rows if r["shape"] == "ViT-B/16" and r["configs"] == "pinned" and r["tiling"] == "kernels"
           and r["kernel"] == "all"]
    assert [r["pass_"] for r in one] == ["fwd", "bwd", "bwdbwd"]
    fwd = one[0]
    assert fwd["useful_macs"] == 128 * 12 * 2 * 197 * 197 * 64
    assert fwd["padding_factor"] == round(fwd["macs"] / fwd["useful_macs"], 4) >= 1
