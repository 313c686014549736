"""Which block config an attention kernel launches with, per launch key (no triton, no GPU here).

``ConfigChooser.choose(key, deterministic, capturing, bench)`` decides, in this order:

1. deterministic mode (``ENERGYVIT_DETERMINISTIC=1`` in the environment, or
   ``triton_attention.DETERMINISTIC = True``): the pinned config for the key's head dim. Nothing
   is timed, so two runs on the same device and shape launch the same code and give bit-identical
   results (the kernels have no atomics; see docs/kernels.md for which configs differ in rounding).
2. a config already chosen for this key in this process, or loaded with ``load``: that one.
3. a CUDA-graph capture is under way: no benchmarking (timing inside a capture would record the
   candidates' launches into the graph and measure nothing). The config of the nearest key tuned
   before (same device, dtype, head dim and memory layout; nearest N, then batch * heads), else
   the pinned one; the choice is not cached, so the key is still tuned at its first launch outside
   a capture. A warning says so once per key: warm up every shape before capturing.
4. otherwise: ``bench(config)`` times each candidate (ms; ``inf`` if it fails to compile or run),
   and the fastest is kept for the key.

The launch key is everything that changes the best config: the device's compute capability, the
dtype, batch, heads, N, head dim and the (batch, head, row) strides of the three operand families
(which tell the packed qkv layout from a (B, H, N, d) one). Configs are tuples
``(BLOCK_M, BLOCK_N, num_warps, num_stages[, {variant constexprs}])`` as in
``triton_attention.AUTOTUNE_CONFIGS``.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Callable, NamedTuple

DETERMINISTIC_ENV = "ENERGYVIT_DETERMINISTIC"


def deterministic_from_env() -> bool:
    """ENERGYVIT_DETERMINISTIC: "1" pins the configs, "0" or unset autotunes; anything else is an error."""
    value = os.environ.get(DETERMINISTIC_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{DETERMINISTIC_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


class LaunchKey(NamedTuple):
    capability: tuple  # (major, minor) of the CUDA device
    dtype: str
    batch: int
    heads: int
    n: int
    head_dim: int
    strides: tuple  # ((b, h, row) of the q family, of the g family, of the o family)

    def layout(self) -> tuple:
        """Shape-free memory layout: per family, the order of its (batch, head, row) strides."""
        return tuple(tuple(sorted(range(3), key=lambda i, s=s: -s[i])) for s in self.strides)


def _distance(a: LaunchKey, b: LaunchKey) -> tuple:
    return (abs(math.log(a.n / b.n)), abs(math.log(a.batch * a.heads / (b.batch * b.heads))))


class ConfigChooser:
    """Chooses one kernel's config per launch key (see the module doc). ``configs`` are the
    candidates, ``pinned(head_dim)`` the deterministic choice; ``cache`` maps tuned keys to configs."""

    def __init__(self, name: str, configs: list, pinned: Callable[[int], tuple]):
        self.name = name
        self.configs = list(configs)
        self.pinned = pinned
        self.cache: dict = {}
        self._warned: set = set()

    def choose(self, key: LaunchKey, deterministic: bool, capturing: Callable[[], bool],
               bench: Callable[[tuple], float]):
        """capturing() is asked only for an untuned key (e.g. torch.cuda.is_current_stream_capturing)."""
        if deterministic:
            return self.pinned(key.head_dim)
        cfg = self.cache.get(key)
        if cfg is not None:
            return cfg
        if capturing():
            return self._without_timing(key)
        times = [bench(c) for c in self.configs]
        best = min(range(len(times)), key=times.__getitem__)
        if not math.isfinite(times[best]):
            raise RuntimeError(f"no config of attention kernel {self.name} ran for {key}")
        self.cache[key] = self.configs[best]
        return self.configs[best]

    def _without_timing(self, key: LaunchKey):
        near = [k for k in self.cache if (k.capability, k.dtype, k.head_dim, k.layout())
                == (key.capability, key.dtype, key.head_dim, key.layout())]
        cfg = self.cache[min(near, key=lambda k: _distance(k, key))] if near else self.pinned(key.head_dim)
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"attention kernel {self.name}: {key} was not tuned before this CUDA-graph capture; "
                          f"using {cfg} without timing (run every shape once before capturing)", stacklevel=4)
        return cfg

    # ---------------------------------------------------------------- persisted choices
    def dump(self) -> list:
        return [{"key": list(k._replace(capability=list(k.capability),
                                        strides=[list(s) for s in k.strides])), "config": _cfg_json(c)}
                for k, c in self.cache.items()]

    def load(self, entries: list) -> None:
        for e in entries:
            cap, dtype, b, h, n, d, strides = e["key"]
            key = LaunchKey(tuple(cap), dtype, b, h, n, d, tuple(tuple(s) for s in strides))
            cfg = _cfg_from_json(e["config"])
            if cfg not in self.configs:
                raise ValueError(f"attention config {cfg} for kernel {self.name} is not one of its candidates")
            self.cache[key] = cfg


def _cfg_json(cfg: tuple) -> list:
    return [*cfg[:4], dict(cfg[4])] if len(cfg) > 4 else list(cfg)


def _cfg_from_json(entry: list) -> tuple:
    return (*entry[:4], dict(entry[4])) if len(entry) > 4 else tuple(entry)


def save(choosers: dict, path: str) -> None:
    """Write every chooser's tuned configs to a JSON file (one object: kernel name -> entries)."""
    with open(path, "w") as f:
        json.dump({name: c.dump() for name, c in choosers.items()}, f, indent=1)


def load(choosers: dict, path: str) -> None:
    """Read a file written by ``save``: later launches with those keys use those configs, untimed."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read attention configs from {path}: {e}") from None
    if not isinstance(data, dict) or set(data) - set(choosers):
        raise ValueError(f"{path} is not an attention config file (kernels {sorted(choosers)})")
    try:
        for name, entries in data.items():
            choosers[name].load(entries)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad attention config entry: {e}") from None
