"""Config choice of the attention kernels (kernels/config_choice.py and triton_attention._Launcher).

The decision (pinned in deterministic mode, tuned once per launch key, never timed inside a
CUDA-graph capture, persisted to a file) is plain Python: it is tested here on the CPU with fake
timings and a fake jit kernel. Real timing and capture need a GPU (bench/gpu_check.py).
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from energyvit.kernels import config_choice
from energyvit.kernels import triton_attention as K
from energyvit.kernels.config_choice import ConfigChooser, LaunchKey

CONFIGS = [(32, 32, 4, 1), (64, 32, 4, 2), (64, 32, 8, 2, {"TWO_SWEEP": True})]
PINNED = (32, 32, 4, 1)
PACKED = ((3 * 197 * 12 * 64, 64, 3 * 12 * 64), (3 * 197 * 12 * 64, 64, 3 * 12 * 64), (197 * 12 * 64, 64, 12 * 64))


def key(b=64, h=12, n=197, d=64, dtype="torch.bfloat16", strides=PACKED, cap=(9, 0)):
    return LaunchKey(cap, dtype, b, h, n, d, strides)


def bhnd(b=64, h=12, n=197, d=64):
    s = (h * n * d, n * d, d)
    return (s, s, s)


class Bench:
    """Fake timings: config -> ms; records what was timed."""

    def __init__(self, times):
        self.times, self.calls = times, []

    def __call__(self, cfg):
        self.calls.append(cfg)
        return self.times[CONFIGS.index(cfg)]


def never(*_):
    raise AssertionError("must not be called")


def chooser():
    return ConfigChooser("bwdbwd_q", CONFIGS, lambda d: PINNED)


def test_deterministic_mode_pins_without_timing():
    c = chooser()
    assert c.choose(key(), True, never, never) == PINNED
    assert c.choose(key(n=1024, d=32), True, never, never) == PINNED
    assert c.cache == {}


def test_tuned_once_per_key_and_key_covers_batch_heads_layout_dtype():
    c, bench = chooser(), Bench([2.0, 1.0, 3.0])
    assert c.choose(key(), False, lambda: False, bench) == CONFIGS[1]
    assert bench.calls == CONFIGS
    assert c.choose(key(), False, never, never) == CONFIGS[1]  # cached: not timed, capture not asked
    others = [key(b=8), key(h=6), key(n=256), key(d=32), key(dtype="torch.float16"), key(strides=bhnd()),
              key(cap=(8, 0))]
    for i, k in enumerate(others):
        bench.calls.clear()
        bench.times = [1.0, 2.0, 3.0] if i % 2 else [3.0, 2.0, 1.0]
        assert c.choose(k, False, lambda: False, bench) == (CONFIGS[0] if i % 2 else CONFIGS[2]), k
        assert bench.calls == CONFIGS, f"{k} was not tuned on its own"
    assert len(c.cache) == 1 + len(others)


def test_failed_configs_lose_and_all_failing_is_an_error():
    c = chooser()
    assert c.choose(key(), False, lambda: False, Bench([float("inf"), 5.0, float("inf")])) == CONFIGS[1]
    with pytest.raises(RuntimeError, match="no config of attention kernel bwdbwd_q ran"):
        c.choose(key(b=1), False, lambda: False, Bench([float("inf")] * 3))


def test_capture_never_times_and_uses_the_nearest_tuned_key():
    c = chooser()
    with pytest.warns(UserWarning, match="not tuned before this CUDA-graph capture"):
        assert c.choose(key(), False, lambda: True, never) == PINNED  # nothing tuned yet
    c.choose(key(b=64, n=197), False, lambda: False, Bench([1.0, 2.0, 3.0]))
    c.choose(key(b=64, n=1024), False, lambda: False, Bench([3.0, 1.0, 2.0]))
    c.choose(key(b=64, n=900, strides=bhnd()), False, lambda: False, Bench([3.0, 2.0, 1.0]))
    with pytest.warns(UserWarning, match="CUDA-graph capture"):
        # an eval batch at N = 256: nearest N among the same layout is 197
        assert c.choose(key(b=128, n=256), False, lambda: True, never) == CONFIGS[0]
    with pytest.warns(UserWarning):
        assert c.choose(key(b=128, n=800), False, lambda: True, never) == CONFIGS[1]  # 1024, not the bhnd 900
    with pytest.warns(UserWarning):
        assert c.choose(key(n=800, strides=bhnd(n=800)), False, lambda: True, never) == CONFIGS[2]
    with pytest.warns(UserWarning):
        assert c.choose(key(d=32), False, lambda: True, never) == PINNED  # no tuned key with head dim 32
    assert key(b=128, n=256) not in c.cache  # tuned at its first launch outside a capture
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per key
        c.choose(key(b=128, n=256), False, lambda: True, never)
    bench = Bench([3.0, 2.0, 1.0])
    assert c.choose(key(b=128, n=256), False, lambda: False, bench) == CONFIGS[2] and bench.calls == CONFIGS


def test_layout_tells_packed_from_bhnd_for_any_shape():
    assert key().layout() == key(b=2, h=3, n=50, d=40, strides=(
        (50 * 3 * 3 * 40, 40, 3 * 3 * 40), (50 * 3 * 3 * 40, 40, 3 * 3 * 40), (50 * 3 * 40, 40, 3 * 40))).layout()
    assert key().layout() != key(strides=bhnd()).layout()


def test_save_and_load_reuse_the_choices_without_timing(tmp_path):
    c = chooser()
    c.choose(key(), False, lambda: False, Bench([2.0, 3.0, 1.0]))
    c.choose(key(n=50, strides=bhnd(n=50)), False, lambda: False, Bench([1.0, 2.0, 3.0]))
    path = tmp_path / "configs.json"
    config_choice.save({"bwdbwd_q": c}, str(path))
    fresh = chooser()
    config_choice.load({"bwdbwd_q": fresh}, str(path))
    assert fresh.cache == c.cache
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fresh.choose(key(), False, never, never) == CONFIGS[2]


@pytest.mark.parametrize("content, match", [
    ("not json", "cannot read attention configs"),
    (json.dumps({"other_kernel": []}), "not an attention config file"),
    (json.dumps({"bwdbwd_q": [{"key": [[9, 0], "torch.bfloat16", 1, 1, 8, 64, [[1, 1, 1]]],
                               "config": [16, 16, 4, 1]}]}), "not one of its candidates"),
    (json.dumps({"bwdbwd_q": [{"key": [1, 2]}]}), "bad attention config entry"),
])
def test_load_bad_file_one_clear_error(tmp_path, content, match):
    path = tmp_path / "configs.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        config_choice.load({"bwdbwd_q": chooser()}, str(path))
    assert "\n" not in str(e.value)


def test_deterministic_env(monkeypatch):
    monkeypatch.delenv("ENERGYVIT_DETERMINISTIC", raising=False)
    assert config_choice.deterministic_from_env() is False
    monkeypatch.setenv("ENERGYVIT_DETERMINISTIC", "1")
    assert config_choice.deterministic_from_env() is True
    monkeypatch.setenv("ENERGYVIT_DETERMINISTIC", "yes")
    with pytest.raises(ValueError, match="ENERGYVIT_DETERMINISTIC must be 0 or 1"):
        config_choice.deterministic_from_env()


def test_pinned_configs_are_autotune_candidates():
    """So that bench/ptxas_report.py (which compiles the candidates) covers every pinned config."""
    for name in K.KERNEL_FUNCTIONS:
        for d in (16, 64, 65, 128):
            assert K.pinned_config(name, d) in K.AUTOTUNE_CONFIGS[name], (name, d)


# ------------------------------------------------------------------ the launcher's GPU path, faked
class FakeJit:
    """Stands for a @triton.jit kernel: records (grid, constexprs/options) of each launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((grid, kw))


@pytest.fixture
def gpu_path(monkeypatch):
    """K._Launcher("bwdbwd_q") on its GPU path (INTERPRET off) with a fake kernel and fake timing."""
    monkeypatch.setattr(K, "INTERPRET", False)
    monkeypatch.setattr(K, "DETERMINISTIC", False)
    launcher = K._Launcher("bwdbwd_q")
    launcher.fn = FakeJit()
    import triton.testing

    def do_bench(fn, **kw):  # every candidate runs once; 64-row configs are "fastest"
        fn()
        grid, meta = launcher.fn.launches[-1]
        return 1.0 if meta["BLOCK_M"] == 64 and meta["num_warps"] == 8 else 2.0

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    return launcher


def grid(meta):
    return (-(-197 // meta["BLOCK_M"]), 12, 64)


def test_launcher_capture_launches_once_with_pinned_config(gpu_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.warns(UserWarning, match="CUDA-graph capture"):
        gpu_path[grid, key()]("args", HEAD_D=64)
    pinned = K.pinned_config("bwdbwd_q", 64)
    ((g, kw),) = gpu_path.fn.launches  # one launch: nothing was timed
    assert kw["BLOCK_M"] == pinned[0] and kw["BLOCK_N"] == pinned[1] and kw["num_warps"] == pinned[2]
    assert kw["num_stages"] == pinned[3] and kw["HEAD_D"] == 64 and g == grid(kw)


def test_launcher_tunes_then_reuses(gpu_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    gpu_path[grid, key()]("args", HEAD_D=64)
    n = len(K.AUTOTUNE_CONFIGS["bwdbwd_q"])
    assert len(gpu_path.fn.launches) == n + 1  # each candidate timed, then the launch
    best = gpu_path.best_config
    assert best[0] == 64 and best[2] == 8 and gpu_path.fn.launches[-1][1]["TWO_SWEEP"] == K.config_meta(
        "bwdbwd_q", best)["TWO_SWEEP"]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", never)
    gpu_path[grid, key()]("args", HEAD_D=64)
    assert len(gpu_path.fn.launches) == n + 2 and gpu_path.best_config == best


def test_launcher_deterministic_mode(gpu_path, monkeypatch):
    monkeypatch.setattr(K, "DETERMINISTIC", True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", never)
    for k in (key(), key(b=3, n=50, d=32)):
        gpu_path[grid, k]("args", HEAD_D=k.head_dim)
        assert gpu_path.best_config == K.pinned_config("bwdbwd_q", k.head_dim)
    assert len(gpu_path.fn.launches) == 2 and gpu_path.chooser.cache == {}


def test_launch_key_of_the_launchers(monkeypatch):
    """The launchers' keys carry batch, heads, N, head dim, dtype and the three stride families."""
    keys = []
    for name in K.LAUNCHERS:
        monkeypatch.setattr(K, "_" + name, type("Rec", (), {"__getitem__": lambda self, gk: (
            keys.append(gk[1]), lambda *a, **kw: None)[1]})())
    monkeypatch.setattr(K, "INTERPRET", False)
    monkeypatch.setattr(K, "_capability", lambda device: (9, 0))
    qkv = torch.zeros(2, 50, 3, 4, 16, dtype=torch.float16)
    o, lse = K.attn_packed_fwd(qkv, 0.25, validate=False)
    K.attn_packed_bwd(qkv, o, lse, o, 0.25, validate=False)
    K.attn_packed_bwdbwd(qkv, o, lse, o, qkv, 0.25, validate=False)
    q = torch.zeros(2, 4, 50, 16, dtype=torch.float16)
    K.attn_fwd(q, q, q, 0.25, validate=False)
    assert len(keys) == 6
    packed, bhnd_key = keys[0], keys[-1]
    assert (packed.batch, packed.heads, packed.n, packed.head_dim, packed.dtype) == (2, 4, 50, 16, "torch.float16")
    assert packed.strides == ((50 * 3 * 64, 16, 3 * 64), (50 * 64, 16, 64))
    assert keys[1].strides == ((50 * 3 * 64, 16, 3 * 64), (50 * 3 * 64, 16, 3 * 64), (50 * 64, 16, 64))
    assert bhnd_key.strides == ((4 * 50 * 16, 50 * 16, 16), (4 * 50 * 16, 50 * 16, 16))
    assert packed.layout() != bhnd_key.layout()


# ------------------------------------------------------------------ int64 offsets
def test_offsets_past_2_31_in_the_kernels_helpers():
    """The kernels' offset helpers with products above 2^31 (h * s_h and row * s_n), run by the
    interpreter, whose int32 arithmetic wraps as the GPU's does. No tensor that large fits here, so
    the offsets are stored, not dereferenced."""
    if not K.INTERPRET:
        pytest.skip("interpreter check")
    import triton
    import triton.language as tl

    @triton.jit
    def probe(HEAD, ROWS, s_b, s_h, s_n, R: tl.constexpr, D: tl.constexpr):
        b, h = tl.program_id(2), tl.program_id(1)
        tl.store(HEAD + b * tl.num_programs(1) + h, K._head_offset(s_b, s_h))
        offs = K._row_offsets(tl.arange(0, R), tl.arange(0, D), s_n)
        tl.store(ROWS + (b * tl.num_programs(1) + h) * R * D + tl.arange(0, R)[:, None] * D
                 + tl.arange(0, D)[None, :], offs)

    s_b, s_h, s_n, rows, d, heads, batch = 3 * 2 ** 30 + 5, 2 ** 30 + 3, 2 ** 28 + 1, 16, 16, 3, 2
    head = torch.zeros(batch * heads, dtype=torch.int64)
    row = torch.zeros(batch * heads, rows, d, dtype=torch.int64)
    probe[(1, heads, batch)](head, row, s_b, s_h, s_n, R=rows, D=d)
    want = [b * s_b + h * s_h for b in range(batch) for h in range(heads)]
    assert head.tolist() == want and max(want) > 2 ** 32
    r, c = torch.arange(rows, dtype=torch.int64), torch.arange(d, dtype=torch.int64)
    assert torch.equal(row[0], r[:, None] * s_n + c[None, :]) and row.max() > 2 ** 31
