"""Telling out-of-distribution (or anomalous) images from in-distribution ones by a score.

Metrics, with the out-of-distribution images as positives and a higher score meaning "more
likely out":
- AUROC: the probability that a random out image scores above a random in image (ties count
  half), i.e. the Mann-Whitney U statistic over n_in x n_out.
- AUPR: average precision of ranking the out images first (precision at each out image's rank,
  averaged; tied scores enter together, as scikit-learn's average_precision_score).
- FPR at 95% TPR: the fraction of in images scored at or above the highest threshold that still
  flags 95% of the out images.

Baselines computed from frozen features of a reference (training) set, each a distance:
- kNN: cosine distance of the L2-normalized feature to its k-th nearest reference feature
  (deep nearest neighbours, Sun et al. 2022);
- Mahalanobis: distance to the nearest class mean under one shared covariance fitted on the
  reference features (Lee et al. 2018; one class for unlabeled or one-class references), with
  a small ridge so that few samples in many dimensions stay invertible;
- raw pixels: Euclidean distance to the nearest reference image (pixels area-averaged to at most
  32 x 32, as the probes' pixel baseline).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

METRICS = ("auroc", "aupr", "fpr95")


def _check(scores_in: Tensor, scores_out: Tensor) -> tuple[Tensor, Tensor]:
    if scores_in.numel() == 0 or scores_out.numel() == 0:
        raise ValueError(f"need in- and out-of-distribution scores, got {scores_in.numel()} and {scores_out.numel()}")
    scores_in, scores_out = scores_in.double().flatten(), scores_out.double().flatten()
    if not (torch.isfinite(scores_in).all() and torch.isfinite(scores_out).all()):
        raise ValueError("scores must be finite")
    return scores_in, scores_out


def auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    s_in, s_out = _check(scores_in, scores_out)
    above = (s_out[:, None] > s_in[None, :]).double().sum() + 0.5 * (s_out[:, None] == s_in[None, :]).double().sum()
    return (above / (len(s_in) * len(s_out))).item()


def aupr(scores_in: Tensor, scores_out: Tensor) -> float:
    s_in, s_out = _check(scores_in, scores_out)
    scores = torch.cat([s_out, s_in])
    labels = torch.cat([torch.ones(len(s_out)), torch.zeros(len(s_in))]).double()
    thresholds = scores.unique(sorted=True).flip(0)  # each distinct score, highest first
    flagged = scores[None, :] >= thresholds[:, None]
    tp = (flagged & labels.bool()).sum(1).double()
    precision, recall = tp / flagged.sum(1), tp / len(s_out)
    gains = recall - torch.cat([recall.new_zeros(1), recall[:-1]])
    return (gains * precision).sum().item()


def fpr_at_tpr(scores_in: Tensor, scores_out: Tensor, tpr: float = 0.95) -> float:
    s_in, s_out = _check(scores_in, scores_out)
    # the highest threshold at which at least `tpr` of the out images score at or above it
    k = max(1, int(torch.ceil(torch.tensor(tpr * len(s_out) - 1e-9)).item()))
    threshold = s_out.sort(descending=True).values[k - 1]
    return (s_in >= threshold).double().mean().item()


def detection_metrics(scores_in: Tensor, scores_out: Tensor) -> dict[str, float]:
    return {"auroc": auroc(scores_in, scores_out), "aupr": aupr(scores_in, scores_out),
            "fpr95": fpr_at_tpr(scores_in, scores_out)}


def knn_distance(reference: Tensor, queries: Tensor, k: int = 5, chunk: int = 1024) -> Tensor:
    """Cosine distance of each query to its k-th nearest reference feature (k capped at the references)."""
    ref, q = F.normalize(reference.float(), dim=1), F.normalize(queries.float(), dim=1)
    k = min(k, len(ref))
    out = [1 - (q[i: i + chunk] @ ref.T).topk(k, dim=1).values[:, -1] for i in range(0, len(q), chunk)]
    return torch.cat(out)


def mahalanobis_distance(reference: Tensor, queries: Tensor, labels: Tensor | None = None,
                         ridge: float = 1e-3) -> Tensor:
    """Squared Mahalanobis distance of each query to the nearest class mean of the reference
    features under their shared (within-class) covariance + ridge x its mean variance x I."""
    ref, q = reference.double(), queries.double()
    labels = torch.zeros(len(ref), dtype=torch.long) if labels is None or (labels < 0).any() else labels.long()
    classes = labels.unique()
    means = torch.stack([ref[labels == c].mean(0) for c in classes])
    centered = ref - means[torch.searchsorted(classes, labels)]
    cov = centered.T @ centered / max(1, len(ref) - len(classes))
    cov += ridge * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(len(cov), dtype=cov.dtype)
    precision = torch.linalg.inv(cov)
    diffs = q[:, None, :] - means[None, :, :]  # (n, classes, d)
    return torch.einsum("ncd,de,nce->nc", diffs, precision, diffs).min(dim=1).values.float()


def nearest_distance(reference: Tensor, queries: Tensor, chunk: int = 1024) -> Tensor:
    """Euclidean distance of each query row to its nearest reference row."""
    ref = reference.float()
    return torch.cat([torch.cdist(queries[i: i + chunk].float(), ref).min(dim=1).values
                      for i in range(0, len(queries), chunk)])
