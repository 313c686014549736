"""End-to-end fine-tuning of a pretrained encoder as a classifier (MAE's fine-tuning recipe).

A linear head on the pooled final tokens (mean of patch tokens, or the class token), trained
with every encoder weight by AdamW with layer-wise lr decay (block i of depth L trains at
lr * decay^(L - i); embeddings at decay^(L + 1); final norm and head at the full lr), stochastic
depth (drop path) and label smoothing, on a cosine schedule with warmup. The training images
come with their dataset's augmentation (the digits' random shift, or random resized crop and
flip for image files). Reports the held-out top-1 accuracy after every epoch; the last epoch's is
the result (no selection on held-out).

The model's blocks have no drop path of their own; `add_drop_path` adds it with forward hooks on
each block's two residual branches (attn and mlp), so parameter names stay those of the model.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from energyvit.data.in_memory import ImageSplit, iterate_batches
from energyvit.data.pixels import to_float_pixels
from energyvit.data.splits import DataSplits
from energyvit.evaluation.features import pool_tokens
from energyvit.model import EnergyViT
from energyvit.options import below_one, check_fields, half_open_unit, non_negative, option, positive
from energyvit.sampling import EpochSampler
from energyvit.training import cosine_lr, param_groups

# A linear head on all patch tokens concatenated is a probe, not MAE's fine-tuning head.
HEAD_POOLINGS = ("mean", "cls")


@dataclass(frozen=True)
class FinetuneOptions:
    pool: str = option("mean", "head input: mean of the final patch tokens, or the class token", choices=HEAD_POOLINGS)
    epochs: int = option(15, "training epochs", rule=positive)
    warmup_epochs: int = option(2, "epochs of linear lr warmup", rule=non_negative)
    batch_size: int = option(64, "images per step", rule=positive)
    blr: float = option(2e-2, "base lr: lr = blr * batch_size / 256", rule=positive)
    lr: float | None = option(None, "absolute lr (overrides --blr)", parse=float, rule=positive)
    layer_decay: float = option(0.75, "layer-wise lr decay per block", rule=half_open_unit)
    weight_decay: float = option(0.05, "AdamW weight decay", rule=non_negative)
    drop_path: float = option(0.1, "stochastic depth rate of the last block", rule=below_one)
    smoothing: float = option(0.1, "label smoothing", rule=below_one)
    seed: int = option(0, "seed of the data order, augmentation and head init")

    def __post_init__(self) -> None:
        check_fields(self)


class Classifier(nn.Module):
    def __init__(self, encoder: EnergyViT, num_classes: int, pool: str = "mean") -> None:
        super().__init__()
        if pool not in HEAD_POOLINGS:
            raise ValueError(f"unknown pooling {pool!r}; choose one of {', '.join(HEAD_POOLINGS)}")
        self.encoder, self.pool = encoder, pool
        self.head = nn.Linear(encoder.cfg.embed_dim, num_classes)
        # tiny initial weights (as MAE): the first updates go to the encoder's features, not a random head
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(pool_tokens(self.encoder.forward_features(x), self.pool))


def drop_path(x: Tensor, p: float) -> Tensor:
    """Zero whole samples of a residual branch with probability p, scale the rest by 1/(1-p)."""
    keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


def _drop_branch_hook(p: float, module: nn.Module, inputs, output: Tensor) -> Tensor:
    return drop_path(output, p) if module.training else output


def add_drop_path(model: EnergyViT, rate: float) -> list:
    """Stochastic depth on every block's attn and mlp branch, rising linearly from 0 at the first
    block to `rate` at the last (timm's rule); returns the hook handles."""
    depth = len(model.blocks)
    handles = []
    for i, block in enumerate(model.blocks):
        p = rate * i / max(1, depth - 1)
        if p > 0:
            hook = partial(_drop_branch_hook, p)
            handles += [block.attn.register_forward_hook(hook), block.mlp.register_forward_hook(hook)]
    return handles


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and the head."""
    if name.startswith(("encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


@torch.no_grad()
def accuracy(model: Classifier, split: ImageSplit, batch_size: int = 256) -> float:
    model.eval()
    device = model.head.weight.device
    correct = sum((model(to_float_pixels(x, device)).argmax(1).cpu() == y).sum().item()
                  for x, y in iterate_batches(split, batch_size, drop_last=False))
    return correct / len(split.labels)


def finetune(encoder: EnergyViT, data: DataSplits, options: FinetuneOptions, device: torch.device | str = "cpu",
             log: Callable[[str], None] = print) -> dict:
    """Fine-tune `encoder` on `data` (labeled); returns the summary (held-out top-1 per epoch and
    final) with the trained classifier under "model"."""
    if not data.labeled:
        raise ValueError(f"fine-tuning needs labels, and {data.description} has none")
    for p in encoder.energy_parameters():  # the energy readout and step sizes play no part here
        p.requires_grad_(False)
    torch.manual_seed(options.seed)  # the head's initial weights
    model = Classifier(encoder, data.num_classes, options.pool).to(device)
    add_drop_path(encoder, options.drop_path)
    lr = options.lr if options.lr is not None else options.blr * options.batch_size / 256
    depth = len(encoder.blocks)
    optimizer = torch.optim.AdamW(param_groups(model, options.weight_decay, options.layer_decay,
                                               lambda name: layer_id(name, depth)), lr=lr)
    if options.batch_size > data.num_train:
        raise ValueError(f"--batch_size {options.batch_size} exceeds the {data.num_train} training images")
    steps_per_epoch = EpochSampler(data.num_train, options.batch_size, options.seed, 0).steps
    total, warmup = options.epochs * steps_per_epoch, options.warmup_epochs * steps_per_epoch

    history, step = [], 0
    for epoch in range(options.epochs):
        model.train()
        t0, loss_sum = time.perf_counter(), 0.0
        sampler = EpochSampler(data.num_train, options.batch_size, options.seed, epoch)
        loader = DataLoader(data.train, batch_size=options.batch_size, sampler=sampler, num_workers=data.num_workers,
                            drop_last=True)
        for x, y, _ in loader:
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(lr, step, total, warmup) * group["lr_scale"]
            loss = F.cross_entropy(model(to_float_pixels(x, device)), y.to(device), label_smoothing=options.smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, step = loss_sum + loss.item(), step + 1
        top1 = accuracy(model, data.held_out)
        history.append({"epoch": epoch, "loss": loss_sum / steps_per_epoch, "held_out_top1": top1,
                        "epoch_s": time.perf_counter() - t0})
        log(f"epoch {epoch + 1}/{options.epochs}  loss {history[-1]['loss']:.4f}  held-out top-1 {top1:.4f}")
    return {"held_out_top1": history[-1]["held_out_top1"], "history": history, "lr": lr,
            "n_train": data.num_train, "n_held_out": len(data.held_out.labels), "model": model}
