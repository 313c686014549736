"""The fast linear probe of frozen features (the default for small data), and the frozen-feature
scores of `energyvit probe` and of the end of pretraining.

Linear probe: features standardized with the fitting images' statistics (what MAE's
BatchNorm-without-affine head does), then a multinomial logistic regression fit by full-batch
L-BFGS in float64 on the features' device, its L2 strength picked on a validation fifth of the
fitting images. It fits on at most `probe_images` training images, whose features are held whole
(it is for small data; `--protocol mae` of energyvit.evaluation.mae_probe trains on every
training image). It is scored on every held-out image, streamed (energyvit.evaluation.streaming).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from energyvit.data.splits import DataSplits
from energyvit.distributed import DistInfo, broadcast_
from energyvit.evaluation.features import POOLINGS, pool_tokens, probe_subset, raw_pixels
from energyvit.evaluation.knn import knn_accuracy
from energyvit.evaluation.streaming import EVAL_BATCH, accuracy_counts, reduce_counts, shard_features, \
    subset_features
from energyvit.model import EnergyViT

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)
VALIDATION_FRACTION = 0.2


class LinearClassifier(nn.Module):
    """Standardization by fixed statistics, then a linear map: logits = ((x - mean) / std) W + b,
    in float64."""

    def __init__(self, mean: Tensor, std: Tensor, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        for name, value in (("mean", mean), ("std", std), ("weight", weight), ("bias", bias)):
            self.register_buffer(name, value.detach().double())

    def forward(self, x: Tensor) -> Tensor:
        return ((x.double().flatten(1) - self.mean) / self.std) @ self.weight + self.bias


def fit_logistic(train_x: Tensor, train_y: Tensor, num_classes: int, weight_decay: float,
                 max_iter: int = 300) -> LinearClassifier:
    """An L2-regularized logistic regression on standardized features, fit by L-BFGS."""
    train_x = train_x.double().flatten(1)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x = (train_x - mean) / std
    weight = train_x.new_zeros(train_x.shape[1], num_classes, requires_grad=True)
    bias = train_x.new_zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearClassifier(mean, std, weight, bias)


def accuracy(classifier: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return classifier(x).argmax(1).eq(y).double().mean().item()


def fit_linear_probe(train_x: Tensor, train_y: Tensor, num_classes: int,
                     weight_decays: tuple[float, ...] = WEIGHT_DECAYS) -> LinearClassifier:
    """The logistic-regression probe whose L2 strength is chosen per feature set on a fixed
    validation fifth of the training images (then refit on all of them), so each feature set,
    pixels included, is scored at its own best regularization."""
    n_val = max(1, int(len(train_y) * VALIDATION_FRACTION))
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0)).to(train_y.device)
    val, fit = order[:n_val], order[n_val:]
    scores = [accuracy(fit_logistic(train_x[fit], train_y[fit], num_classes, wd), train_x[val], train_y[val])
              for wd in weight_decays]
    best = weight_decays[max(range(len(scores)), key=scores.__getitem__)]
    return fit_logistic(train_x, train_y, num_classes, best)


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                 weight_decays: tuple[float, ...] = WEIGHT_DECAYS) -> float:
    """Held-out accuracy of fit_linear_probe on features held in memory."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    return accuracy(fit_linear_probe(train_x, train_y, num_classes, weight_decays), test_x, test_y)


def same_on_every_rank(classifier: LinearClassifier, dist: DistInfo) -> LinearClassifier:
    """Rank 0's fit everywhere: every rank fits the same features, and may round differently."""
    for buffer in classifier.buffers():
        broadcast_(buffer, dist)
    return classifier


def encoder_features(models: list[EnergyViT], pools: tuple[str, ...], pixels: bool = False):
    """A streaming.FeatureFn: {"i/pool": model i's pooled final tokens, ..., "pixels": raw pixels}."""
    def feature_fn(x: Tensor) -> dict[str, Tensor]:
        out = {}
        for i, model in enumerate(models):
            h = model.forward_features(x)
            out.update({f"{i}/{p}": pool_tokens(h, p) for p in pools})
        if pixels:
            out["pixels"] = raw_pixels(x)
        return out
    return feature_fn


def frozen_scores(model: EnergyViT, pool: str, knn_k: int, knn_t: float, data: DataSplits, probe_images: int = 10000,
                  dist: DistInfo = DistInfo(), device: torch.device | None = None, batch_size: int = EVAL_BATCH,
                  precision: str = "auto", linear: bool = True) -> dict:
    """kNN over every training image and (with `linear`) the L-BFGS linear probe fit on up to
    probe_images of them, both scored on every held-out image; `pool` features of `model`.
    Under torchrun every rank computes its share. k is capped at the number of training images."""
    device = device or model.pixel_mean.device
    model.eval()
    feature_fn = encoder_features([model], (pool,))
    key = f"0/{pool}"
    stream = {"dist": dist, "device": device, "batch_size": batch_size, "num_workers": data.num_workers,
              "precision": precision}
    test_f, test_y = shard_features(feature_fn, data.held_out_all, **stream)
    bank, bank_y = shard_features(feature_fn, data.train_plain, **stream)
    knn_k = min(knn_k, data.num_train)
    knn = knn_accuracy(bank[key], bank_y, test_f[key], test_y, knn_k, knn_t, data.num_classes, dist)
    result = {"pool": pool, "feature_dim": bank[key].shape[1], "n_train": data.num_train, "n_held_out": knn["n"],
              "knn_top1": knn["top1"], "knn_top5": knn["top5"], "knn_k": knn_k, "knn_t": knn_t}
    del bank, bank_y
    if linear:
        chosen = probe_subset(data.num_train, probe_images)
        train_f, train_y = subset_features(feature_fn, data.train_plain, chosen, **stream)
        classifier = same_on_every_rank(fit_linear_probe(train_f[key], train_y, data.num_classes), dist)
        scored = reduce_counts(accuracy_counts(classifier(test_f[key]), test_y), dist)
        result.update(linear_probe_acc=scored["top1"], linear_probe_top5=scored["top5"], probe_train_images=len(chosen))
    return result


def probe_accuracies(model: EnergyViT, data: DataSplits, pool: str, seed: int, probe_images: int = 10000) -> dict:
    """Linear-probe accuracy on every held-out image of the model's frozen features, of the same
    architecture at random init (seeded), and of the raw pixels, each fit on (up to probe_images)
    unaugmented training images; one process, on the model's device. `pool` gives the headline
    numbers; on the embedded digits `probe_by_pool` also holds every pooling."""
    if not data.labeled or len(data.held_out.labels.unique()) < 2:
        note = "the data has no labels" if not data.labeled else "the held-out images are of one class"
        return {"probe_acc": None, "probe_acc_random_init": None, "probe_acc_raw_pixels": None,
                "probe_pool": pool, "probe_note": note}
    pools = POOLINGS if data.default_probe_pool == "tokens" else (pool,)  # every pooling is cheap at digit size
    device = model.pixel_mean.device
    torch.manual_seed(seed)
    random_model = EnergyViT(model.cfg).to(device).eval()
    was_training = model.training
    model.eval()
    feature_fn = encoder_features([model, random_model], pools, pixels=True)
    stream = {"dist": DistInfo(), "device": device, "num_workers": data.num_workers}
    chosen = probe_subset(data.num_train, probe_images)
    train_f, train_y = subset_features(feature_fn, data.train_plain, chosen, **stream)
    test_f, test_y = shard_features(feature_fn, data.held_out_all, **stream)
    model.train(was_training)

    def score(key: str) -> float:
        classifier = fit_linear_probe(train_f[key], train_y, data.num_classes)
        return reduce_counts(accuracy_counts(classifier(test_f[key]), test_y), DistInfo())["top1"]

    by_pool = {p: {name: score(f"{i}/{p}") for i, name in enumerate(("pretrained", "random_init"))} for p in pools}
    return {"probe_acc": by_pool[pool]["pretrained"], "probe_acc_random_init": by_pool[pool]["random_init"],
            "probe_acc_raw_pixels": score("pixels"), "probe_pool": pool, "probe_by_pool": by_pool,
            "probe_train_images": len(chosen), "probe_held_out_images": len(test_y)}
