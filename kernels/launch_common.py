"""What the LayerNorm and GELU launchers share: interpreter detection, the poison flag, output
allocation, device and dtype checks, and the row-layout helper.

float64 never reaches a kernel: the launchers run their torch reference formulas for it (the same
math, in aten ops), which is what float64 gradcheck / gradgradcheck of the custom ops check.
"""
from __future__ import annotations

import torch

try:  # triton >= 3.2 reads TRITON_INTERPRET through knobs; the jit decorator decides at import.
    from triton import knobs as _knobs

    INTERPRET: bool = bool(_knobs.runtime.interpret)
except Exception:  # pragma: no cover - older triton
    import os

    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Debug/test flag: when True, every output (and partial-sum buffer) is allocated filled with NaN
#: instead of torch.empty, so an element that a kernel forgets to write shows up.
POISON_OUTPUTS: bool = False

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: dtypes the ops accept: the kernel dtypes, and float64 (the torch reference formulas).
SUPPORTED_DTYPES = KERNEL_DTYPES + (torch.float64,)


def alloc(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def uses_reference(t: torch.Tensor) -> bool:
    """float64 runs the torch reference formulas (no kernel), on any device."""
    return t.dtype == torch.float64


def check_tensor(t, name: str, what: str) -> None:
    """One clear TypeError/ValueError if `t` cannot go to `what`'s kernels (or its float64 reference)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}; {what} supports float32, float16, bfloat16 "
                        "(and float64 through its torch reference)")
    if t.dtype == torch.float64 or t.device.type == "cuda":
        return
    if t.device.type != "cpu":
        raise ValueError(f"{name} is on device {t.device}; {what} supports CUDA (or CPU with TRITON_INTERPRET=1)")
    if not INTERPRET:
        raise ValueError(f"{name} is a CPU tensor but the Triton interpreter is off: set TRITON_INTERPRET=1 "
                         f"before triton is imported to run the {what} kernels on CPU, or use CUDA tensors")
    if t.dtype == torch.bfloat16:
        raise TypeError(f"{name} is bfloat16: the Triton interpreter runs {what} in float32/float16 only "
                        "(bf16 runs on CUDA)")


def rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """t as an (M, d) matrix with unit column stride, without a copy when it already is one."""
    m = t.reshape(-1, d)
    return m if m.stride(-1) == 1 or d == 1 else m.contiguous()


_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); persistent grids size to it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    n = _SM_COUNT.get(index)
    if n is None:
        n = _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return n
