"""MAE baseline (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners"): the model,
and the method behind the training loop's PretrainingMethod interface.

The encoder is the project's `EnergyViT`, so after pretraining `model.encoder.state_dict()` has
the same timm key names as an energy-pretrained model and loads in the probe, finetune and
export tools. MAE never uses the encoder's energy: `pretrain` builds its encoder without an
energy head (`--energy_head_depth`), and `restore_log_step` (and `energy_head` for the `linear`
readout) keep their initial values.

The encoder sees only the visible patches (plus the class token); a small decoder fills in mask
tokens at the hidden positions and predicts the pixels of every patch; the loss is the mean
squared error over the hidden patches only. Decoder parameters keep MAE's names (`mask_token`,
`decoder_embed`, `decoder_pos_embed`, `decoder_blocks`, `decoder_norm`, `decoder_pred`).

Pixels are predicted in the model's normalized space, (x - pixel_mean) / pixel_std, with one patch
flattened as (p, p, C) as in MAE's `patchify`; with `norm_pix_loss` the targets are each patch's
normalized pixels standardized by that patch's own mean and variance (MAE's definition).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from energyvit.checkpoint import load_checkpoint, load_weights
from energyvit.losses import restoration_loss, with_psnr
from energyvit.methods.base import Samples
from energyvit.model import Block, EnergyViT, EnergyViTConfig, config_from_dict, init_linear_and_norm, patchify, \
    sincos_pos_embed
from energyvit.options import check_fields, open_unit, option
from energyvit.sampling import seeded_generator
from energyvit.training import StepLoss

# MAE's decoder for ViT-B/L/H: 512 wide, 8 blocks, 16 heads of width 32.
MAE_DECODER_WIDTH = 512
MAE_DECODER_DEPTH = 8
DECODER_HEAD_DIM = 32


@dataclass(frozen=True)
class MAEDecoderConfig:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.embed_dim <= 0 or self.embed_dim % 4:
            raise ValueError(f"decoder embed_dim must be a positive multiple of 4 (sin-cos position "
                             f"embedding), got {self.embed_dim}")
        if self.num_heads <= 0 or self.embed_dim % self.num_heads:
            raise ValueError(f"decoder embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.depth < 1:
            raise ValueError(f"decoder depth must be >= 1, got {self.depth}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"decoder mlp_ratio must be > 0, got {self.mlp_ratio}")


def default_decoder(encoder_cfg: EnergyViTConfig) -> MAEDecoderConfig:
    """A decoder two thirds as wide and as deep as the encoder, capped at MAE's 512 x 8.

    Two thirds is the ratio of MAE's decoder to ViT-B (512 of 768 wide, 8 of 12 blocks), so ViT-B
    gets MAE's decoder exactly, and larger encoders keep it, as in MAE. The width is rounded to a
    multiple of 32 (at least 32) and split into heads of width 32 as in MAE; the depth is rounded
    down, at least 1. E.g. vit_pico_patch2 -> 32 x 1 (1 head), vit_nano_patch4 -> 32 x 2 (1),
    vit_micro_patch4 -> 96 x 4 (3), vit_tiny_patch16 -> 128 x 8 (4), vit_small_patch16 -> 256 x 8
    (8), vit_base_patch16 and vit_large_patch16 -> 512 x 8 (16).
    """
    width = min(MAE_DECODER_WIDTH, max(1, round(encoder_cfg.embed_dim * 2 / 3 / DECODER_HEAD_DIM)) * DECODER_HEAD_DIM)
    depth = min(MAE_DECODER_DEPTH, max(1, encoder_cfg.depth * 2 // 3))
    return MAEDecoderConfig(embed_dim=width, depth=depth, num_heads=width // DECODER_HEAD_DIM)


def unpatchify(patches: Tensor, patch_size: int, chans: int) -> Tensor:
    """Inverse of `patchify` for square images: (B, L, p*p*C) -> (B, C, H, W)."""
    B, L, _ = patches.shape
    p, g = patch_size, round(L**0.5)
    if g * g != L or patches.shape[2] != p * p * chans:
        raise ValueError(f"patches {tuple(patches.shape)} are not a square grid of {p}x{p}x{chans} patches")
    x = patches.reshape(B, g, g, p, p, chans).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, chans, g * p, g * p)


def masked_patch_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error per patch, averaged over the patches where `mask` (B, L) is 1.

    pred and target are (B, L, P); the patches where mask is 0 do not enter the loss.
    """
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask "
                         f"{tuple(mask.shape)} do not match as (B, L, P), (B, L, P), (B, L)")
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


class MAEBaseline(nn.Module):
    """An EnergyViT encoder trained as a masked autoencoder: `forward_loss` is the training loss."""

    def __init__(
        self,
        encoder_cfg: EnergyViTConfig,
        decoder: MAEDecoderConfig | None = None,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        attn_backend: str | None = None,
    ) -> None:
        """attn_backend: the attention of encoder and decoder, e.g. "sdpa" (MAE's step is first
        order, so any backend serves); None: the encoder's config's, and math in the decoder."""
        super().__init__()
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.decoder_cfg = decoder or default_decoder(encoder_cfg)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        if attn_backend is not None:
            encoder_cfg = replace(encoder_cfg, attn_backend=attn_backend)
        self.encoder = EnergyViT(encoder_cfg)

        dec = self.decoder_cfg
        num_patches = encoder_cfg.num_patches
        # Block takes a full EnergyViTConfig; the decoder's only changes width, depth and heads.
        block_cfg = replace(encoder_cfg, embed_dim=dec.embed_dim, depth=dec.depth, num_heads=dec.num_heads,
                            mlp_ratio=dec.mlp_ratio, attn_backend=attn_backend or "math")
        self.decoder_embed = nn.Linear(encoder_cfg.embed_dim, dec.embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec.embed_dim))
        grid = encoder_cfg.img_size // encoder_cfg.patch_size
        pos = torch.cat([torch.zeros(1, dec.embed_dim), sincos_pos_embed(dec.embed_dim, grid)])
        self.decoder_pos_embed = nn.Parameter(pos.unsqueeze(0), requires_grad=False)  # fixed, as MAE
        self.decoder_blocks = nn.ModuleList(Block(block_cfg) for _ in range(dec.depth))
        self.decoder_norm = nn.LayerNorm(dec.embed_dim, eps=1e-6)
        patch_dim = encoder_cfg.patch_size**2 * encoder_cfg.in_chans
        self.decoder_pred = nn.Linear(dec.embed_dim, patch_dim)
        # round, not MAE's int(L * (1 - ratio)): int truncates e.g. 10 * (1 - 0.9) = 0.99.. to 0.
        # Counted like the `mim` task's masked patches, and at least one visible and one masked.
        self.num_masked = min(num_patches - 1, max(1, round(mask_ratio * num_patches)))
        self._init_decoder_weights()

    def _init_decoder_weights(self) -> None:
        # MAE's init; the encoder already initialized itself the same way in EnergyViT.
        nn.init.normal_(self.mask_token, std=0.02)
        decoder_modules = [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]
        init_linear_and_norm(sub for part in decoder_modules for sub in part.modules())

    @property
    def num_visible(self) -> int:
        """Patches the encoder sees per image: num_patches - round(mask_ratio * num_patches)."""
        return self.encoder.cfg.num_patches - self.num_masked

    def random_masking(self, batch: int, device: torch.device, generator: torch.Generator | None = None
                       ) -> tuple[Tensor, Tensor]:
        """Per-image random masking as MAE: sort uniform noise, keep the `num_visible` lowest.

        Returns ids_shuffle (B, L) (the first num_visible are kept) and ids_restore (B, L), its
        inverse permutation. The noise is drawn on the generator's device (the images' device
        without one), then moved: a CPU generator gives the same masks on any device.
        """
        L = self.encoder.cfg.num_patches
        noise_device = generator.device if generator is not None else device
        noise = torch.rand(batch, L, generator=generator, device=noise_device).to(device)
        ids_shuffle = noise.argsort(dim=1)
        return ids_shuffle, ids_shuffle.argsort(dim=1)

    def encode_visible(self, images: Tensor, generator: torch.Generator | None = None
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """Encode a random subset of the patches of pixel-space images (B, C, H, W) in [0, 1].

        Returns latent (B, 1 + num_visible, D) after the encoder's final norm (class token
        first), mask (B, L) with 1 on the hidden patches, and ids_restore (B, L).
        """
        ids_shuffle, ids_restore = self.random_masking(images.shape[0], images.device, generator)
        mask = self.hidden_mask(ids_restore).to(images.dtype)
        return self.encode_kept(images, ids_shuffle[:, : self.num_visible]), mask, ids_restore

    def hidden_mask(self, ids_restore: Tensor) -> Tensor:
        """(B, L) float, 1 on the patches `random_masking` hid, in patch order."""
        mask = torch.ones(ids_restore.shape, device=ids_restore.device)
        mask[:, : self.num_visible] = 0
        return mask.gather(1, ids_restore)  # back to patch order

    def encode_kept(self, images: Tensor, ids_keep: Tensor) -> Tensor:
        """The encoder's latent (B, 1 + V, D), after its final norm, of the V patches `ids_keep`
        (B, V) of each image: what `decode` reads, whatever V is."""
        enc = self.encoder
        tokens = enc.embed_patches(images)  # checks the shape; position embedding already added
        B, _, D = tokens.shape
        x = tokens.gather(1, ids_keep[..., None].expand(-1, -1, D))
        cls = enc.cls_token + enc.pos_embed[:, :1]
        x = torch.cat([cls.expand(B, -1, -1), x], dim=1)
        for block in enc.blocks:
            x = block(x)
        return enc.norm(x)

    def decode(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Predicted patches (B, L, p*p*C) in normalized pixel space from `encode_visible`'s latent."""
        x = self.decoder_embed(latent)
        B, _, D = x.shape
        L = ids_restore.shape[1]
        # Visible tokens, then one mask token per hidden patch, unshuffled to patch order.
        patches = torch.cat([x[:, 1:], self.mask_token.expand(B, L + 1 - x.shape[1], -1)], dim=1)
        patches = patches.gather(1, ids_restore[..., None].expand(-1, -1, D))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def targets(self, images: Tensor) -> Tensor:
        """The patches the decoder should predict (B, L, p*p*C), in normalized pixel space."""
        target = patchify(self.encoder.normalize(images), self.encoder.cfg.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """MAE's loss: mean squared error of the predicted pixels over the hidden patches only."""
        return self.masked_loss(images, *self.random_masking(images.shape[0], images.device, generator))

    def masked_loss(self, images: Tensor, ids_shuffle: Tensor, ids_restore: Tensor) -> Tensor:
        """MAE's loss under given masks (`random_masking`'s output), e.g. fixed ones."""
        latent = self.encode_kept(images, ids_shuffle[:, : self.num_visible])
        return masked_patch_loss(self.decode(latent, ids_restore), self.targets(images), self.hidden_mask(ids_restore))

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Same as `forward_loss`."""
        return self.forward_loss(images, generator)

    @torch.no_grad()
    def reconstruct(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """For visualization: the predicted images in pixel space and the pixel mask (B, 1, H, W).

        Every patch is predicted, visible ones too; the mask is 1 on the hidden patches, so
        `images * (1 - mask) + pred * mask` pastes the prediction into the hidden region. With
        norm_pix_loss the prediction is un-standardized with the true patch's mean and variance,
        as in MAE's visualization (so it borrows statistics of the hidden patches).
        """
        cfg = self.encoder.cfg
        latent, mask, ids_restore = self.encode_visible(images, generator)
        pred = self.decode(latent, ids_restore)
        if self.norm_pix_loss:
            target = patchify(self.encoder.normalize(images), cfg.patch_size)
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        pred = unpatchify(pred, cfg.patch_size, cfg.in_chans) * self.encoder.pixel_std + self.encoder.pixel_mean
        pixel_mask = unpatchify(mask[..., None].expand(-1, -1, cfg.patch_size**2), cfg.patch_size, 1)
        return pred, pixel_mask


@dataclass(frozen=True)
class MAEOptions:
    mae_mask_ratio: float = option(0.75, "mae: fraction of patches hidden from the encoder", rule=open_unit)
    norm_pix_loss: bool = option(False, "per-patch normalized targets (as MAE)")
    mae_attention: str = option("math", "mae: attention in encoder and decoder: math (the encoder's as --fused "
                                "says, math in the decoder) or sdpa (F.scaled_dot_product_attention, flash where "
                                "available: MAE's step is first order)", choices=("math", "sdpa"), resumable=True)

    def __post_init__(self) -> None:
        check_fields(self)


class MAEMethod:
    name = "mae"

    def __init__(self, encoder: EnergyViT, opts: MAEOptions) -> None:
        self.module = MAEBaseline(encoder.cfg, mask_ratio=opts.mae_mask_ratio, norm_pix_loss=opts.norm_pix_loss,
                                  attn_backend="sdpa" if opts.mae_attention == "sdpa" else None)
        self.module.encoder.load_state_dict(encoder.state_dict())  # the same initial encoder as the energy method
        self.encoder = self.module.encoder
        self.task_names = ["mae"]
        for p in self.encoder.energy_parameters():
            p.requires_grad_(False)  # MAE never uses the energy parameters

    def step_loss(self, ddp: nn.Module | None = None) -> StepLoss:
        forward = ddp if ddp is not None else self.module

        def step_loss(images: Tensor, labels: Tensor, seed: int) -> tuple[str, Tensor]:
            return "mae", forward(images, seeded_generator(seed, images.device))

        return step_loss

    @torch.no_grad()
    def evaluate(self, images: Tensor, seed: int, keep_samples: int = 0) -> tuple[dict, Samples]:
        """Held-out MSE over the hidden patches (pixel units) of MAE's prediction, next to filling
        them with the per-channel mean pixel; grid samples show input with hidden patches at the
        mean | prediction pasted in | clean."""
        was_training = self.module.training
        self.module.eval()
        device = self.encoder.pixel_mean.device
        gen = torch.Generator(device=device).manual_seed(seed)
        totals = {"mse_corrupted": 0.0, "mse_restored": 0.0}
        samples: Samples = {}
        for i, clean in enumerate(images.split(256)):
            clean = clean.to(device)
            pred, mask = self.module.reconstruct(clean, gen)
            masked = clean * (1 - mask) + self.encoder.pixel_mean * mask
            pasted = clean * (1 - mask) + pred.clamp(0, 1) * mask
            totals["mse_corrupted"] += len(clean) * restoration_loss(masked, clean, mask).item()
            totals["mse_restored"] += len(clean) * restoration_loss(pasted, clean, mask).item()
            if i == 0 and keep_samples:
                samples["mae"] = (masked[:keep_samples].cpu(), [masked[:keep_samples].cpu(), pasted[:keep_samples].cpu()],
                                  clean[:keep_samples].cpu())
        self.module.train(was_training)
        return {"mae": with_psnr({k: v / len(images) for k, v in totals.items()})}, samples

    def record(self) -> dict:
        return {}

    def warnings(self) -> list[str]:
        return []

    def checkpoint_extra(self) -> dict:
        return {"mae": self.module.state_dict()}

    def load_extra(self, state: dict) -> None:
        self.module.load_state_dict(state["mae"])


def load_mae(path) -> MAEBaseline:
    """The whole MAE (encoder and decoder) of a `pretrain --method mae` checkpoint, weights-only,
    in eval mode; ValueError naming the file for anything else."""
    ckpt = load_checkpoint(path)
    if ckpt.get("method") != "mae" or not isinstance(ckpt.get("mae"), dict) or \
            not isinstance(ckpt.get("model_config"), dict):
        raise ValueError(f"{path} is not a checkpoint of `energyvit pretrain --method mae` (it needs the decoder)")
    args = ckpt["args"] if isinstance(ckpt.get("args"), dict) else {}
    try:
        mae = MAEBaseline(config_from_dict(ckpt["model_config"]), mask_ratio=float(args.get("mae_mask_ratio", 0.75)),
                          norm_pix_loss=bool(args.get("norm_pix_loss", False)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} has an unusable model config: {e}") from None
    load_weights(mae, ckpt["mae"], path)
    return mae.eval()
