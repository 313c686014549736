"""Test setup: run Triton kernels through the interpreter on machines without CUDA.

TRITON_INTERPRET must be set before triton is imported (the jit decorator reads it), so it is
set here, at conftest import, before any test module imports energyvit.kernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """One torch thread: the test machines' cores are shared, and more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
