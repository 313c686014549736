"""DDP on the CPU (gloo): the second-order step (inner autograd.grad with create_graph, outer
backward) under DistributedDataParallel gives the gradients of one process on the global batch,
with the truncated second-order path and sparse restoration too (their energies pass split
streams and `keep` through DDP's forward); so does the explicit gradient all-reduce that the
compiled and the CUDA-graphed steps use (AllReduceGradients), with the ordinary step and with the
graphed step's bookkeeping."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from energyvit.cli import main
from energyvit.distributed import AllReduceGradients, DDPGradients, broadcast_parameters, coalesced, ddp_energy_fn, \
    wrap_ddp
from energyvit.objective import EnergyOptions, task_loss
from energyvit.tasks import Corrupted, MaskedImageModeling
from helpers import THREE_TASKS_K2, TORCHRUN, eager_replay_step, fixed_corruption, free_port, images, needs_torchrun, \
    process_group, rank_share, sgd_steps, tiny_checkpoint, tiny_model

BATCH = 8


def model_and_ddp(distributed: bool, seed: int = 0):
    model = tiny_model(seed=seed)
    model.norm.requires_grad_(False)  # as EnergyMethod does: DDP needs a gradient for every trainable parameter
    return model, wrap_ddp(model, torch.device("cpu")) if distributed else None


def step_loss_for(model, ddp=None):
    def step_loss(clean, labels, seed):
        energy_fn = ddp_energy_fn(ddp, model) if ddp is not None else None
        return "mim", task_loss(model, clean, fixed_corruption(clean), EnergyOptions(), energy_fn=energy_fn)
    return step_loss


def graphed_step_loss(model, accum):
    """The graphed step's bookkeeping without a graph (helpers.eager_replay_step): the first call
    runs the ordinary step, the second captures in the middle of an optimizer step, the rest replay."""
    step = eager_replay_step(model, EnergyOptions(), warmup_steps=1, accum_iter=accum)
    return lambda clean, labels, seed: ("mim", step(clean, fixed_corruption(clean))), step


# options whose energy reaches DDP's forward with more than the image: (model overrides, energy
# options, mim's restore_fraction)
OPTION_STEPS = {
    "truncated": (dict(energy_head_depth=2, energy_head_dim=16), EnergyOptions(second_order_blocks=1), 1.0),
    "sparse": ({}, EnergyOptions(), 0.5),
}


def option_grads(name: str, rank: int = 0, world: int = 1) -> dict:
    """Parameter gradients of one step of an OPTION_STEPS option on this rank's share of a seeded
    mim batch (every image hides and restores as many patches, so the mean over ranks is the
    global batch's); under DDP when world > 1."""
    head, opts, fraction = OPTION_STEPS[name]
    model = tiny_model(**head)
    model.norm.requires_grad_(bool(head))  # without a head nothing reads the final norm
    x = images(BATCH)
    c = MaskedImageModeling(2, 0.5, 0.5, fraction)(x, torch.Generator().manual_seed(0))
    energy_fn = None
    if world > 1:
        x = rank_share(x, rank, world, 1)
        c = Corrupted(*(None if t is None else rank_share(t, rank, world, 1) for t in (
            c.image, c.loss_mask, c.update_mask, c.keep, c.fill_mask, c.loss_weight, c.hidden)))
        energy_fn = ddp_energy_fn(wrap_ddp(model, torch.device("cpu")), model)
    task_loss(model, x, c, opts, energy_fn=energy_fn).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    with process_group(rank, world, port) as info:
        # direct gradients of one micro-batch per rank, K = 2 restoration steps
        model, ddp = model_and_ddp(True)
        x = images(BATCH)
        share = rank_share(x, rank, world, 1)
        step_loss_for(model, ddp)(share, None, 0)[1].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        # one optimizer step through train_one_epoch, 2 micro-batches per rank (no_sync on the first)
        model, ddp = model_and_ddp(True)
        after = sgd_steps(model, step_loss_for(model, ddp), share, BATCH // world // 2, 2, info, DDPGradients(ddp))
        # the same without DDP: each rank starts from its own seed until rank 0's weights are broadcast
        model, _ = model_and_ddp(False, seed=rank)
        broadcast_parameters(model)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        after_explicit = sgd_steps(model, step_loss_for(model), share, BATCH // world // 2, 2, info,
                                   AllReduceGradients(model))
        # the graphed step's bookkeeping, accumulating over 2 micro-batches, then the all-reduce, 2 steps
        model, _ = model_and_ddp(False)
        step_loss, step = graphed_step_loss(model, 2)
        after_graphed = sgd_steps(model, step_loss, rank_share(images(2 * BATCH), rank, world, 2), BATCH // world // 2,
                                  2, info, AllReduceGradients(model), steps=2)
        assert step.mode == "graph" and all(p.grad is g for p, g in zip(step._params(), step.static_grads))
        options = {name: option_grads(name, rank, world) for name in OPTION_STEPS}
        torch.save({"grads": grads, "after": after, "start": start, "after_explicit": after_explicit,
                    "after_graphed": after_graphed, "options": options}, f"{out}/rank{rank}.pt")


def test_ddp_and_the_explicit_all_reduce_equal_one_process(tmp_path):
    """Gradients and weights after an optimizer step of 2 processes x 2 micro-batches equal one
    process's on the global batch (float64, 1e-10 relative: the sums run in another order), under
    DDP and under AllReduceGradients; those two give the same weights bit for bit (each gradient
    halved, then summed over the 2 ranks, in both). Ranks that start from other weights start from
    rank 0's after broadcast_parameters."""
    mp.spawn(ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    model, _ = model_and_ddp(False)
    x = images(BATCH)
    step_loss_for(model)(x, None, 0)[1].backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    initial = {n: p.detach().clone() for n, p in model_and_ddp(False)[0].named_parameters()}
    model = model_and_ddp(False)[0]
    expected_after = sgd_steps(model, step_loss_for(model), x, BATCH, 1)
    model = model_and_ddp(False)[0]
    expected_two_steps = sgd_steps(model, step_loss_for(model), images(2 * BATCH), BATCH, 1, steps=2)
    assert "restore_log_step" in expected and "blocks.0.attn.qkv.weight" in expected
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got["grads"]) == set(expected)
        for name, g in expected.items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-10, atol=1e-13, msg=name)
        for name, w in expected_after.items():
            torch.testing.assert_close(got["after"][name], w, rtol=1e-10, atol=1e-13, msg=name)
            assert torch.equal(got["after_explicit"][name], got["after"][name]), name
            assert torch.equal(got["start"][name], initial[name]), name
            torch.testing.assert_close(got["after_graphed"][name], expected_two_steps[name], rtol=1e-10, atol=1e-13,
                                       msg=name)
        assert not torch.equal(got["after_graphed"]["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])
        for option in OPTION_STEPS:
            one = option_grads(option)
            assert set(got["options"][option]) == set(one), option
            for name, g in one.items():
                torch.testing.assert_close(got["options"][option][name], g, rtol=1e-10, atol=1e-13,
                                           msg=f"{option} {name}")


def test_coalesced_packs_few_buffers_per_device_and_dtype():
    """The collective sees one flat buffer per run of one dtype up to the bucket size (a larger
    tensor alone), and its results land in the original tensors, whatever their layout."""
    tensors = [torch.arange(6.0).reshape(2, 3), torch.ones(4, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
               torch.full((5,), 2.0, dtype=torch.float64), torch.arange(8.0).reshape(2, 4).t()]
    originals = [t.clone() for t in tensors]
    seen = []

    def double(flat):
        seen.append((flat.dtype, flat.numel()))
        flat.mul_(2)

    coalesced(tensors, double, bucket_mib=60 / 2**20)  # 60 bytes: 7 doubles
    assert seen == [(torch.float32, 6), (torch.float64, 7), (torch.float64, 5), (torch.float32, 8)]
    for t, o in zip(tensors, originals):
        assert torch.equal(t, 2 * o)


def test_all_reduce_refuses_a_parameter_without_gradient():
    with process_group():
        model = tiny_model()
        sync = AllReduceGradients(model)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        model.norm.weight.grad = None
        with pytest.raises(RuntimeError, match="no gradient for norm.weight: the gradient all-reduce needs one"):
            sync.reduce()
        model.norm.weight.grad = torch.ones_like(model.norm.weight)
        sync.reduce()  # one rank: the mean is the gradient itself
        assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


@needs_torchrun
def test_torchrun_pretrain_two_cpu_processes(tmp_path):
    """DDP under torchrun; --cuda_graphs on the CPU falls back to it with one warning (rank 0's)."""
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "energyvit", "pretrain",
           "--model", "vit_pico_patch2", "--batch_size", "125", "--accum_iter", "2", "--epochs", "2", "--warmup_epochs", "1",
           *THREE_TASKS_K2, "--num_threads", "1", "--grid_rows", "2", "--probe_images", "200", "--output_dir",
           str(tmp_path), "--device", "cpu", "--cuda_graphs"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("energyvit CUDA graphs: CUDA graphs need a CUDA device") == 1, done.stderr[-3000:]
    assert "CUDA graphs" not in done.stdout and "all-reduced" not in done.stdout  # DDP, as without the flag
    # lr = blr x 125 x 2 accum x 2 processes / 256; only rank 0 prints
    assert "batch 125 x 2 accum x 2 processes, lr 7.81e-03" in done.stdout, done.stdout
    assert done.stdout.count("energyvit pretrain:") == 1
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and log[-1]["step"] == 2 * 3  # 1500 // (125 x 2 x 2) steps per epoch
    assert log[-1]["images_per_s"] > 0 and sorted(p.name for p in (tmp_path / "pictures").iterdir())[0] == "epoch0001-denoise.png"
    assert json.loads((tmp_path / "summary.json").read_text())["probe_acc"] > 0.5


def image_folder(root, classes: int = 3, train_per_class: int = 16, val_per_class: int = 4, size: int = 12) -> str:
    """A labeled ImageFolder with train/ and val/: class c's images are noise with channel c raised."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 100, (size, size, 3))
                pixels[..., c] += 150
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return str(root)


@needs_torchrun
def test_torchrun_finetune_two_cpu_processes_equals_one(tmp_path, one_thread):
    """2 gloo processes x batch 4 x 2 accumulation steps against 1 process x batch 8 x 2 on the same
    global steps: each step's gradient is the mean over the same 16 images, so the weights agree
    up to float32 summation order (tolerance 5e-6 absolute, 1e-5 relative). RandAugment is on (a
    function of each image's key, read by two DataLoader workers in the single process); mixup,
    cutmix, random erasing and drop path are off (they draw per rank)."""
    data = image_folder(tmp_path / "data")
    tiny_checkpoint(tmp_path / "ckpt.pth", in_chans=3)
    common = [str(tmp_path / "ckpt.pth"), "--data_path", data, "--accum_iter", "2", "--epochs", "2", "--warmup_epochs",
              "1", "--drop_path", "0", "--num_threads", "1", "--no-tensorboard", "--device", "cpu"]
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "energyvit", "finetune", *common,
           "--batch_size", "4", "--num_workers", "0", "--output_dir", str(tmp_path / "two")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("energyvit finetune:") == 1, done.stdout  # only rank 0 prints
    # lr = blr x 4 x 2 accum x 2 processes / 256
    assert "RandAugment rand-m9-mstd0.5-inc1; batch 4 x 2 accum x 2 processes, lr 1.25e-03" in done.stdout
    one_process = ["--batch_size", "8", "--num_workers", "2", "--output_dir", str(tmp_path / "one")]
    assert main(["finetune", *common, *one_process]) == 0
    two, one = (torch.load(tmp_path / d / "checkpoint-last.pth", weights_only=True) for d in ("two", "one"))
    assert two["global_step"] == one["global_step"] == 2 * 3  # 48 images // 16 per step, 2 epochs
    for name, w in one["model"].items():  # float32 sums in another order, 6 AdamW steps of lr 1.25e-3: 6.6e-7 at most
        torch.testing.assert_close(two["model"][name], w, rtol=1e-5, atol=5e-6, msg=name)
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("two", "one")]
    assert summaries[0]["n_held_out"] == summaries[1]["n_held_out"] == 12  # every val image once over the ranks
    for key in ("held_out_top1", "held_out_top5"):
        assert summaries[0][key] == summaries[1][key]
    assert summaries[0]["held_out_loss"] == pytest.approx(summaries[1]["held_out_loss"], rel=1e-5)
    log = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and log[-1]["step"] == 6
