"""LARS (You et al. 2017, "Large Batch Training of Convolutional Networks"), the optimizer of
MoCo v3's and MAE's linear probes: SGD with momentum whose step for each weight matrix is rescaled
to trust_coefficient x |weight| / |gradient|, so every layer moves by the same fraction of its
norm whatever the size of its gradient. Biases and normalization weights (tensors of one dimension
or none) take the plain momentum step without weight decay."""
from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "trust_coefficient": trust_coefficient})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = p.norm(), update.norm()
                    # a zero weight or update keeps the plain step (the ratio would be 0 or undefined)
                    ratio = torch.where((p_norm > 0) & (u_norm > 0), group["trust_coefficient"] * p_norm / u_norm,
                                        torch.ones_like(p_norm))
                    update = update * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(buffer, alpha=-group["lr"])
        return loss
