"""Test setup: run Triton kernels through the interpreter on machines without CUDA.

TRITON_INTERPRET must be set before triton is imported (the jit decorator reads it), so it is
set here, at conftest import, before any test module imports energyvit.kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
