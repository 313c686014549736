"""MAE's linear probe of a frozen encoder (the protocol of MAE's main_linprobe.py), `energyvit
probe --protocol mae`: for any amount of data, on the device, under torchrun on every rank.

- The encoder is frozen (eval mode, no gradient). Each step computes the features of a batch of
  augmented training images (the training Dataset's augmentation: random resized crop and flip for
  image files, random shift on the digits): the final tokens pooled by `pool` (MAE: the class
  token for ViT-B, or the mean of the patch tokens).
- Head: BatchNorm without affine (eps 1e-6), then a linear layer (weights truncated normal with
  std 0.01, bias 0), as MAE; the BatchNorm's running statistics are the mean over all steps
  (probe_head says why).
- LARS as MAE (lr = blr x effective batch / 256, blr 0.1, momentum 0.9, weight decay 0; biases left
  out of its rescaling) or SGD with momentum (the default: LARS moves each weight matrix by a fixed
  fraction of its norm per step, and small data gives it too few steps: on the digits' tokens of a
  40-epoch checkpoint, 90 epochs of LARS at blr 0.1 reach 0.75 top-1 where the default 10 epochs of
  SGD reach 0.97); per-step cosine schedule after a linear warmup; every training image once per
  epoch (the remainder below one global batch dropped).
- Under torchrun the head runs in DistributedDataParallel and each rank takes its slice of every
  global step (EpochSampler), so each step is the single-process step on the same global batch:
  the BatchNorm's batch statistics are all-reduced over the ranks (GlobalBatchNorm; SyncBatchNorm
  runs on CUDA only), and DDP averages the gradients of equal local batches.
- bf16 autocast on CUDA for the encoder (features and head in float32).
- Scored once at the end on every held-out image (classify_split); the result is the last epoch's
  (no selection on held-out images).
- Rank 0 saves the head and optimizer after every epoch (`save_to`); a run stopped between two
  saves continues from the last (`resume_from`) exactly as if it had not stopped: the data order,
  augmentation and lr are functions of the seed, the epoch and the step.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from energyvit.checkpoint import load_checkpoint, load_weights, save_checkpoint
from energyvit.data.loader import training_loader
from energyvit.data.pixels import to_float_pixels
from energyvit.data.splits import DataSplits
from energyvit.distributed import DistInfo, all_ranks_true, all_reduce_sum, sum_over_ranks, wrap_ddp
from energyvit.evaluation.features import pool_tokens
from energyvit.evaluation.streaming import classify_split
from energyvit.lars import LARS
from energyvit.model import EnergyViT
from energyvit.options import below_one, check_fields, non_negative, option, positive
from energyvit.sampling import EpochSampler, derive_seed
from energyvit.training import PRECISIONS, TrainingDiverged, amp_dtype, cosine_lr

PROBE_OPTIMIZERS = ("lars", "sgd")
HEAD_INIT_STD = 0.01  # MAE (after MoCo v3): the linear layer's initial weights


@dataclass(frozen=True)
class MAEProbeOptions:
    """`--protocol mae`. The defaults are sized for small data (the digits: 10 epochs of SGD);
    MAE's ViT-B ImageNet recipe is --optimizer lars --epochs 90 --warmup_epochs 10 --blr 0.1
    --weight_decay 0 at an effective batch of 16384, on class-token features (--pool cls)."""

    epochs: int = option(10, "training epochs (--protocol mae; MAE on ImageNet: 90)", rule=positive)
    warmup_epochs: int = option(1, "epochs of linear lr warmup (--protocol mae; MAE: 10)", rule=non_negative)
    batch_size: int = option(256, "images per process per step of --protocol mae (effective batch = batch_size x "
                             "processes), and per batch of the feature passes", rule=positive)
    blr: float = option(0.1, "base lr: lr = blr * effective batch / 256 (--protocol mae)", rule=positive)
    lr: float | None = option(None, "absolute lr (overrides --blr; --protocol mae)", parse=float, rule=positive)
    optimizer: str = option("sgd", "optimizer of the head (--protocol mae): SGD with momentum, or LARS as MAE on "
                            "ImageNet (its steps are a fixed fraction of the weights' norm: small data takes too few "
                            "of them)", choices=PROBE_OPTIMIZERS)
    momentum: float = option(0.9, "momentum of the optimizer (--protocol mae)", rule=below_one)
    weight_decay: float = option(0.0, "weight decay of the head's weights (--protocol mae; MAE: 0)",
                                 rule=non_negative)
    precision: str = option("auto", "auto: bf16 autocast on CUDA, fp32 on the CPU (features in fp32 either way)",
                            choices=PRECISIONS)
    seed: int = option(0, "seed of the data order, augmentation and head init (--protocol mae)")

    def __post_init__(self) -> None:
        check_fields(self)

    def lr_for(self, processes: int) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size * processes / 256


class GlobalBatchNorm(nn.Module):
    """BatchNorm1d without affine parameters whose training-mode statistics are those of the global
    batch: the per-feature sums are all-reduced over the ranks (differentiably, so gradients through
    the statistics are right too). In one process it is torch's BatchNorm1d(affine=False):
    normalization by the biased batch variance, running statistics with the unbiased one, updated
    with `momentum`, or (None) as the mean over all batches so far."""

    def __init__(self, num_features: int, eps: float = 1e-6, momentum: float | None = None,
                 dist: DistInfo = DistInfo()) -> None:
        super().__init__()
        self.eps, self.momentum, self.dist = eps, momentum, dist
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return (x - self.running_mean) / torch.sqrt(self.running_var + self.eps)
        total = sum_over_ranks(torch.cat([x.sum(0), x.new_full((1,), len(x))]), self.dist)
        count, mean = total[-1], total[:-1] / total[-1]
        centered = x - mean
        var = sum_over_ranks(centered.square().sum(0), self.dist) / count  # two passes: no cancellation
        with torch.no_grad():
            self.num_batches_tracked += 1
            weight = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
            self.running_mean.mul_(1 - weight).add_(mean, alpha=weight)
            self.running_var.mul_(1 - weight).add_(var * count / (count - 1), alpha=weight)
        return centered / torch.sqrt(var + self.eps)


def probe_head(feature_dim: int, num_classes: int, seed: int, dist: DistInfo = DistInfo()) -> nn.Sequential:
    """MAE's linear-probe head: BatchNorm without affine, then a linear layer (seeded init).

    One change from MAE: the BatchNorm's running statistics (what the held-out images are
    normalized by) are the mean over all training batches, not an exponential average with
    momentum 0.1. The encoder is frozen, so the features' distribution does not drift, and the
    exponential average still holds 0.9^n of its initial zeros and ones after n steps: nothing on
    ImageNet (thousands of steps), a wrong normalization on small data (the digits take 6 steps per
    epoch at batch 256)."""
    linear = nn.Linear(feature_dim, num_classes)
    with torch.no_grad():
        nn.init.trunc_normal_(linear.weight, std=HEAD_INIT_STD, generator=torch.Generator().manual_seed(seed))
        linear.bias.zero_()
    return nn.Sequential(GlobalBatchNorm(feature_dim, dist=dist), linear)


class ProbedEncoder(nn.Module):
    """Images -> logits: the frozen encoder's pooled final tokens through the probe head, both in
    the encoder's dtype (float32, even when the encoder runs under bf16 autocast)."""

    def __init__(self, encoder: EnergyViT, pool: str, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.pool, self.head = encoder, pool, head
        self.dtype = encoder.pixel_mean.dtype

    def features(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return pool_tokens(self.encoder.forward_features(x.to(self.dtype)), self.pool).to(self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        feats = self.features(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.head(feats)


def feature_dim(encoder: EnergyViT, pool: str) -> int:
    return encoder.cfg.embed_dim * (encoder.cfg.num_patches if pool == "tokens" else 1)


def make_optimizer(head: nn.Module, options: MAEProbeOptions, lr: float) -> torch.optim.Optimizer:
    if options.optimizer == "lars":
        return LARS(head.parameters(), lr=lr, weight_decay=options.weight_decay, momentum=options.momentum)
    matrices = [p for p in head.parameters() if p.ndim > 1]
    vectors = [p for p in head.parameters() if p.ndim <= 1]  # biases: no weight decay, as LARS
    return torch.optim.SGD([{"params": matrices, "weight_decay": options.weight_decay},
                            {"params": vectors, "weight_decay": 0.0}], lr=lr, momentum=options.momentum)


def probe_setup(encoder: EnergyViT, pool: str, data: DataSplits, options: MAEProbeOptions, dist: DistInfo) -> dict:
    """What a resumed probe must share with the run it continues: every option but the precision,
    the pooling, the effective batch, the training set's size and the encoder's weights (their
    float64 sum and sum of squares)."""
    weights = [t.detach().double().cpu() for t in encoder.state_dict().values() if t.is_floating_point()]
    return {**{k: v for k, v in asdict(options).items() if k != "precision"}, "pool": pool,
            "effective_batch": options.batch_size * dist.world_size, "num_train": data.num_train,
            "encoder": [sum(w.sum().item() for w in weights), sum(w.square().sum().item() for w in weights)]}


def resume_state(path: str | Path, setup: dict) -> dict:
    state = load_checkpoint(path)
    if not {"head", "optimizer", "epoch", "history", "setup"} <= set(state):
        raise ValueError(f"{path} is not a probe state of `energyvit probe --protocol mae`")
    changed = [f"{k} {state['setup'].get(k)!r} (now {v!r})" for k, v in setup.items() if state["setup"].get(k) != v]
    if changed:
        raise ValueError(f"{path} is the probe of other settings, it cannot be continued here: {'; '.join(changed)}")
    return state


def train_mae_probe(encoder: EnergyViT, pool: str, data: DataSplits, options: MAEProbeOptions,
                    dist: DistInfo = DistInfo(), device: torch.device | str = "cpu",
                    log: Callable[[str], None] = print, save_to: str | Path | None = None,
                    resume_from: str | Path | None = None) -> dict:
    """Train MAE's linear probe on the frozen `encoder` over every training image of `data` for
    options.epochs and score it on every held-out image. Under torchrun every rank calls this.
    save_to: the state file rank 0 writes after every epoch; resume_from: one to continue.
    Returns held-out top-1/top-5, the lr, per-epoch history, and the trained head under "head"."""
    if not data.labeled:
        raise ValueError(f"the linear probe needs labels, and {data.description} has none")
    device = torch.device(device)
    if options.batch_size * dist.world_size < 2:
        raise ValueError("--batch_size 1 in one process: the probe's BatchNorm needs at least 2 images per step")
    steps_per_epoch = EpochSampler(data.num_train, options.batch_size, options.seed, 0, dist.rank,
                                   dist.world_size).steps
    encoder.eval().requires_grad_(False)
    head = probe_head(feature_dim(encoder, pool), data.num_classes, derive_seed(options.seed, 1), dist)
    head.to(device, encoder.pixel_mean.dtype)
    model = ProbedEncoder(encoder, pool, head).eval()  # the head alone trains
    ddp = wrap_ddp(head, device) if dist.enabled else None
    lr = options.lr_for(dist.world_size)
    optimizer = make_optimizer(head, options, lr)
    total, warmup = options.epochs * steps_per_epoch, options.warmup_epochs * steps_per_epoch
    dtype = amp_dtype(options.precision, device)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else nullcontext
    setup = probe_setup(encoder, pool, data, options, dist)
    history, start = [], 0
    if resume_from:
        state = resume_state(resume_from, setup)
        load_weights(head, state["head"], resume_from)
        optimizer.load_state_dict(state["optimizer"])
        history, start = state["history"], state["epoch"]
        log(f"continuing {resume_from} after epoch {start}")
    step = start * steps_per_epoch
    # one loader for the whole run (its workers persist); the sampler moves to each epoch
    sampler = EpochSampler(data.num_train, options.batch_size, options.seed, start, dist.rank, dist.world_size)
    loader = training_loader(data.train, options.batch_size, sampler, data.num_workers, device)
    for epoch in range(start, options.epochs):
        t0 = time.perf_counter()
        head.train()
        sampler.set_epoch(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for x, y, _ in loader:
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(lr, step, total, warmup)
            with autocast():
                feats = model.features(to_float_pixels(x, device))
            loss = F.cross_entropy((ddp or head)(feats), torch.as_tensor(y).to(device, torch.long))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not all_ranks_true(bool(torch.isfinite(loss)), dist, device):
                raise TrainingDiverged(f"non-finite probe loss at epoch {epoch} step {step}; lower --blr or --lr")
            optimizer.step()
            loss_sum += loss.detach().double()
            step += 1
        mean_loss = (all_reduce_sum(loss_sum, dist) / (steps_per_epoch * dist.world_size)).item()
        history.append({"epoch": epoch, "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"],
                        "epoch_s": time.perf_counter() - t0})
        if save_to and dist.is_main:
            save_checkpoint(save_to, {"head": head.state_dict(), "optimizer": optimizer.state_dict(),
                                      "epoch": epoch + 1, "history": history, "setup": setup})
        log(f"epoch {epoch + 1}/{options.epochs}  loss {mean_loss:.4f}  lr {history[-1]['lr']:.3g}  "
            f"{history[-1]['epoch_s']:.1f} s")
    scored = classify_split(model, data.held_out_all, options.batch_size, dist, device,
                            num_workers=data.num_workers, precision=options.precision)
    return {"top1": scored["top1"], "top5": scored["top5"], "n_held_out": scored["n"], "lr": lr,
            "effective_batch": options.batch_size * dist.world_size, "steps": total, "history": history,
            "head": head}
