"""Attention and training-step benchmarks with device telemetry (the `energyvit bench` command).

Rows (one per measurement; every row carries versions, git commit and device fields):

- suite ``attention``, op ``fwd`` / ``bwd`` / ``bwdbwd`` for each backend: ``math-eager``,
  ``math-compiled`` (torch.compile of energyvit.attention.math_attention), ``fused`` (Triton;
  on CPU through TRITON_INTERPRET=1), SDPA (``sdpa-default``: SDPA's own choice, as a model calls
  it; on CUDA also pinned to one kernel: ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``) and
  ``xformers`` (memory_efficient_attention) when installed. ``fwd`` times the forward pass (no
  grad), ``bwd`` the backward pass alone through a prebuilt graph, ``bwdbwd`` the double-backward
  pass alone through a prebuilt create_graph graph: ``ms`` through autograd, as a model calls it
  (host-bound at small shapes), ``device_ms`` the CUDA kernels alone (profiler), ``attn_kernel``
  what ran (for SDPA the kernel it dispatched: flash, efficient, cudnn, flash-cpu or math).
  Nominal FLOPs: fwd 4*B*H*N^2*d, bwd 2.5x that, bwdbwd 6x. Every op is actually tried: a
  backend that raises gets a row with status ``unsupported`` and the first line of the error.
- suite ``step``: one training step (no optimizer step). Energy modes ``eager``, ``compiled``
  (energyvit.compiled), ``fused`` and ``fused+compiled``, each also ``+cuda-graphs``
  (energyvit.cuda_graphs; CUDA only), on the model `pretrain` builds (energy head included):
  forward, K restoration steps with create_graph, parameter backward. MAE modes ``mae`` (SDPA
  attention in encoder and decoder), ``mae+compiled``, ``mae+cuda-graphs``,
  ``mae+compiled+cuda-graphs`` and ``mae-math`` (math attention, eager: the reference before
  issue 21): loss + backward of the MAE `pretrain --method mae` trains. FLOPs are model FLOPs
  counted analytically (energyvit.benchmark.flops); ``mfu`` divides by a matmul timed just before
  the row (``matmul_tflops``: bf16 on CUDA, fp32 on CPU), ``mfu_peak`` by the datasheet's dense
  bf16 peak of the GPU. The gradients are compared with the eager step of the same family.
- suite ``launches``: what one step of each mode launches (column ``launches``; how it was
  counted in ``timer``, a breakdown in ``launch_detail``; ``launches_vs_eager`` = row / eager).
  On CUDA: the kernels the profiler records on the device (CUPTI). On CPU, as a proxy of a GPU's
  kernel launches: for eager modes the aten ops dispatched below autograd (TorchDispatchMode)
  that launch a kernel (views and allocations do not), for compiled modes Inductor's C++ kernels
  (recorded with ``cpp.enable_kernel_profile``) plus the extern calls (matmuls, convolutions,
  custom ops) and the aten ops that run outside the compiled graph (profiler).
- suite ``optimizer``: one AdamW step as pretraining builds it (``eager``) and replayed from a
  CUDA graph (``cuda-graphs``, capturable AdamW), with the updated parameters compared.
- suite ``compile`` (not run by default): each compiled step mode compiled and not run
  (``first_call_s`` = seconds to compile; the note says whether Inductor's caches were cold). It
  fills AOTAutograd's and Inductor's caches on disk, so a later process that compiles the same
  step (a ``step`` or ``launches`` row, the same mode, model, K, batch and dtype) loads it in
  seconds: bench/gpu_check.sh runs one such process per graph beside its other parts. The
  ``+cuda-graphs`` modes capture the same compiled graph and need no compile row of their own.
- suite ``matmul``: the reference matmul, with telemetry.
- suite ``data`` (not run by default): the input pipeline on one CPU core (the main process, one
  torch thread): decode + training augmentation (and the eval view) of generated JPEGs, uint8 vs
  float32 output, full-size vs reduced-size JPEG decode, and the collate (and pin) cost of a
  batch, uint8 vs float32; energyvit.data.throughput says what each row measures.

``speedup_vs_eager`` = eager time / row time, against ``math-eager`` (attention), ``eager``
(energy step) or ``mae`` (MAE step) of the same shape, op and dtype. Timing (energyvit.benchmark.
timing): a warm-up, then on CUDA triton.testing.do_bench (CUDA events per call, at least the
preset's min_reps calls), on CPU time.perf_counter around each call; ``ms`` is the median,
``ms_q1``/``ms_q3`` the quartiles, ``ms_min``/``ms_max`` the extremes of ``reps`` calls. Inputs are
random (seeded), rotated between two sets where the op allows it. On CUDA, nvidia-ml-py (optional)
adds SM clock, mean power and energy per image (difference of the total-energy counter over a
separate timed loop, divided by the images processed).

Modules: presets (names, columns, sizes), environment, telemetry, timing, flops, cases_attention,
cases_step, compile_only, launches, runner, report.
"""
from energyvit.benchmark.cases_attention import (ATTN_KERNEL, attention_backends, attention_fn, attention_op,
                                                 sdpa_kernel_ran)
from energyvit.benchmark.cases_step import (GraphedStep, StepCase, flat_grads, mae_case, optimizer_case, rel_err,
                                            step_case)
from energyvit.benchmark.compile_only import CompiledOnly, compile_only_backend, inductor_option
from energyvit.benchmark.environment import (SOURCE_ROOT, Unavailable, cpu_model, first_line, git_commit, mean_std,
                                             triton_version)
from energyvit.benchmark.flops import (datasheet_peak, energy_forward_flops, energy_step_flops, mae_step_flops,
                                       visible_step_flops, vit_forward_flops)
from energyvit.benchmark.launches import LaunchCount, count_launches, dispatched_ops, kernel_category, kernels_per_op
from energyvit.benchmark.presets import (ATTN_FLOP_FACTOR, ATTN_OPS, DEFAULT_SUITES, DTYPES, FIELDS, GRAPH_WARMUP,
                                         MAE_MODES, OWN_BACKENDS, PRESETS, STEP_MODES, SUITES)
from energyvit.benchmark.report import add_ratios, energy_vs_mae, format_table, iqr_percent
from energyvit.benchmark.runner import BenchConfig, Runner, collect
from energyvit.benchmark.telemetry import Telemetry
from energyvit.benchmark.timing import Timing, device_ms, kernel_ms, make_sync, peak_mem_mib, time_ms

__all__ = [
    "ATTN_FLOP_FACTOR", "ATTN_KERNEL", "ATTN_OPS", "DEFAULT_SUITES", "DTYPES", "FIELDS", "GRAPH_WARMUP", "MAE_MODES",
    "OWN_BACKENDS", "PRESETS", "SOURCE_ROOT", "STEP_MODES", "SUITES", "BenchConfig", "CompiledOnly", "GraphedStep",
    "LaunchCount", "Runner", "StepCase", "Telemetry", "Timing", "Unavailable", "add_ratios", "attention_backends",
    "attention_fn", "attention_op", "collect", "compile_only_backend", "count_launches", "cpu_model", "datasheet_peak",
    "device_ms", "dispatched_ops", "energy_forward_flops", "energy_step_flops", "energy_vs_mae", "first_line",
    "flat_grads", "format_table", "git_commit", "inductor_option", "iqr_percent", "kernel_category", "kernel_ms",
    "kernels_per_op", "mae_case", "mae_step_flops", "make_sync", "mean_std", "optimizer_case", "peak_mem_mib",
    "rel_err", "sdpa_kernel_ran", "step_case", "time_ms", "triton_version", "visible_step_flops", "vit_forward_flops",
]
