"""Restoration: the energy model's backward pass as an image restorer.

K gradient steps on the pixels, x_{k+1} = x_k - a_k * dE/dx(x_k) (+ optional Langevin noise),
with the learnable step sizes a_k of the model. Pixels outside `update_mask` stay fixed.

Two modes:
- training (`create_graph=True`): every step stays in the autograd graph, so a loss on the
  restored image trains the network through the steps (second derivatives of E).
- inference (`create_graph=False`): each step is detached; no parameter graph is kept, memory
  is one forward graph at a time, and every intermediate image is returned.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from energyvit.model import EnergyViT


@dataclass
class Restoration:
    restored: Tensor  # x_K
    steps: list[Tensor]  # [x_0, x_1, ..., x_K]; x_0 is the corrupted input
    # E(x_k) per step, (K, batch); in inference mode also E(x_K) of the result, (K + 1, batch)
    energies: Tensor


def energy_grad(energy_fn: Callable[[Tensor], Tensor], x: Tensor, create_graph: bool) -> tuple[Tensor, Tensor]:
    """(E(x), dE/dx), with the graph kept for a further backward when create_graph is set."""
    with torch.enable_grad():
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        energy = energy_fn(x)
        (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=create_graph)
    return energy, grad


def restore(
    model: EnergyViT,
    corrupted: Tensor,
    update_mask: Tensor | None = None,
    steps: int | None = None,
    create_graph: bool = False,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    energy_fn: Callable[[Tensor], Tensor] | None = None,
) -> Restoration:
    """Restore `corrupted` by `steps` (default: the model's K) gradient steps on its energy.

    update_mask: (B, 1 or C, H, W) in {0, 1}; 1 where pixels may change. None updates all.
    noise_std: Langevin noise, x += noise_std * sqrt(2 a_k) * N(0, 1) after each step.
    energy_fn: computes E(x) in place of model(x), e.g. the model's DistributedDataParallel wrapper
    (whose forward makes the outer backward all-reduce the parameter gradients).
    """
    K = model.cfg.restore_steps if steps is None else steps
    if not 1 <= K <= model.restore_log_step.numel():
        raise ValueError(f"steps must be in 1..{model.restore_log_step.numel()} (the model's restore_steps), got {K}")
    model.check_input(corrupted)
    if update_mask is not None and (update_mask.ndim != 4 or update_mask.shape[2:] != corrupted.shape[2:]):
        raise ValueError(f"update_mask of shape {tuple(update_mask.shape)} does not match images {tuple(corrupted.shape)}")
    step_sizes = model.step_sizes
    x = corrupted
    trajectory, energies = [x.detach()], []
    for k in range(K):
        energy, grad = energy_grad(energy_fn or model, x, create_graph)
        energies.append(energy.detach())
        a = step_sizes[k] if create_graph else step_sizes[k].detach()
        delta = -a * grad
        if noise_std > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            delta = delta + noise_std * (2 * a).sqrt() * noise
        if update_mask is not None:
            delta = delta * update_mask
        x = x + delta if create_graph else (x + delta).detach()
        trajectory.append(x.detach())
    if not create_graph:
        with torch.no_grad():
            energies.append(model(x))
    return Restoration(restored=x, steps=trajectory, energies=torch.stack(energies))
