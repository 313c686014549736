"""pytest-benchmark microbenchmarks: `python -m pytest bench -q` (ENERGYVIT_BENCH=smoke: tiny sizes).

Sizes come from energyvit.benchmark.PRESETS: `gpu` on CUDA, else `cpu`, or `smoke` when
ENERGYVIT_BENCH=smoke. On CPU the fused Triton kernels run through the interpreter, which must be
switched on before triton is imported: hence here, at conftest import.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "compiled: rows that torch.compile (slow on CPU)")
