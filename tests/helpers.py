"""Shared test helpers: tiny models and inputs, pieces of the multi-process tests."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys

import pytest
import torch

from energyvit.model import EnergyViT, model_config
from energyvit.tasks import Corrupted

# `pretrain` flags for three tasks and two restoration steps, so tests of the training loop cover a
# task mixture and steps after the first whatever the defaults are
THREE_TASKS_K2 = ["--tasks", "mim:0.5,denoise:0.25,sr:0.25", "--restore_steps", "2"]

TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun is not on PATH")


def tiny_model(dtype=torch.float64, seed: int = 0, **overrides) -> EnergyViT:
    """vit_pico_patch2 on 8x8 single-channel images, in `dtype`."""
    torch.manual_seed(seed)
    args = dict(in_chans=1, restore_steps=2, step_size_init=0.5)
    args.update(overrides)
    return EnergyViT(model_config("vit_pico_patch2", **args)).to(dtype)


def images(batch: int = 3, chans: int = 1, size: int = 8, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, chans, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def tiny_checkpoint(path, seed: int = 0, **overrides):
    """Save a float32 tiny_model as a `pretrain`-style checkpoint at `path`; returns the model."""
    from energyvit.checkpoint import save_checkpoint
    from energyvit.model import config_to_dict

    model = tiny_model(dtype=torch.float32, seed=seed, **overrides)
    save_checkpoint(path, {"model": model.state_dict(), "model_config": config_to_dict(model.cfg), "epoch": 0})
    return model


def eager_replay_step(*args, **kwargs):
    """A cuda_graphs.GraphedLossStep whose 'graph' runs what it would capture eagerly at each replay:
    everything around the CUDA graph (static inputs and gradients, accumulation over micro-batches,
    the loss weight, an all-reduce between replay and optimizer) runs on the CPU."""
    from types import SimpleNamespace

    from energyvit.cuda_graphs import GraphedLossStep

    class EagerReplayStep(GraphedLossStep):
        def _record(self, params):
            self._first_run(params)  # as the CUDA capture does, then the replay runs what it would capture
            return SimpleNamespace(replay=self._forward_backward, pool=lambda: None)

    return EagerReplayStep(*args, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_group(rank: int = 0, world: int = 1, port: int | None = None, **kwargs):
    """A gloo process group of `world` processes on this machine (port: a free one when None, for a
    group of one), destroyed on the way out; yields this rank's DistInfo."""
    import torch.distributed as dist

    from energyvit.distributed import DistInfo

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port or free_port()}", rank=rank, world_size=world,
                            **kwargs)
    try:
        yield DistInfo(rank, world, rank)
    finally:
        dist.destroy_process_group()


def assert_ddp_task_loss_grads(model, x: torch.Tensor, c: Corrupted, opts) -> None:
    """Under DDP (a one-process gloo group) the first energy of a step is the wrapper's forward:
    what the option passes through it (keep, the split streams) reaches the model, and the parameter
    gradients of task_loss equal those without DDP."""
    from energyvit.distributed import ddp_energy_fn, wrap_ddp
    from energyvit.objective import task_loss

    with process_group():
        params = [p for p in model.parameters() if p.requires_grad]
        ref = torch.autograd.grad(task_loss(model, x, c, opts), params)
        ddp = wrap_ddp(model, torch.device("cpu"))
        task_loss(model, x, c, opts, energy_fn=ddp_energy_fn(ddp, model)).backward()
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.grad, r, rtol=1e-12, atol=1e-15)


def fixed_corruption(x: torch.Tensor) -> Corrupted:
    """Every other 2x2 patch of an 8x8 image replaced by 0.5: the same masked area in every image,
    so the mean over the global batch equals the mean of per-rank (and per-micro-batch) means."""
    mask = torch.zeros(1, 1, 4, 4, dtype=x.dtype)
    mask.view(-1)[::2] = 1
    mask = mask.repeat_interleave(2, 2).repeat_interleave(2, 3).expand(len(x), 1, 8, 8)
    return Corrupted(x * (1 - mask) + 0.5 * mask, mask, mask)


def rank_share(x: torch.Tensor, rank: int, world: int, steps: int) -> torch.Tensor:
    """This rank's part of each optimizer step's global batch (x holds `steps` of them, in order)."""
    per_step, per_rank = len(x) // steps, len(x) // steps // world
    return torch.cat([x[s * per_step + rank * per_rank : s * per_step + (rank + 1) * per_rank] for s in range(steps)])


def sgd_steps(model, step_loss, x: torch.Tensor, batch_size: int, accum: int, info=None, grad_sync=None, steps: int = 1):
    """`steps` SGD steps (lr 0.05) of train_one_epoch over x, in order; the weights after them."""
    from energyvit.distributed import DistInfo, LocalGradients
    from energyvit.training import EpochPlan, train_one_epoch

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    loader = [(x[i : i + batch_size], torch.zeros(batch_size), torch.zeros(batch_size)) for i in range(0, len(x), batch_size)]
    train_one_epoch(model, step_loss, loader, opt, EpochPlan(0, steps, 0, 0, accum_iter=accum), lambda s: 0.05, ["mim"],
                    info or DistInfo(), grad_sync or LocalGradients())
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def write_image_folder(root, per_class: int, seed: int) -> None:
    """12x12 RGB noise, brighter on the left or on the right: two classes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, half in (("left", slice(0, 6)), ("right", slice(6, 12))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 120, (12, 12, 3), dtype=np.uint8)
            img[:, half] += 120
            Image.fromarray(img).save(root / name / f"{i:02d}.png")
