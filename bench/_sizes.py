"""Shared settings of the pytest-benchmark files (sizes from energyvit.benchmark.PRESETS)."""
import os

import torch

from energyvit.benchmark import PRESETS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODE = os.environ.get("ENERGYVIT_BENCH", "")
PRESET = "smoke" if MODE == "smoke" else ("gpu" if DEVICE.type == "cuda" else "cpu")
SIZES = PRESETS[PRESET]
# compiling a training step takes about a minute per row on CPU: only on CUDA or when asked for
COMPILE_STEPS = DEVICE.type == "cuda" or MODE == "full"


def synced(fn):
    if DEVICE.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run
