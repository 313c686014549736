"""Shared test helpers: tiny models and inputs."""
from __future__ import annotations

import torch

from energyvit.model import EnergyViT, model_config

# `pretrain` flags for three tasks and two restoration steps, so tests of the training loop cover a
# task mixture and steps after the first whatever the defaults are
THREE_TASKS_K2 = ["--tasks", "mim:0.5,denoise:0.25,sr:0.25", "--restore_steps", "2"]


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
            return SimpleNamespace(replay=self._forward_backward, pool=lambda: None)

    return EagerReplayStep(*args, **kwargs)
