"""End-to-end check of `energyvit pretrain` on a generated image folder: the math and the fused
attention backends, and the fused one with `--cuda_graphs`, train the same run (same seed, data,
corruptions), and their per-epoch losses must agree; reports each run's images/s and peak memory
from its log.jsonl.

On CUDA this exercises what the unit tests cannot run on the CPU: bf16 autocast (the default
`--precision auto` there) through the fused Triton kernels, the DataLoader with workers and
pinned memory, the epoch pictures, and the training loop replaying the captured step and AdamW
update (the run must say it uses CUDA graphs, and warn of no fallback). `--cpu` runs a tiny
version through the Triton interpreter (fp32; there `--cuda_graphs` falls back to the ordinary
step with one warning, which is checked instead), to check the script itself.

    python bench/pretrain_smoke.py --out DIR            # CUDA: vit_tiny_patch16 at 64 px
    python bench/pretrain_smoke.py --cpu --out DIR      # CPU: vit_pico_patch2 at 8 px
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

LOSS_RTOL = {"cuda": 5e-2, "cpu": 1e-4}  # bf16 autocast on CUDA; fp32 through the interpreter on CPU
GRAPHS_RTOL = 1e-3  # against the fused run: the same kernels, replayed (CUDA) or the same step (CPU fallback)
RUNS = {"math": [], "fused": ["--fused"], "fused+cuda_graphs": ["--fused", "--cuda_graphs"]}


def write_folder(root: Path, per_class: int, size: int) -> None:
    """Two classes of noisy RGB images, brighter on the left or the right half."""
    rng = np.random.default_rng(0)
    for label, left in (("left", True), ("right", False)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
            img[:, slice(0, size // 2) if left else slice(size // 2, None)] += 120
            Image.fromarray(img).save(root / label / f"{i:04d}.png")


def pretrain(out: Path, data: Path, flags: list[str], cpu: bool) -> tuple[list[dict], str]:
    """One run's epoch records and its console output; it writes into `out` and runs there, so
    that a source checkout's energyvit/ (which has no kernels/ inside) cannot shadow the installed
    package."""
    size = ["--model", "vit_pico_patch2", "--input_size", "8", "--batch_size", "16", "--epochs", "2",
            "--device", "cpu", "--num_workers", "0"] if cpu else \
           ["--model", "vit_tiny_patch16", "--input_size", "64", "--batch_size", "64", "--epochs", "2",
            "--num_workers", "4"]
    cmd = [sys.executable, "-m", "energyvit", "pretrain", "--data_path", str(data), "--output_dir", str(out),
           "--warmup_epochs", "1", "--grid_rows", "4",
           "--tasks", "mim:0.5,denoise:0.25,sr:0.25", "--restore_steps", "2", "--no-tensorboard", *size, *flags]
    env = {**os.environ, **({"TRITON_INTERPRET": "1"} if cpu else {})}
    out.mkdir(parents=True, exist_ok=True)
    console = []
    with subprocess.Popen(cmd, env=env, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        for line in p.stdout:  # streamed: a run stopped by a timeout still shows how far it got
            print(line, end="", flush=True)
            console.append(line)
    if p.returncode:
        raise SystemExit(f"pretrain {' '.join(flags)} failed with exit status {p.returncode}")
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()], "".join(console)


def graphs_used(console: str, cpu: bool) -> tuple[bool, str]:
    """Whether the --cuda_graphs run did what it should: on CUDA, run with graphs and no fallback
    warning; on the CPU, fall back with the one warning."""
    fallback = "energyvit CUDA graphs:" in console
    if cpu:
        return fallback, "fell back with a warning (CPU)" if fallback else "no fallback warning on the CPU"
    used = ", CUDA graphs" in console and not fallback
    return used, "ran with CUDA graphs, no fallback" if used else "did not run with CUDA graphs (see its output)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny run on the CPU through the Triton interpreter")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results/local"),
                   help="where OUT/pretrain_smoke/ gets the summary and each run's log.jsonl and console output")
    p.add_argument("--work", default=None, help="folder for the images and the runs' checkpoints and pictures "
                   "(default: a temporary one, removed at the end)")
    args = p.parse_args()
    out = Path(args.out).resolve() / "pretrain_smoke"
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="pretrain_smoke-"))
    data = work / "data"
    write_folder(data, per_class=16 if args.cpu else 512, size=8 if args.cpu else 64)
    runs = {}
    for name, flags in RUNS.items():
        run_dir = work / name.replace("+", "_")
        runs[name] = pretrain(run_dir, data, flags, args.cpu)
        (out / f"{run_dir.name}.log").write_text(runs[name][1])
        shutil.copy(run_dir / "log.jsonl", out / f"{run_dir.name}.jsonl")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    logs = {name: log for name, (log, _) in runs.items()}
    rtol = LOSS_RTOL["cpu" if args.cpu else "cuda"]
    ok, graphs_note = graphs_used(runs["fused+cuda_graphs"][1], args.cpu)
    print(f"--cuda_graphs run: {graphs_note}")
    for m, f, g in zip(logs["math"], logs["fused"], logs["fused+cuda_graphs"]):
        rel = abs(m["loss"] - f["loss"]) / abs(m["loss"])
        rel_g = abs(g["loss"] - f["loss"]) / abs(f["loss"])
        ok &= rel <= rtol and rel_g <= GRAPHS_RTOL
        print(f"epoch {m['epoch']}: loss math {m['loss']:.5f} fused {f['loss']:.5f} (rel diff {rel:.2e}, "
              f"tolerance {rtol:.0e}) fused+cuda_graphs {g['loss']:.5f} (vs fused {rel_g:.2e}, tolerance "
              f"{GRAPHS_RTOL:.0e}); images/s math {m['images_per_s']:.0f} fused {f['images_per_s']:.0f} "
              f"graphs {g['images_per_s']:.0f}; peak MiB math {m['peak_memory_mib']:.0f} fused "
              f"{f['peak_memory_mib']:.0f} graphs {g['peak_memory_mib']:.0f}")
    (out / "summary.json").write_text(json.dumps({"ok": ok, "rtol": rtol, "graphs_rtol": GRAPHS_RTOL,
                                                  "graphs": graphs_note, "logs": logs}, indent=2) + "\n")
    print("pretrain smoke:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
