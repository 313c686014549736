"""`energyvit export`: write a pretrained encoder as timm-loadable .safetensors (energyvit.export)."""
from __future__ import annotations

import argparse
import json

from energyvit.export import export

HELP = "write a pretrained encoder as timm-loadable .safetensors"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint-last.pth of `energyvit pretrain` (or a --full export)")
    p.add_argument("--output", "-o", required=True, help="FILE.safetensors to write")
    p.add_argument("--full", action="store_true",
                   help="keep the energy readout and step sizes too (for restore/probe/finetune), not timm-only")


def run(args: argparse.Namespace) -> dict[str, str]:
    meta = export(args.checkpoint, args.output, args.full)
    kwargs = json.loads(meta["timm_kwargs"])
    if args.full:
        print(f"wrote {args.output}: the full energy model (encoder, energy readout, step sizes) and its config")
    else:
        name = meta["timm_model"]
        how = (f"timm.create_model({name!r}, num_classes=0, in_chans={kwargs['in_chans']}, checkpoint_path=...)"
               if name else f"timm.models.vision_transformer.VisionTransformer(**{kwargs}) + load_state_dict")
        print(f"wrote {args.output}: encoder with timm VisionTransformer keys; load with {how}")
        print(f"inputs for timm: (x - pixel_mean) / pixel_std with pixel_mean {meta['pixel_mean']}, "
              f"pixel_std {meta['pixel_std']} (x in [0, 1])")
    return meta
