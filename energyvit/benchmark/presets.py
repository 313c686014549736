"""Names, columns and sizes of `energyvit bench`: suites, step modes, result columns, presets."""
from __future__ import annotations

import torch

from energyvit.data.throughput import DATA_SIZES

ATTN_OPS = ("fwd", "bwd", "bwdbwd")
ATTN_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "bwdbwd": 6.0}
# MAE steps: SDPA attention, eager / compiled / CUDA-graphed as the energy rows; mae-math: math
# attention, eager (the reference before issue 21)
MAE_MODES = ("mae", "mae+compiled", "mae+cuda-graphs", "mae+compiled+cuda-graphs", "mae-math")
STEP_MODES = ("eager", "compiled", "fused", "fused+compiled", "cuda-graphs", "compiled+cuda-graphs",
              "fused+cuda-graphs", "fused+compiled+cuda-graphs", *MAE_MODES)
SUITES = ("matmul", "attention", "step", "launches", "optimizer", "compile", "data")
# compile only warms the caches for another run; data times the CPU's input pipeline, not the device
DEFAULT_SUITES = tuple(s for s in SUITES if s not in ("compile", "data"))
OWN_BACKENDS = ("math-eager", "fused")  # must work at every order: a failure there is an error
GRAPH_WARMUP = 2  # ordinary steps before a cuda-graphs mode captures (autotuning, compiling)

FIELDS = [
    "suite", "op", "backend", "dtype", "model", "img_size", "restore_steps", "batch", "heads", "n", "head_dim",
    "status", "error", "ms", "ms_q1", "ms_q3", "ms_min", "ms_max", "reps", "device_ms", "attn_kernel",
    "speedup_vs_eager", "tflops", "mfu", "mfu_peak", "matmul_tflops", "images_per_s", "first_call_s",
    "grad_rel_err_vs_eager", "peak_mem_mib", "energy_j_per_image", "power_w", "sm_clock_mhz", "flop",
    "launches", "launches_vs_eager", "launch_detail", "note",
    "device", "device_name", "driver", "torch", "triton", "cuda", "python", "git_commit", "date_utc", "timer",
]

# Sizes per preset. "smoke": seconds on CPU (CI, --quick); "cpu": the CPU table; "proxy": the CPU
# launch-count proxy of a GPU step (ViT-Ti; counts do not depend on image size or batch); "gpu":
# ViT shapes (step_rep_ms: do_bench's time per step row). min_reps: the fewest timed repeats of a
# row (its median and quartiles; the step rows on a GPU take max(step_rep_ms, min_reps steps)).
# compile_steps: the (mode, K) compiled here (None: all). data: the data suite's sizes.
PRESETS = {
    "smoke": dict(attn=[(1, 2, 16, 16)], attn_dtype="fp32", steps=[("vit_pico_patch2", None, 2)],
                  ks=(1, 2), amp=None, matmul=(512, "fp32"), min_reps=3, min_time=0.05,
                  compile_steps={("compiled", 1), ("fused+compiled", 1), ("mae+compiled", "")}, data=DATA_SIZES["smoke"]),
    "cpu": dict(attn=[(2, 3, 65, 64)], attn_dtype="fp32", steps=[("vit_nano_patch4", None, 8)],
                ks=(1, 2), amp=None, matmul=(1024, "fp32"), min_reps=5, min_time=0.3, compile_steps=None,
                data=DATA_SIZES["full"]),
    "proxy": dict(attn=[(2, 3, 17, 64)], attn_dtype="fp32", steps=[("vit_tiny_patch16", 64, 2)],
                  ks=(1, 2), amp=None, matmul=(1024, "fp32"), min_reps=3, min_time=0.1, compile_steps=None,
                  data=DATA_SIZES["full"]),
    "gpu": dict(attn=[(32, 12, 197, 64), (32, 12, 577, 64)], attn_dtype="bf16",
                steps=[("vit_tiny_patch16", 224, 64), ("vit_small_patch16", 224, 64), ("vit_base_patch16", 224, 64)],
                ks=(1, 2), amp="bf16", matmul=(8192, "bf16"), min_reps=25, min_time=0.0, compile_steps=None,
                step_rep_ms=500, data=DATA_SIZES["full"]),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
