"""Every score of a set of images, for `energyvit score`: the energy model's own (energy and
restoration, energyvit.scoring), MAE's reconstruction error when an MAE checkpoint is given, and
the frozen-feature baselines against a reference set (energyvit.evaluation.detection), each
timed so that its cost (images/s) is reported next to its quality.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from energyvit.data.image_sets import ScoreSet, batches
from energyvit.evaluation.detection import knn_distance, mahalanobis_distance, nearest_distance
from energyvit.evaluation.features import pool_tokens, raw_pixels
from energyvit.methods.mae import MAEBaseline
from energyvit.model import EnergyViT
from energyvit.options import check_fields, option, positive
from energyvit.scoring import DEFAULT_ROUNDS, mae_errors, restoration_errors

FEATURE_POOL = "mean"  # the baselines' features: the mean of the final patch tokens, as the probes'


@dataclass(frozen=True)
class ScoreOptions:
    rounds: int = option(DEFAULT_ROUNDS, "restoration score: seeded masks that each hide 1/rounds of the patches, "
                         "so every patch is hidden and restored once", rule=positive)
    seed: int = option(0, "seed of the restoration masks (and of noise fill)")
    batch_size: int = option(64, "images per batch", rule=positive)
    knn_k: int = option(5, "kNN baseline: distance to the k-th nearest reference feature", rule=positive)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class Reference:
    """Frozen features (mean-pooled), labels, raw pixels and energies of the reference (training) images."""
    features: Tensor
    labels: Tensor
    pixels: Tensor
    energies: Tensor


@dataclass
class SetScores:
    names: list[str]  # one per scored (readable) image
    labels: Tensor  # their labels, -1 when unknown
    scores: dict[str, Tensor] = field(default_factory=dict)  # name -> (n,), higher = more unusual
    maps: dict[str, Tensor] = field(default_factory=dict)  # energy / restoration -> (n, grid, grid)
    skipped: int = 0  # unreadable images
    seconds: dict[str, float] = field(default_factory=dict)  # time spent on each score

    def images_per_s(self) -> dict[str, float]:
        return {k: len(self.names) / s for k, s in self.seconds.items() if s > 0}


def _timed(seconds: dict, key: str, fn):
    t0 = time.perf_counter()
    out = fn()
    seconds[key] += time.perf_counter() - t0
    return out


@torch.no_grad()
def reference_features(model: EnergyViT, images: ScoreSet, batch_size: int, num_workers: int) -> Reference:
    device = model.pixel_mean.device
    feats, pixels, labels, energies = [], [], [], []
    for x, indices, _ in batches(images, batch_size, num_workers, device):
        if x is None:
            continue
        feats.append(pool_tokens(model.forward_features(x), FEATURE_POOL).float().cpu())
        pixels.append(raw_pixels(x).cpu())
        energies.append(model(x).float().cpu())
        labels += [images.labels[i] for i in indices]
    if not feats:
        raise ValueError("the reference set has no readable images")
    return Reference(torch.cat(feats), torch.tensor(labels), torch.cat(pixels), torch.cat(energies))


def score_set(images: ScoreSet, model: EnergyViT, fill: str | float, options: ScoreOptions, num_workers: int = 0,
              mae: MAEBaseline | None = None, reference: Reference | None = None) -> SetScores:
    """Every score of every readable image of `images` (unreadable ones are counted in `skipped`)."""
    model.eval()
    device = model.pixel_mean.device
    seconds: dict[str, float] = defaultdict(float)
    parts: dict[str, list[Tensor]] = defaultdict(list)
    names, labels, skipped = [], [], 0
    grid = model.cfg.img_size // model.cfg.patch_size
    for x, indices, lost in batches(images, options.batch_size, num_workers, device):
        skipped += lost
        if x is None:
            continue
        names += [images.names[i] for i in indices]
        labels += [images.labels[i] for i in indices]
        with torch.no_grad():
            parts["energy"].append(_timed(seconds, "energy", lambda: model(x)).cpu())
            if model.cfg.energy != "cls":
                parts["energy_map"].append(model.patch_energies(x).cpu())
        errors = _timed(seconds, "restoration", lambda: restoration_errors(model, x, options.rounds, options.seed, fill))
        parts["restoration"].append(errors.mean(dim=1).cpu())
        parts["restoration_map"].append(errors.cpu())
        if mae is not None:
            parts["mae"].append(_timed(seconds, "mae", lambda: mae_errors(mae, x, options.rounds, options.seed))
                                .mean(dim=1).cpu())
        if reference is not None:
            with torch.no_grad():
                feats = _timed(seconds, "features", lambda: pool_tokens(model.forward_features(x), FEATURE_POOL))
            parts["features"].append(feats.float().cpu())
            parts["pixels"].append(raw_pixels(x).cpu())
    if not names:
        raise ValueError(f"none of the {skipped} images could be read")
    out = SetScores(names, torch.tensor(labels), skipped=skipped)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    for key in ("energy", "restoration", "mae"):
        if key in cat:
            out.scores[key] = cat[key]
    for key in ("energy", "restoration"):
        if f"{key}_map" in cat:
            out.maps[key] = cat[f"{key}_map"].view(-1, grid, grid)
    if reference is not None:
        # two-sided: an image is unusual whether its energy is too high or too low for the training data
        # (simple images get low energies, as they get high likelihoods: Nalisnick et al. 2019)
        ref_e = reference.energies.double()
        out.scores["energy_typicality"] = ((out.scores["energy"].double() - ref_e.mean()).abs()
                                           / ref_e.std().clamp_min(1e-12)).float()
        seconds["energy_typicality"] = seconds["energy"]
        feats, pix = cat["features"], cat["pixels"]
        out.scores["knn"] = _timed(seconds, "knn", lambda: knn_distance(reference.features, feats, options.knn_k))
        out.scores["mahalanobis"] = _timed(seconds, "mahalanobis", lambda: mahalanobis_distance(
            reference.features, feats, reference.labels))
        out.scores["pixels"] = _timed(seconds, "pixels", lambda: nearest_distance(reference.pixels, pix))
        for key in ("knn", "mahalanobis"):  # both read the same features: each pays for them
            seconds[key] += seconds["features"]
        del seconds["features"]
    out.seconds = dict(seconds)
    return out
