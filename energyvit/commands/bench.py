"""`energyvit bench`: attention backends and the training step, timed per mode, with device
telemetry, and the input pipeline's CPU rate (the benchmarks themselves are in energyvit.benchmark
and energyvit.data.throughput)."""
from __future__ import annotations

import argparse

import torch

from energyvit.benchmark import (DEFAULT_SUITES, PRESETS, STEP_MODES, SUITES, BenchConfig, collect,
                                 energy_vs_mae, format_table, inductor_option)
from energyvit.commands.args import add, device_flag, flag_type, non_negative_float, non_negative_int

HELP = "benchmark attention backends, the training step and the input pipeline"


def add_args(p: argparse.ArgumentParser) -> None:
    add(p, "--quick", action="store_true", help="CPU smoke run at tiny sizes (a minute or two; the fused rows run on "
        "the CPU only with TRITON_INTERPRET=1 in the environment)")
    add(p, "--preset", choices=list(PRESETS), default=None,
        help="sizes: smoke, cpu, proxy (the CPU launch-count proxy: vit_tiny_patch16 at 64 px) or gpu (default: gpu "
        "on CUDA, cpu otherwise; --quick: smoke)")
    add(p, "--device", type=device_flag, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    add(p, "--out", default="bench-results", help="folder for the CSV and JSON results (bench/results in a checkout "
        "keeps them with the project's)")
    add(p, "--suites", default=",".join(DEFAULT_SUITES), help=f"comma list of {', '.join(SUITES)} (compile: "
        "compile each compiled step mode without running it, which fills the compiler's caches for a later run; "
        "data: one CPU core's JPEG decode + augmentation rate and the collate cost, uint8 vs float32; neither runs "
        "by default)")
    add(p, "--step_modes", default=",".join(STEP_MODES), help=f"comma list of the step modes to run: "
        f"{', '.join(STEP_MODES)} (the cuda-graphs modes need CUDA; mae*: the MAE step with SDPA attention, "
        "mae-math with math attention)")
    add(p, "--models", default="", help="comma list of the preset's step models to run (default: all)")
    add(p, "--ks", default="", help="comma list of the preset's restoration step counts K to run (default: all)")
    add(p, "--no_compile", action="store_true", help="skip the torch.compile rows (recorded as skipped)")
    add(p, "--budget_s", type=non_negative_float, default=0.0, help="stop starting rows after this many seconds (0: no limit)")
    add(p, "--threads", type=non_negative_int, default=1, help="torch CPU threads (default 1: shared cores)")
    add(p, "--inductor", type=flag_type(inductor_option), action="append", default=[], metavar="KEY=VALUE",
        help="an option of torch._inductor.config for the compiled step modes, a Python literal (e.g. "
        "combo_kernels=True); repeatable; in the results' meta")
    add(p, "--tag", default="", help="extra tag in the result file names")


def _names(text: str, known: tuple, flag: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in known]
    if bad:
        raise ValueError(f"{flag}: unknown name(s) {', '.join(bad)}; choose from {', '.join(known)}")
    return names


def run(args: argparse.Namespace) -> None:
    dev = args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if torch.device(dev).type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    preset = args.preset or ("smoke" if args.quick else ("gpu" if torch.device(dev).type == "cuda" else "cpu"))
    suites, modes = _names(args.suites, SUITES, "--suites"), _names(args.step_modes, STEP_MODES, "--step_modes")
    models = _names(args.models, tuple(m for m, _, _ in PRESETS[preset]["steps"]), "--models") or None
    ks = tuple(int(k) for k in _names(args.ks, tuple(str(k) for k in PRESETS[preset]["ks"]), "--ks")) or None
    cfg = BenchConfig(preset=preset, device=dev, out=args.out, suites=suites, compile=not args.no_compile,
                      budget_s=args.budget_s, tag=args.tag or ("quick" if args.quick else ""), step_modes=modes,
                      models=models, ks=ks, inductor=dict(args.inductor))
    rows, meta, paths = collect(cfg)
    print()
    print(format_table(rows))
    print(f"\n# {meta['device_name']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
          f"commit {meta['git_commit']}, {meta['date_utc']}")
    print(f"# telemetry: {meta['telemetry']}; MFU reference: {meta['mfu_reference'] or 'n/a'}")
    for line in energy_vs_mae(rows):
        print(f"# {line}")
    print(f"# x eager = eager ms / row ms; wall {meta['wall_s']} s; wrote {paths[0]} and {paths[1]}")
