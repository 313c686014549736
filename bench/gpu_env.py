"""The env part of bench/gpu_check.sh: Python, torch, CUDA and GPU, the packages the check uses
(xformers and nvidia-ml-py are optional: their rows and fields read unavailable / n/a without
them), where energyvit and energyvit.kernels import from, and nvidia-smi's view of the GPU.
Exits non-zero when energyvit.kernels cannot be imported (every fused part would fail)."""
import importlib
import platform
import subprocess
import sys

import torch

print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("triton", "numpy", "PIL", "pytest", "pynvml", "xformers", "sklearn"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '(no version attribute)')}")
    except ImportError as e:
        print(f"  {name}: not installed ({e})")
try:
    import energyvit
    import energyvit.kernels
except ImportError as e:
    sys.exit(f"energyvit.kernels cannot be imported: {e}")
print("energyvit from", energyvit.__file__, "; energyvit.kernels from", energyvit.kernels.__file__)
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                          "--format=csv"], capture_output=True, text=True, timeout=10)
    print(smi.stdout.strip() or smi.stderr.strip())
except (OSError, subprocess.SubprocessError) as e:
    print("nvidia-smi:", e)
