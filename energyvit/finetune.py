"""`energyvit finetune`: end-to-end fine-tuning of a pretrained encoder as a digit classifier.

A linear head on the pooled final tokens (mean of patch tokens, or the class token), trained
with every encoder weight by AdamW with layer-wise lr decay (block i of depth L trains at
lr * decay^(L - i); embeddings at decay^(L + 1); final norm and head at the full lr), stochastic
depth (drop path) and label smoothing, on a cosine schedule with warmup. Reports the held-out
top-1 accuracy after every epoch; the last epoch's is the result (no selection on held-out).

The model's blocks have no drop path of their own; `add_drop_path` adds it with forward hooks on
each block's two residual branches (attn and mlp), so parameter names stay those of the model.
"""
from __future__ import annotations

import argparse
import json
import time
from argparse import Namespace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from energyvit.checkpoint import ENERGY_ONLY_KEYS, load_model, save_checkpoint, save_json
from energyvit.data import ImageSplit, iterate_batches, random_shift
from energyvit.engine import cosine_lr
from energyvit.evaluate import digits_for
from energyvit.model import EnergyViT, config_to_dict
from energyvit.probe import pool_tokens

POOLS = ("mean", "cls")


class Classifier(nn.Module):
    def __init__(self, encoder: EnergyViT, num_classes: int, pool: str = "mean") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}")
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


def param_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """One group per (layer, decayed or not), each with its `lr_scale`; no weight decay on biases,
    norms and tokens (1-d or leading dimension 1), as in pretraining."""
    depth = len(model.encoder.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, decay = layer_id(name, depth), not (p.ndim <= 1 or p.shape[0] == 1)
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
    return list(groups.values())


@torch.no_grad()
def accuracy(model: Classifier, split: ImageSplit, batch_size: int = 256) -> float:
    model.eval()
    device = model.head.weight.device
    correct = sum((model(x.to(device)).argmax(1).cpu() == y).sum().item()
                  for x, y in iterate_batches(split, batch_size, drop_last=False))
    return correct / len(split.labels)


def finetune(encoder: EnergyViT, args: Namespace, log=print) -> dict:
    """Fine-tune `encoder` on the digits; returns the summary (held-out top-1 per epoch and final)."""
    for name, p in encoder.named_parameters():
        if name.startswith(ENERGY_ONLY_KEYS):  # the energy readout and step sizes play no part here
            p.requires_grad_(False)
    train, held_out = digits_for(encoder)
    model = Classifier(encoder, int(train.labels.max()) + 1, args.pool).to(args.device)
    add_drop_path(encoder, args.drop_path)
    lr = args.lr if args.lr is not None else args.blr * args.batch_size / 256
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay, args.layer_decay), lr=lr)
    steps_per_epoch = len(train.labels) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch_size {args.batch_size} exceeds the {len(train.labels)} training images")
    total, warmup = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(args.seed)

    history, step = [], 0
    for epoch in range(args.epochs):
        model.train()
        t0, loss_sum = time.perf_counter(), 0.0
        for x, y in iterate_batches(train, args.batch_size, generator):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(lr, step, total, warmup) * group["lr_scale"]
            x = random_shift(x, args.shift, generator).to(args.device)
            loss = F.cross_entropy(model(x), y.to(args.device), label_smoothing=args.smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, step = loss_sum + loss.item(), step + 1
        top1 = accuracy(model, held_out)
        history.append({"epoch": epoch, "loss": loss_sum / steps_per_epoch, "held_out_top1": top1,
                        "epoch_s": time.perf_counter() - t0})
        log(f"epoch {epoch + 1}/{args.epochs}  loss {history[-1]['loss']:.4f}  held-out top-1 {top1:.4f}")
    return {"held_out_top1": history[-1]["held_out_top1"], "history": history, "lr": lr,
            "n_train": len(train.labels), "n_held_out": len(held_out.labels), "model": model}


def add_args(p: argparse.ArgumentParser) -> None:
    from energyvit.cli import add, device, positive_int  # here: cli imports this module

    p.add_argument("checkpoint", help="checkpoint-last.pth of `energyvit pretrain` or an `export` file")
    add(p, "--pool", choices=POOLS, default="mean",
        help="head input: mean of the final patch tokens, or the class token")
    add(p, "--epochs", type=positive_int, default=15)
    add(p, "--warmup_epochs", type=int, default=2)
    add(p, "--batch_size", type=positive_int, default=64)
    add(p, "--blr", type=float, default=2e-2, help="base lr: lr = blr * batch_size / 256")
    add(p, "--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    add(p, "--layer_decay", type=float, default=0.75, help="layer-wise lr decay per block")
    add(p, "--weight_decay", type=float, default=0.05)
    add(p, "--drop_path", type=float, default=0.1, help="stochastic depth rate of the last block")
    add(p, "--smoothing", type=float, default=0.1, help="label smoothing")
    add(p, "--shift", type=int, default=1, help="augmentation: random translation up to this many pixels")
    add(p, "--random_init", action="store_true",
        help="baseline: the checkpoint's architecture at random init (seeded), not its weights")
    add(p, "--output_dir", default=None, help="default: 'finetune' beside the checkpoint")
    add(p, "--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    add(p, "--seed", type=int, default=0)
    add(p, "--num_threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def run(args: Namespace) -> dict:
    if not 0 < args.layer_decay <= 1:
        raise ValueError(f"--layer_decay must be in (0, 1], got {args.layer_decay}")
    if not 0 <= args.drop_path < 1:
        raise ValueError(f"--drop_path must be in [0, 1), got {args.drop_path}")
    if not 0 <= args.smoothing < 1:
        raise ValueError(f"--smoothing must be in [0, 1), got {args.smoothing}")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    encoder, _ = load_model(args.checkpoint, need_energy=False)
    if args.random_init:
        encoder = EnergyViT(encoder.cfg)
    out = Path(args.output_dir) if args.output_dir else Path(args.checkpoint).parent / "finetune"
    out.mkdir(parents=True, exist_ok=True)
    print(f"energyvit finetune: {'random init' if args.random_init else args.checkpoint}, {encoder.cfg.depth} blocks, "
          f"pool {args.pool}, layer decay {args.layer_decay}, drop path {args.drop_path}, smoothing {args.smoothing}")
    result = finetune(encoder, args)
    model = result.pop("model")
    with open(out / "log.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in result["history"])
    save_checkpoint(out / "checkpoint-finetuned.pth", {
        "model": model.state_dict(), "model_config": config_to_dict(encoder.cfg), "pool": args.pool,
        "num_classes": model.head.out_features, "args": vars(args),
    })
    summary = {"checkpoint": str(args.checkpoint), "random_init": args.random_init, **result}
    save_json(out / "summary.json", summary)
    print(f"held-out top-1 after {args.epochs} epochs: {result['held_out_top1']:.4f}  (wrote {out})")
    return summary
