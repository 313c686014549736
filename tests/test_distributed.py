"""DDP on the CPU (gloo): the second-order step (inner autograd.grad with create_graph, outer
backward) under DistributedDataParallel gives the gradients of one process on the global batch."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from energyvit.distributed import DistInfo, ddp_energy_fn, wrap_ddp
from energyvit.objective import EnergyOptions, task_loss
from energyvit.training import EpochPlan, train_one_epoch
from energyvit.tasks import Corrupted
from helpers import THREE_TASKS_K2, images, tiny_model

BATCH = 8


def fixed_corruption(x: torch.Tensor) -> Corrupted:
    """Every other 2x2 patch replaced by 0.5: the same masked area in every image, so the mean over
    the global batch equals the mean of per-rank means."""
    mask = torch.zeros(1, 1, 4, 4, dtype=x.dtype)
    mask.view(-1)[::2] = 1
    mask = mask.repeat_interleave(2, 2).repeat_interleave(2, 3).expand(len(x), 1, 8, 8)
    return Corrupted(x * (1 - mask) + 0.5 * mask, mask, mask)


def model_and_ddp(distributed: bool):
    model = tiny_model()
    model.norm.requires_grad_(False)  # as EnergyMethod does: DDP needs a gradient for every trainable parameter
    return model, wrap_ddp(model, torch.device("cpu")) if distributed else None


def step_loss_for(model, ddp=None):
    def step_loss(clean, labels, seed):
        energy_fn = ddp_energy_fn(ddp, model) if ddp is not None else None
        return "mim", task_loss(model, clean, fixed_corruption(clean), EnergyOptions(), energy_fn=energy_fn)
    return step_loss


def one_sgd_step(model, ddp, x, batch_size, accum, info=DistInfo()):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    loader = [(x[i : i + batch_size], torch.zeros(batch_size), torch.zeros(batch_size)) for i in range(0, len(x), batch_size)]
    train_one_epoch(model, step_loss_for(model, ddp), loader, opt, EpochPlan(0, 1, 0, 0, accum_iter=accum),
                    lambda s: 0.05, ["mim"], info, ddp)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # direct gradients of one micro-batch per rank, K = 2 restoration steps
        model, ddp = model_and_ddp(True)
        x = images(BATCH)
        share = x[rank * BATCH // world : (rank + 1) * BATCH // world]
        step_loss_for(model, ddp)(share, None, 0)[1].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        # one optimizer step through train_one_epoch, 2 micro-batches per rank (no_sync on the first)
        model, ddp = model_and_ddp(True)
        after = one_sgd_step(model, ddp, share, BATCH // world // 2, 2, DistInfo(rank, world, rank))
        torch.save({"grads": grads, "after": after}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_and_accumulated_step_equal_one_process(tmp_path):
    mp.spawn(ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    model, _ = model_and_ddp(False)
    x = images(BATCH)
    step_loss_for(model)(x, None, 0)[1].backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    expected_after = one_sgd_step(model_and_ddp(False)[0], None, x, BATCH, 1)
    assert "restore_log_step" in expected and "blocks.0.attn.qkv.weight" in expected
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got["grads"]) == set(expected)
        for name, g in expected.items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-10, atol=1e-13, msg=name)
        for name, w in expected_after.items():
            torch.testing.assert_close(got["after"][name], w, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun is not on PATH")
def test_torchrun_pretrain_two_cpu_processes(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "energyvit", "pretrain",
           "--model", "vit_pico_patch2", "--batch_size", "125", "--accum_iter", "2", "--epochs", "2", "--warmup_epochs", "1",
           *THREE_TASKS_K2, "--num_threads", "1", "--grid_rows", "2", "--output_dir", str(tmp_path), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    # lr = blr x 125 x 2 accum x 2 processes / 256; only rank 0 prints
    assert "batch 125 x 2 accum x 2 processes, lr 7.81e-03" in done.stdout, done.stdout
    assert done.stdout.count("energyvit pretrain:") == 1
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and log[-1]["step"] == 2 * 3  # 1500 // (125 x 2 x 2) steps per epoch
    assert log[-1]["images_per_s"] > 0 and sorted(p.name for p in (tmp_path / "pictures").iterdir())[0] == "epoch0001-denoise.png"
    assert json.loads((tmp_path / "summary.json").read_text())["probe_acc"] > 0.5
