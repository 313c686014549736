"""Restoration: the energy model's backward pass as an image restorer.

K gradient steps on the pixels, x_{k+1} = x_k - a_k * dE/dx(x_k) (+ optional Langevin noise),
with the learnable step sizes a_k of the model. Pixels outside `update_mask` stay fixed.

Two modes:
- training (`create_graph=True`): every step stays in the autograd graph, so a loss on the
  restored image trains the network through the steps (second derivatives of E).
- inference (`create_graph=False`): no step keeps a parameter graph; memory is one forward graph
  at a time, and every intermediate image is returned.

Sparse restoration (`keep`, the patches that enter the energy, see EnergyViT.forward): the
energy of every step reads only those patches, so dE/dx is zero on the others; the update mask
(the task's) then covers only patches among them.

`descend` is the one loop behind eager training, inference and the compiled step and restore of
energyvit.compiled: Dynamo traces it into one graph, so it holds nothing Dynamo cannot trace (no
generator draws, no requires_grad_ calls; torch 2.11 refuses the latter inside a compiled region).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from energyvit.attention import SECOND_ORDER_BACKENDS
from energyvit.model import EnergyViT


@dataclass
class Restoration:
    restored: Tensor  # x_K
    steps: list[Tensor]  # [x_0, x_1, ..., x_K]; x_0 is the corrupted input
    # E(x_k) per step, (K, batch); in inference mode also E(x_K) of the result, (K + 1, batch)
    energies: Tensor


def check_restore_inputs(model: EnergyViT, corrupted: Tensor, update_mask: Tensor | None, steps: int | None,
                         keep: Tensor | None = None) -> int:
    """The number of steps K (default: the model's), after checking the images, mask, K and keep."""
    K = model.cfg.restore_steps if steps is None else steps
    if not 1 <= K <= model.restore_log_step.numel():
        raise ValueError(f"steps must be in 1..{model.restore_log_step.numel()} (the model's restore_steps), got {K}")
    model.check_input(corrupted)
    if update_mask is not None and (update_mask.ndim != 4 or update_mask.shape[2:] != corrupted.shape[2:]):
        raise ValueError(f"update_mask of shape {tuple(update_mask.shape)} does not match images {tuple(corrupted.shape)}")
    model.check_keep(keep, corrupted.shape[0])
    return K


def check_second_order(model: EnergyViT) -> None:
    """ValueError unless the model's attention has a second derivative (training restoration needs it)."""
    if model.cfg.attn_backend not in SECOND_ORDER_BACKENDS:
        raise ValueError(f"attention backend {model.cfg.attn_backend!r} has no second derivative: training "
                         f"restoration needs one of {', '.join(SECOND_ORDER_BACKENDS)}")


def draw_noise(x: Tensor, steps: int, noise_std: float, generator: torch.Generator | None) -> Tensor | None:
    """The Langevin noise of `steps` steps, (steps, *x.shape), drawn up front (Dynamo cannot trace a
    generator); None without noise."""
    if noise_std <= 0:
        return None
    return torch.stack([torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                        for _ in range(steps)])


def bind_keep(energy_fn: Callable[..., Tensor], keep: Tensor | None) -> Callable[..., Tensor]:
    """x -> energy_fn(x, keep) (other keywords passed on), or energy_fn itself without keep."""
    return energy_fn if keep is None else lambda x, **kwargs: energy_fn(x, keep, **kwargs)


def input_gradient(energy_fn: Callable[..., Tensor], x: Tensor, create_graph: bool,
                   exact_blocks: int | None = None) -> tuple[Tensor, Tensor]:
    """(E(x), dE/dx). With create_graph and exact_blocks = L, the truncated second-order path: the
    gradient's value is exact, but its graph (what the outer loss differentiates) runs through the
    energy head and the last L encoder blocks only; below them the blocks' Jacobian counts as the
    identity (straight through, as their residual stream would be without its branches). The
    earlier blocks still learn, to first order, through the tokens that reach the exact blocks."""
    if exact_blocks is None or not create_graph:
        energy = energy_fn(x)
        (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=create_graph)
        return energy, grad
    energy, tokens_in, cut = energy_fn(x, exact_blocks=exact_blocks)
    (grad_cut,) = torch.autograd.grad(energy.sum(), cut, create_graph=True)
    grad_in = grad_cut
    if cut is not tokens_in:
        (exact,) = torch.autograd.grad(cut, tokens_in, grad_cut.detach(), retain_graph=True)
        grad_in = exact + (grad_cut - grad_cut.detach())
    (grad,) = torch.autograd.grad(tokens_in, x, grad_in, create_graph=True)
    return energy, grad


def descend(energy_fn: Callable[..., Tensor], x: Tensor, step_sizes: Tensor, update_mask: Tensor | None,
            noise: Tensor | None, noise_std: float, create_graph: bool,
            exact_blocks: int | None = None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """len(step_sizes) steps x <- x - a_k dE/dx (+ noise_std * sqrt(2 a_k) * noise[k]), inside
    update_mask. x must require grad (a leaf the caller made so). Returns x_K, [x_0 .. x_K] detached
    and the detached energies E(x_k), plus E(x_K) in inference mode. exact_blocks: the truncated
    second-order path of input_gradient (training only).

    Inference keeps x_k attached to x_0 through the additions only: the gradient is taken with
    create_graph=False and a_k is detached, so no parameter graph survives a step."""
    trajectory, energies = [x.detach()], []
    with torch.enable_grad():
        for k in range(step_sizes.shape[0]):
            energy, grad = input_gradient(energy_fn, x, create_graph, exact_blocks)
            energies.append(energy.detach())
            a = step_sizes[k]
            delta = -a * grad
            if noise is not None:
                delta = delta + noise_std * (2 * a).sqrt() * noise[k]
            if update_mask is not None:
                delta = delta * update_mask
            x = x + delta
            trajectory.append(x.detach())
    if not create_graph:
        with torch.no_grad():
            energies.append(energy_fn(x))
    return x, trajectory, energies


def restore(
    model: EnergyViT,
    corrupted: Tensor,
    update_mask: Tensor | None = None,
    steps: int | None = None,
    create_graph: bool = False,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    energy_fn: Callable[..., Tensor] | None = None,
    keep: Tensor | None = None,
    exact_blocks: int | None = None,
) -> Restoration:
    """Restore `corrupted` by `steps` (default: the model's K) gradient steps on its energy.

    update_mask: (B, 1 or C, H, W) in {0, 1}; 1 where pixels may change. None updates all.
    noise_std: Langevin noise, x += noise_std * sqrt(2 a_k) * N(0, 1) after each step.
    energy_fn: computes E(x) in place of model(x), e.g. the model's DistributedDataParallel wrapper
    (whose forward makes the outer backward all-reduce the parameter gradients); called as
    energy_fn(x, keep) when keep is given.
    keep: (B, n) indices of the patches that enter the energy (sparse restoration); None: all.
    exact_blocks: training only, the truncated second-order path (input_gradient); None: exact.
    """
    K = check_restore_inputs(model, corrupted, update_mask, steps, keep)
    if create_graph:
        check_second_order(model)
    step_sizes = model.step_sizes[:K]
    noise = draw_noise(corrupted, K, noise_std, generator)
    # training may differentiate through an input that already requires grad; otherwise x_0 is a new leaf
    x0 = corrupted if create_graph and corrupted.requires_grad else corrupted.detach().requires_grad_(True)
    restored, trajectory, energies = descend(bind_keep(energy_fn or model, keep), x0,
                                             step_sizes if create_graph else step_sizes.detach(), update_mask, noise,
                                             noise_std, create_graph, exact_blocks)
    return Restoration(restored=restored if create_graph else restored.detach(), steps=trajectory,
                       energies=torch.stack(energies))
