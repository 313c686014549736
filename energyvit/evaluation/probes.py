"""Classifiers of frozen features, fit on a training split and scored on a held-out one.

- Linear probe: features standardized with the training split's statistics (MAE's
  BatchNorm-without-affine head), then a multinomial logistic regression fit by full-batch
  L-BFGS, its L2 strength picked on a validation fifth of the training split.
- Weighted kNN (the instance-discrimination protocol): L2-normalized features; each of the k
  most cosine-similar training images votes for its label with weight exp(similarity / t).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from energyvit.data.in_memory import ImageSplit, SplitDataset
from energyvit.data.splits import DataSplits
from energyvit.evaluation.features import POOLINGS, features
from energyvit.model import EnergyViT

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


def knn_scores(train_x: Tensor, train_y: Tensor, test_x: Tensor, k: int, t: float, chunk: int = 1024) -> Tensor:
    """Class scores (n_test, num_classes) of the temperature-weighted kNN vote on cosine similarity."""
    if not 1 <= k <= len(train_y):
        raise ValueError(f"knn_k must be in 1..{len(train_y)} (the training images), got {k}")
    if t <= 0:
        raise ValueError(f"knn_t must be > 0, got {t}")
    train_x, test_x = F.normalize(train_x.float(), dim=1), F.normalize(test_x.float(), dim=1)
    num_classes = int(train_y.max()) + 1
    out = []
    for i in range(0, len(test_x), chunk):  # chunks bound the (chunk, n_train) similarity matrix
        sim, idx = (test_x[i : i + chunk] @ train_x.T).topk(k, dim=1)
        votes = F.one_hot(train_y[idx], num_classes).float() * (sim / t).exp().unsqueeze(-1)
        out.append(votes.sum(dim=1))
    return torch.cat(out)


def topk_accuracy(scores: Tensor, labels: Tensor, k: int) -> float:
    k = min(k, scores.shape[1])
    return scores.topk(k, dim=1).indices.eq(labels[:, None]).any(dim=1).float().mean().item()


def frozen_scores(model: EnergyViT, pool: str, knn_k: int, knn_t: float, train: Dataset, held_out: ImageSplit,
                  probe_images: int = 10000, num_workers: int = 0) -> dict:
    """Linear probe and kNN of `pool` features: fit on (up to probe_images of) `train`, scored on
    `held_out`; k is capped at the number of training images."""
    feats, _, train_y = features([model], train, probe_images, (pool,), num_workers)
    test_feats, _, test_y = features([model], SplitDataset(held_out), len(held_out.labels), (pool,), 0)
    train_x, test_x = feats[(0, pool)], test_feats[(0, pool)]
    knn_k = min(knn_k, len(train_y))
    scores = knn_scores(train_x, train_y, test_x, knn_k, knn_t)
    return {
        "pool": pool, "feature_dim": train_x.shape[1], "n_train": len(train_y), "n_held_out": len(test_y),
        "linear_probe_acc": linear_probe(train_x, train_y, test_x, test_y),
        "knn_top1": topk_accuracy(scores, test_y, 1), "knn_top5": topk_accuracy(scores, test_y, 5),
        "knn_k": knn_k, "knn_t": knn_t,
    }


def probe_accuracies(model: EnergyViT, data: DataSplits, pool: str, seed: int, probe_images: int = 10000) -> dict:
    """Linear-probe accuracy on the held-out images of the model's frozen features, of the same
    architecture at random init (seeded), and of the raw pixels, each fit on (up to probe_images)
    unaugmented training images. `pool` gives the headline numbers; on the embedded digits
    `probe_by_pool` also holds every pooling."""
    if not data.labeled or len(data.held_out.labels.unique()) < 2:
        note = "the data has no labels" if not data.labeled else "the held-out images are of one class"
        return {"probe_acc": None, "probe_acc_random_init": None, "probe_acc_raw_pixels": None,
                "probe_pool": pool, "probe_note": note}
    pools = POOLINGS if data.default_probe_pool == "tokens" else (pool,)  # every pooling is cheap at digit size
    torch.manual_seed(seed)
    random_model = EnergyViT(model.cfg).to(model.pixel_mean.device).eval()
    was_training = model.training
    model.eval()
    models = [model, random_model]
    train_f, train_px, train_y = features(models, data.train_plain, probe_images, pools, data.num_workers)
    held = SplitDataset(data.held_out)
    test_f, test_px, test_y = features(models, held, len(held), pools, 0)
    model.train(was_training)
    by_pool = {p: {key: linear_probe(train_f[(i, p)], train_y, test_f[(i, p)], test_y)
                   for i, key in enumerate(("pretrained", "random_init"))} for p in pools}
    return {"probe_acc": by_pool[pool]["pretrained"], "probe_acc_random_init": by_pool[pool]["random_init"],
            "probe_acc_raw_pixels": linear_probe(train_px, train_y, test_px, test_y), "probe_pool": pool,
            "probe_by_pool": by_pool, "probe_train_images": len(train_y), "probe_held_out_images": len(test_y)}
