"""Linear probe: a linear classifier on frozen features, fit on one split, scored on another.

Features are standardized with the training split's statistics (MAE's BatchNorm-without-affine
head), then a multinomial logistic regression is fit by full-batch L-BFGS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from energyvit.model import EnergyViT

POOLING = ("tokens", "mean", "cls")


def pool_tokens(h: Tensor, pool: str) -> Tensor:
    """(B, 1 + num_patches, D) tokens -> (B, features) by `pool` (see extract_features)."""
    if pool == "tokens":
        return h[:, 1:].flatten(1)
    if pool == "mean":
        return h[:, 1:].mean(dim=1)
    return h[:, 0]


@torch.no_grad()
def extract_features(model: EnergyViT, images: Tensor, pool: str = "mean", batch_size: int = 256) -> Tensor:
    """Frozen features of the final normalized tokens: `tokens` concatenates all patch tokens
    (n, num_patches * D), a linear probe on the spatial feature map; `mean` averages them (n, D);
    `cls` takes the class token (n, D)."""
    if pool not in POOLING:
        raise ValueError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLING)}")
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        h = model.forward_features(images[i : i + batch_size].to(model.pixel_mean.device))
        out.append(pool_tokens(h, pool).cpu())
    model.train(was_training)
    return torch.cat(out)


WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)
VALIDATION_FRACTION = 0.2


def fit_logistic(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, weight_decay: float,
                 max_iter: int = 300) -> float:
    """Held-out accuracy of an L2-regularized logistic regression on standardized features."""
    train_x, test_x = train_x.double().flatten(1), test_x.double().flatten(1)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(train_x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (test_x @ weight + bias).argmax(1).eq(test_y).double().mean().item()


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                 weight_decays: tuple[float, ...] = WEIGHT_DECAYS) -> float:
    """Held-out accuracy of a logistic-regression probe whose L2 strength is chosen per feature
    set on a fixed validation fifth of the training split (then refit on the whole split), so
    each feature set, pixels included, is scored at its own best regularization."""
    n_val = max(1, int(len(train_y) * VALIDATION_FRACTION))
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))
    val, fit = order[:n_val], order[n_val:]
    scores = [fit_logistic(train_x[fit], train_y[fit], train_x[val], train_y[val], wd) for wd in weight_decays]
    best = weight_decays[max(range(len(scores)), key=scores.__getitem__)]
    return fit_logistic(train_x, train_y, test_x, test_y, best)
