"""The model pieces of end-to-end fine-tuning (MAE's recipe; the job is energyvit.finetune): a
classifier head on the encoder's pooled final tokens, stochastic depth added to its blocks, and
the layer ids of layer-wise lr decay.

The model's blocks have no drop path of their own; `add_drop_path` adds it with forward hooks on
each block's two residual branches (attn and mlp), so parameter names stay those of the model.
Its draws come from a generator the caller re-seeds per micro-batch, so a resumed run repeats
them.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from energyvit.evaluation.features import pool_tokens
from energyvit.model import EnergyViT

# A linear head on all patch tokens concatenated is a probe, not MAE's fine-tuning head.
HEAD_POOLINGS = ("mean", "cls")


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


def drop_path(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Zero whole samples of a residual branch with probability p, scale the rest by 1/(1-p)."""
    keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1 - p, generator=generator)
    return x * keep / (1 - p)


def _drop_branch_hook(p: float, generator: torch.Generator | None, module: nn.Module, inputs, output: Tensor) -> Tensor:
    return drop_path(output, p, generator) if module.training else output


def add_drop_path(model: EnergyViT, rate: float, generator: torch.Generator | None = None) -> list:
    """Stochastic depth on every block's attn and mlp branch, rising linearly from 0 at the first
    block to `rate` at the last (timm's rule), drawn from `generator` (on the model's device;
    None: torch's global one); returns the hook handles."""
    depth = len(model.blocks)
    handles = []
    for i, block in enumerate(model.blocks):
        p = rate * i / max(1, depth - 1)
        if p > 0:
            hook = partial(_drop_branch_hook, p, generator)
            handles += [block.attn.register_forward_hook(hook), block.mlp.register_forward_hook(hook)]
    return handles


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and the head."""
    if name.startswith(("encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1
