"""The compiled training step under torchrun (gloo, 2 CPU processes): its gradients, made inside
the compiled graph where DDP's hooks never see them, are all-reduced by AllReduceGradients after
the step's backward. Weights after an optimizer step equal one process's on the same global batch,
and `torchrun ... pretrain --compile` runs end to end.

Compiling on the CPU takes tens of seconds a graph, so every compiled step here has one graph
(batch 4; smaller micro-batches are padded to it) and the tests share it through Inductor's cache.
"""
import json
import os
import subprocess
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from energyvit.compiled import compile_support, compiled_train_step
from energyvit.distributed import AllReduceGradients, broadcast_parameters
from energyvit.objective import EnergyOptions, task_loss
from helpers import TORCHRUN, fixed_corruption, free_port, images, needs_torchrun, process_group, rank_share, \
    sgd_steps, tiny_model, write_image_folder

pytestmark = pytest.mark.skipif(not compile_support()[0], reason="this torch cannot trace autograd.grad")

BATCH = 8  # the global batch: 4 images per rank, one compiled graph of batch 4 everywhere


def energy_model(seed: int = 0):
    model = tiny_model(seed=seed)
    for p in model.unused_parameters():  # as EnergyMethod does
        p.requires_grad_(False)
    return model


def compiled_step_loss(model):
    step = compiled_train_step(model, EnergyOptions())
    return (lambda clean, labels, seed: ("mim", step(clean, fixed_corruption(clean)))), step


def eager_step_loss(model):
    return lambda clean, labels, seed: ("mim", task_loss(model, clean, fixed_corruption(clean), EnergyOptions()))


def compiled_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    with process_group(rank, world, port) as info:
        model = energy_model(seed=rank)  # other weights on rank 1 until the broadcast
        broadcast_parameters(model)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        step_loss, step = compiled_step_loss(model)
        share = rank_share(images(BATCH), rank, world, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
            after = sgd_steps(model, step_loss, share, BATCH // world, 1, info, AllReduceGradients(model))
            model.load_state_dict(initial)
            after_accum = sgd_steps(model, step_loss, share, BATCH // world // 2, 2, info, AllReduceGradients(model))
        assert step.mode == "compiled" and step.compiled_graphs() == 1
        torch.save({"after": after, "after_accum": after_accum}, f"{out}/rank{rank}.pt")


def test_compiled_step_in_two_processes_equals_one_process(tmp_path, one_thread):
    """2 processes, each the compiled step on its 4 images, gradients all-reduced, one SGD step:
    - bit for bit the weights of one process running the same compiled step over the global batch
      as 2 micro-batches of 4 (the same graph on the same images; each gradient halved, then
      summed, in both);
    - within 1e-9 relative (float64; the compiled step's own first-call check against eager uses
      the same tolerance) of one eager process on the global batch of 8, with 1 micro-batch of 4
      per rank and with 2 micro-batches of 2 per rank (padded to the compiled 4)."""
    mp.spawn(compiled_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    x = images(BATCH)
    model = energy_model()
    step_loss, step = compiled_step_loss(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled_accum = sgd_steps(model, step_loss, x, BATCH // 2, 2)
    assert step.mode == "compiled"
    model = energy_model()
    eager = sgd_steps(model, eager_step_loss(model), x, BATCH, 1)
    initial = dict(energy_model().named_parameters())
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, w in eager.items():
            assert torch.equal(got["after"][name], compiled_accum[name]), name
            torch.testing.assert_close(got["after"][name], w, rtol=1e-9, atol=1e-12, msg=name)
            torch.testing.assert_close(got["after_accum"][name], w, rtol=1e-9, atol=1e-12, msg=name)
        moved = got["after"]["blocks.0.attn.qkv.weight"] - initial["blocks.0.attn.qkv.weight"]
        assert moved.abs().max() > 1e-4  # the step did something


@needs_torchrun
def test_torchrun_pretrain_compiled_two_cpu_processes(tmp_path):
    """`torchrun --nproc_per_node 2 ... pretrain --compile` on a small ImageFolder: compiled (no
    fallback warning), gradients all-reduced after each step, 2 epochs of 2 steps, 2 micro-batches
    per step, the epoch evaluation and the final probe on rank 0."""
    write_image_folder(tmp_path / "data" / "train", 16, 0)
    write_image_folder(tmp_path / "data" / "val", 4, 1)
    out = tmp_path / "out"
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "energyvit", "pretrain",
           "--compile", "--device", "cpu", "--data_path", str(tmp_path / "data"), "--model", "vit_pico_patch2",
           "--input_size", "8", "--energy_head_depth", "0", "--batch_size", "4", "--accum_iter", "2", "--epochs", "2",
           "--warmup_epochs", "1", "--num_threads", "1", "--num_workers", "0", "--grid_rows", "2", "--no-tensorboard",
           "--output_dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch 4 x 2 accum x 2 processes" in done.stdout and "compiled, gradients all-reduced after each step" in \
        done.stdout, done.stdout
    assert "energyvit compile" not in done.stderr, done.stderr[-3000:]  # no fallback to eager on either rank
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and log[-1]["step"] == 4  # 32 // (4 x 2 accum x 2 processes) a epoch
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in log)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["probe_acc"] is not None and summary["tasks"]["mim"]["mse_restored"] > 0
