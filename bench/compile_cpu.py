"""CPU benchmark of the compiled training step (energyvit.compiled) against the eager one.

The default pretraining configuration (`energyvit pretrain` defaults, resolved once and recorded
as pretrain_argv: vit_nano_patch4 on the 1-channel 16px digits, AdamW with the cosine schedule)
is trained for a few epochs from the same seed in separate worker processes:

  eager          train_one_epoch as pretrain.run calls it
  compiled_cold  the energy method built with compiled=True (energyvit.compiled), empty Inductor cache (a first run)
  compiled_warm  the same, reusing the Inductor cache the cold run filled (a later run)

Reported per worker: training steps per second over the epochs after the first (the first one
holds the compilation; steps_per_s uses the median epoch time, steps_per_s_mean the mean), the wall time of the first compiled call minus one steady step
("compile time"), and memory as the peak resident set size of the worker process
(resource.getrusage(RUSAGE_SELF).ru_maxrss; it includes compilation, but not Inductor's compile
worker subprocesses) next to its RSS right before training (/proc/self/statm). The workers also
log every step's loss, so the run doubles as the check that the compiled loss curve matches the
eager one under the same seed (max relative difference per epoch).

Writes bench/results/compile_cpu.json (machine: CPU model, cores, load average, torch version,
date, git commit). Usage: python bench/compile_cpu.py [--epochs 8] [--threads 1] [--out FILE]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# The pretrain flags the workers use. The parent resolves their defaults once and passes them
# explicitly, so every worker trains with the same hyperparameters even if the defaults change.
PRETRAIN_FLAGS = ("model", "seed", "batch_size", "warmup_epochs", "blr", "weight_decay", "tasks", "mask_ratio",
                  "mask_fill", "sort_fraction", "sr_factor", "noise_sigma", "energy", "restore_steps",
                  "step_size_init", "langevin_std", "loss_region")


def pretrain_argv(epochs: int, threads: int) -> list[str]:
    from energyvit.pretrain import PretrainOptions

    defaults = PretrainOptions().flat()
    argv = ["pretrain", "--epochs", str(epochs), "--num_threads", str(threads)]
    for name in PRETRAIN_FLAGS:
        argv += [f"--{name}", str(defaults[name])]
    return argv


def worker(mode: str, argv: list[str], out: str) -> None:
    from dataclasses import replace

    import torch
    from torch.utils.data import DataLoader

    from energyvit.cli import build_parser
    from energyvit.commands.pretrain import options_from
    from energyvit.distributed import DistInfo
    from energyvit.pretrain import setup
    from energyvit.sampling import EpochSampler
    from energyvit.training import EpochPlan, cosine_lr, train_one_epoch

    # Setup as pretrain.run does it, from the flags the parent resolved.
    options = options_from(build_parser().parse_args(argv))
    options = replace(options, run=replace(options.run, compile=mode != "eager"))
    threads, train_opts = options.run.num_threads, options.train
    torch.manual_seed(train_opts.seed)
    torch.set_num_threads(threads)
    t = setup(options, DistInfo(), torch.device("cpu"))
    model, optimizer, steps_per_epoch, dataset = t.method.module, t.optimizer, t.steps_per_epoch, t.data.train
    total, warmup = train_opts.epochs * steps_per_epoch, train_opts.warmup_epochs * steps_per_epoch
    inner = t.method.step_fn  # the compiled step, or None

    losses: list[float] = []
    call_times: list[float] = []

    def timed(step_loss):
        def call(images, labels, seed):
            t0 = time.perf_counter()
            name, loss = step_loss(images, labels, seed)
            call_times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            return name, loss
        return call

    step_loss = timed(t.step_loss)

    rss_before = rss_mib()
    epoch_s, step = [], 0
    for epoch in range(train_opts.epochs):
        t0 = time.perf_counter()
        loader = DataLoader(dataset, batch_size=train_opts.batch_size, drop_last=True,
                            sampler=EpochSampler(len(dataset), train_opts.batch_size, train_opts.seed, epoch))
        plan = EpochPlan(epoch, steps_per_epoch, 0, step, clip_grad=train_opts.clip_grad, seed=train_opts.seed)
        stats = train_one_epoch(model, step_loss, loader, optimizer, plan,
                                lambda s: cosine_lr(t.lr, s, total, warmup), t.method.task_names)
        step += stats["steps"]
        epoch_s.append(time.perf_counter() - t0)
    steady = epoch_s[1:]
    steady_steps = steps_per_epoch * len(steady)
    result = {
        "mode": mode,
        "threads": threads,
        "steps_per_epoch": steps_per_epoch,
        "epoch_s": epoch_s,
        "steps_per_s": steps_per_epoch / statistics.median(steady),  # median: robust to load spikes
        "steps_per_s_mean": steady_steps / sum(steady),
        "first_call_s": call_times[0],
        "steady_call_s": sorted(call_times[steps_per_epoch:])[len(call_times[steps_per_epoch:]) // 2],
        "losses": losses,
        "rss_before_training_mib": rss_before,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "compiled_mode": None if inner is None else inner.mode,
        "compiled_graphs": None if inner is None else inner.compiled_graphs(),
    }
    result["compile_s"] = result["first_call_s"] - result["steady_call_s"]
    Path(out).write_text(json.dumps(result))


def machine_info() -> dict:
    import torch

    from energyvit.benchmark import cpu_model, git_commit

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": _dt.datetime.now().isoformat(timespec="seconds"), "git_commit": git_commit(),
            "loadavg_start": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=8, help="epochs per worker (the first holds compilation)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "compile_cpu.json"))
    ap.add_argument("--worker", choices=["eager", "compiled_cold", "compiled_warm"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--worker-argv", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, json.loads(a.worker_argv), a.worker_out)
    if a.epochs < 2:
        ap.error("--epochs must be at least 2 (the first epoch holds the compilation)")

    info = machine_info()
    argv = pretrain_argv(a.epochs, a.threads)
    info["pretrain_argv"] = argv
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "inductor-cache"  # empty for the cold run, filled for the warm one
        for mode in ("eager", "compiled_cold", "compiled_warm"):
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
            path = Path(tmp) / f"{mode}.json"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--worker", mode, "--worker-argv", json.dumps(argv),
                            "--worker-out", str(path)], check=True, env=env, cwd=ROOT)
            results[mode] = json.loads(path.read_text())
            results[mode]["process_wall_s"] = time.perf_counter() - t0
            print(f"{mode:14s} {results[mode]['steps_per_s']:.3f} steps/s, first call {results[mode]['first_call_s']:.1f} s, "
                  f"peak RSS {results[mode]['peak_rss_mib']:.0f} MiB", flush=True)
    info["loadavg_end"] = os.getloadavg()

    eager = results["eager"]
    summary = {"config": "energyvit " + " ".join(argv) + " (float32, 16px digits)",
               "epochs_per_worker": a.epochs, "threads": a.threads}
    for mode in ("compiled_cold", "compiled_warm"):
        r = results[mode]
        per_epoch = []
        n = eager["steps_per_epoch"]
        for e in range(a.epochs):
            ref, got = eager["losses"][e * n:(e + 1) * n], r["losses"][e * n:(e + 1) * n]
            per_epoch.append(max(abs(x - y) / abs(y) for x, y in zip(got, ref)))
        summary[mode] = {
            "speedup_steps_per_s": r["steps_per_s"] / eager["steps_per_s"],
            "speedup_steps_per_s_mean": r["steps_per_s_mean"] / eager["steps_per_s_mean"],
            "compile_s": r["compile_s"],
            "peak_rss_ratio": r["peak_rss_mib"] / eager["peak_rss_mib"],
            "loss_max_rel_diff_per_epoch": per_epoch,
            "epoch_mean_loss_rel_diff": [
                abs(sum(r["losses"][e * n:(e + 1) * n]) - sum(eager["losses"][e * n:(e + 1) * n]))
                / abs(sum(eager["losses"][e * n:(e + 1) * n])) for e in range(a.epochs)],
        }
    out = {"machine": info, "summary": summary, "workers": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({"machine": info, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
