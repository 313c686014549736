"""Linear probe of every block's patch tokens of finished digits runs, next to the same block of
the architecture at random init: which depth holds the best frozen features.

    python experiments/probe_blocks.py RUN_DIR [RUN_DIR ...] --out experiments/results/probe_blocks.json

Each RUN_DIR is an `energyvit pretrain` output directory on the embedded digits (its
summary.json gives the seed, checkpoint-last.pth the weights). Features of block l: the
residual stream after block l, patch tokens only, layer-normalized without affine (what the
final norm does for the `norm` readout; the probe standardizes each feature anyway), then
concatenated. The random-init model is seeded as `energyvit pretrain` seeds its own (seed + 2),
so the last block reproduces summary.json's `tokens` numbers; the script checks that it does.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from energyvit.benchmark import cpu_model, git_commit, mean_std
from energyvit.checkpoint import load_model
from energyvit.data.digits import load_digits
from energyvit.model import EnergyViT
from energyvit.evaluation.probes import linear_probe


@torch.no_grad()
def block_features(model: EnergyViT, images: Tensor) -> list[Tensor]:
    """Per block: (n, num_patches * D) layer-normalized patch tokens of its output, caught by
    forward hooks during the model's own forward_tokens."""
    out: list[Tensor] = []

    def keep(module, inputs, h: Tensor) -> None:
        out.append(F.layer_norm(h[:, 1:], h.shape[-1:], eps=1e-6).flatten(1))

    handles = [block.register_forward_hook(keep) for block in model.blocks]
    try:
        model.eval().forward_tokens(images)
    finally:
        for handle in handles:
            handle.remove()
    return out


def probe_run(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    model, _ = load_model(run / "checkpoint-last.pth")
    torch.manual_seed(summary["seed"] + 2)
    random_model = EnergyViT(model.cfg).eval()
    train, held = load_digits(model.cfg.img_size)
    result = {"run": str(run), "seed": summary["seed"]}
    for key, m in (("pretrained", model), ("random_init", random_model)):
        train_f, held_f = block_features(m, train.images), block_features(m, held.images)
        result[key] = [linear_probe(a, train.labels, b, held.labels) for a, b in zip(train_f, held_f)]
        expected = summary["probe_by_pool"]["tokens"][key]
        if abs(result[key][-1] - expected) > 1e-9:
            raise RuntimeError(f"{run}: last block {key} probe {result[key][-1]:.4f} does not reproduce "
                               f"summary.json's {expected:.4f}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--num_threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.num_threads)
    runs = []
    for run in args.runs:
        runs.append(probe_run(run))
        r = runs[-1]
        print(f"seed {r['seed']}: " + "  ".join(f"block {i} {a:.4f} vs {b:.4f}"
                                              for i, (a, b) in enumerate(zip(r["pretrained"], r["random_init"]))),
              flush=True)
    blocks = {}
    for i in range(len(runs[0]["pretrained"])):
        blocks[f"block{i}"] = {key: mean_std([r[key][i] for r in runs]) for key in ("pretrained", "random_init")}
        blocks[f"block{i}"]["margin"] = mean_std([r["pretrained"][i] - r["random_init"][i] for r in runs])
        m = blocks[f"block{i}"]["margin"]
        print(f"block {i}: pretrained - random init {100 * m['mean']:+.1f} ± {100 * m['std']:.1f} points")
    results = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                           "python": platform.python_version()},
               "date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "blocks": blocks, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
