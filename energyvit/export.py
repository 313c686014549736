"""A pretrained energy ViT as a .safetensors file (the `energyvit export` command).

By default the file holds the encoder only, under timm's VisionTransformer key names, so that
`timm.create_model("vit_base_patch16_224", num_classes=0, checkpoint_path=FILE)` loads it with
strict key matching. timm's default `global_pool="token"` keeps the final `norm` before pooling;
its `fc_norm` and, with num_classes=0, its `head` are then Identity and expect no weights. The
energy readout (`energy_head`) and the step sizes (`restore_log_step`) have no place in timm's
model and are left out.

`--full` keeps every tensor of the energy model; the config travels in the metadata, so
`energyvit restore`, `probe` and `finetune` read the file like a checkpoint.

The model normalizes pixels itself, timm does not: feed timm (x - pixel_mean) / pixel_std, with
the values stored in the metadata (`pixel_mean`, `pixel_std`).
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from energyvit.checkpoint import TRAINED_ON, atomic_write, load_model
from energyvit.model import ENERGY_ONLY_KEYS, EnergyViT, EnergyViTConfig, config_to_dict

# (embed_dim, depth, num_heads) of the timm ViTs that share our named architectures
TIMM_ARCHS = {(192, 12, 3): "vit_tiny", (384, 12, 6): "vit_small", (768, 12, 12): "vit_base",
              (1024, 24, 16): "vit_large"}


def timm_model_name(cfg: EnergyViTConfig) -> str | None:
    """The timm model name with this architecture (e.g. vit_base_patch16_224), or None."""
    arch = TIMM_ARCHS.get((cfg.embed_dim, cfg.depth, cfg.num_heads))
    if arch is None or cfg.mlp_ratio != 4.0:
        return None
    return f"{arch}_patch{cfg.patch_size}_{cfg.img_size}"


def timm_kwargs(cfg: EnergyViTConfig) -> dict:
    """Arguments of timm's VisionTransformer that rebuild this encoder (num_classes=0: no head)."""
    return dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
                depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, num_classes=0)


def export_tensors(model: EnergyViT, full: bool = False) -> dict[str, Tensor]:
    """The model's tensors by name; without `full`, only those timm's ViT has."""
    # safetensors stores each tensor on its own: no shared storage, contiguous, on the CPU
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
            if full or not k.startswith(ENERGY_ONLY_KEYS)}


def export_metadata(model: EnergyViT, full: bool, trained: dict[str, str] | None = None) -> dict[str, str]:
    """trained: what the energy was trained on ("mask_fill", "tasks", as `load_model` gives
    them), kept in a full export for `restore`."""
    cfg = model.cfg
    return {
        **({k: v for k, v in (trained or {}).items() if k in TRAINED_ON} if full else {}),
        "format": "pt",
        "contents": "full" if full else "encoder",
        "energyvit_model_config": json.dumps(config_to_dict(cfg)),
        "timm_model": timm_model_name(cfg) or "",
        "timm_kwargs": json.dumps(timm_kwargs(cfg)),
        "pixel_mean": json.dumps(list(cfg.pixel_mean)),
        "pixel_std": json.dumps(list(cfg.pixel_std)),
    }


def export(checkpoint: str | Path, output: str | Path, full: bool = False) -> dict[str, str]:
    """Write `checkpoint`'s model to `output` (.safetensors); returns the file's metadata."""
    from safetensors.torch import save

    output = Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"--output {output} must end in .safetensors (timm picks the loader by extension)")
    model, meta = load_model(checkpoint, need_energy=full)
    metadata = export_metadata(model, full, meta)
    blob = save(export_tensors(model, full), metadata=metadata)
    atomic_write(output, lambda f: f.write(blob))
    return metadata
