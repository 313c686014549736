"""Weighted kNN classification of frozen features (the instance-discrimination protocol, as DINO
runs it): features L2-normalized; each of the k most cosine-similar training images votes for its
label with weight exp(similarity / t); the class with the largest summed vote wins.

Under torchrun each rank holds its share of the training features (its bank) on its device, and
the held-out features go round in rounds: every rank puts in up to `rows` of its own, all are
gathered, each rank finds their top-k in its bank, the candidates (similarity, label) are gathered
again, and each rank merges those of its own queries into the global top-k. The k best of all
ranks' candidates are the k best of the whole training split, so the votes are those of one
process holding every training feature (ties at the k-th neighbour aside).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from energyvit.distributed import DistInfo, all_gather
from energyvit.evaluation.streaming import accuracy_counts, reduce_counts

QUERY_ROWS = 1024  # held-out features per round (over all ranks)
SIMILARITY_ELEMENTS = 2**27  # at most this many entries (512 MiB in float32) in one round's similarity matrix


def knn_vote(sims: Tensor, labels: Tensor, t: float, num_classes: int) -> Tensor:
    """Class scores (n, num_classes) of neighbours' cosine similarities and labels, both (n, k)."""
    scores = sims.new_zeros(len(sims), num_classes)
    return scores.scatter_add_(1, labels, (sims / t).exp())


def knn_scores(train_x: Tensor, train_y: Tensor, test_x: Tensor, k: int, t: float, num_classes: int | None = None,
               dist: DistInfo = DistInfo()) -> Tensor:
    """Class scores (len(test_x), num_classes) of the weighted kNN vote for this rank's held-out
    features `test_x`, against the training features of all ranks (`train_x`, `train_y`: this
    rank's share; under torchrun every rank calls this together). num_classes: by default one
    more than the largest training label."""
    device = train_x.device
    sizes = all_gather(torch.tensor([len(train_y), len(test_x), int(train_y.max()) if len(train_y) else -1],
                                    device=device), dist).cpu()
    n_train = int(sizes[:, 0].sum())
    if not 1 <= k <= n_train:
        raise ValueError(f"knn_k must be in 1..{n_train} (the training images), got {k}")
    if t <= 0:
        raise ValueError(f"knn_t must be > 0, got {t}")
    num_classes = num_classes if num_classes is not None else int(sizes[:, 2].max()) + 1
    dtype = torch.promote_types(train_x.dtype, torch.float32)  # float32, or float64 features kept so
    train_x, test_x = F.normalize(train_x.to(dtype), dim=1), F.normalize(test_x.to(dtype), dim=1)
    world, rank = dist.world_size, dist.rank
    rows = max(1, min(QUERY_ROWS, SIMILARITY_ELEMENTS // max(1, int(sizes[:, 0].max()))) // world)
    rounds = -(-int(sizes[:, 1].max()) // rows)
    local_k = min(k, len(train_y))
    out = []
    for r in range(rounds):
        mine = test_x[r * rows : (r + 1) * rows]
        queries = torch.cat([mine, mine.new_zeros(rows - len(mine), mine.shape[1])])
        queries = all_gather(queries, dist).flatten(0, 1)  # (world * rows, D), rank by rank
        sim, idx = (queries @ train_x.T).topk(local_k, dim=1)
        # k candidates per query from every rank; a rank with fewer than k training images pads
        # with similarity -inf, which never makes the global top k (k <= all training images)
        cand_sim = sim.new_full((len(queries), k), -torch.inf)
        cand_label = train_y.new_zeros((len(queries), k))
        cand_sim[:, :local_k], cand_label[:, :local_k] = sim, train_y[idx]
        own = slice(rank * rows, (rank + 1) * rows)
        cand_sim = all_gather(cand_sim, dist)[:, own].transpose(0, 1).flatten(1)  # (rows, world * k)
        cand_label = all_gather(cand_label, dist)[:, own].transpose(0, 1).flatten(1)
        top_sim, pick = cand_sim.topk(k, dim=1)
        out.append(knn_vote(top_sim, cand_label.gather(1, pick), t, num_classes)[: len(mine)])
    return torch.cat(out) if out else test_x.new_zeros(0, num_classes)


def knn_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, k: int, t: float,
                 num_classes: int | None = None, dist: DistInfo = DistInfo()) -> dict:
    """{"top1", "top5", "n"} of the weighted kNN vote over every rank's held-out features."""
    scores = knn_scores(train_x, train_y, test_x, k, t, num_classes, dist)
    result = reduce_counts(accuracy_counts(scores, test_y, loss=False), dist)
    return {"top1": result["top1"], "top5": result["top5"], "n": result["n"]}


def topk_accuracy(scores: Tensor, labels: Tensor, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores (all of them for fewer classes)."""
    k = min(k, scores.shape[1])
    return scores.topk(k, dim=1).indices.eq(labels[:, None]).any(dim=1).float().mean().item()
