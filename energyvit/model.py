"""The energy ViT: one vision transformer whose forward pass maps an image to a scalar energy.

Parameter names follow timm's VisionTransformer (patch_embed.proj, cls_token, pos_embed,
blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm; LayerNorm eps 1e-6) so the
encoder loads in timm. What timm does not have lives under other names: `energy_head` (the
readout of the `linear` energy) and `restore_log_step` (the learnable restoration step sizes).

Images enter in pixel space ([0, 1] per channel); the model normalizes them with the per-channel
mean/std of its config, so corruptions, noise levels and losses are all stated in pixel units.

Sparse restoration: the energy's `keep` argument, (B, n) patch indices, lets only those patches
enter (every patch is embedded, then the others are dropped, as MAE drops hidden patches); the
energy head reads the same tokens, with its position embedding gathered the same way.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn

from energyvit.attention import BACKENDS, attention, packed_attention
from energyvit.norm_act import LN_GELU_BACKENDS, gelu, layer_norm
from energyvit.options import OptionError, check_fields, in_range, non_negative, option, positive

ENERGY_READOUTS = ("norm", "linear", "cls")
# Parameter names timm's VisionTransformer has no place for: the `linear` readout, the energy
# head's blocks and the step sizes.
ENERGY_ONLY_KEYS = ("energy_head.", "energy_embed.", "energy_pos_embed", "energy_blocks.", "restore_log_step")
HEAD_DIM = 32  # width of one attention head in the energy head's blocks (as MAE's decoder)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EnergyViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    energy: str = "norm"  # readout: see EnergyViT.energy_from_tokens
    energy_head_depth: int = 0  # transformer blocks between the encoder's features and the readout
    energy_head_dim: int = 0  # their width; 0: the encoder's
    restore_steps: int = 2  # K, gradient steps of restoration (1..8)
    step_size_init: float = 1.0  # initial a_k for every step
    attn_backend: str = "math"
    ln_gelu_backend: str = "aten"  # LayerNorm and GELU: aten, or fused Triton kernels (energyvit.norm_act)
    pixel_mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    pixel_std: tuple[float, ...] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.energy not in ENERGY_READOUTS:
            raise ValueError(f"unknown energy readout {self.energy!r}; choose one of {', '.join(ENERGY_READOUTS)}")
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {self.attn_backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.ln_gelu_backend not in LN_GELU_BACKENDS:
            raise ValueError(f"unknown LayerNorm/GELU backend {self.ln_gelu_backend!r}; choose one of "
                             f"{', '.join(LN_GELU_BACKENDS)}")
        if self.energy_head_depth < 0 or self.energy_head_dim < 0 or self.energy_head_dim % 4:
            raise ValueError(f"energy head depth and width must be >= 0, the width a multiple of 4, got "
                             f"{self.energy_head_depth} and {self.energy_head_dim}")
        if self.energy_head_depth and self.energy == "linear":
            raise ValueError("the linear readout reads the encoder's final norm; with an energy head use norm or cls")
        if not 1 <= self.restore_steps <= 8:
            raise ValueError(f"restore_steps must be in 1..8, got {self.restore_steps}")
        if self.step_size_init <= 0:
            raise ValueError(f"step_size_init must be > 0, got {self.step_size_init}")
        if len(self.pixel_mean) != self.in_chans or len(self.pixel_std) != self.in_chans:
            raise ValueError(
                f"pixel_mean/pixel_std need {self.in_chans} values (in_chans), "
                f"got {len(self.pixel_mean)} and {len(self.pixel_std)}"
            )

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        """Width of the energy head's blocks."""
        return self.energy_head_dim or self.embed_dim


# Named architectures. The small ones are sized for CPU runs on the embedded digits.
MODEL_ARCHS: dict[str, dict] = {
    "vit_pico_patch2": dict(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2),
    "vit_nano_patch4": dict(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4),
    "vit_micro_patch4": dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4),
    "vit_tiny_patch16": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(embed_dim=1024, depth=24, num_heads=16),
}


def model_config(name: str, **overrides) -> EnergyViTConfig:
    """The config of a named architecture, with any field overridden (img_size, in_chans, ...)."""
    if name not in MODEL_ARCHS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_ARCHS)}")
    args = {**MODEL_ARCHS[name], **{k: v for k, v in overrides.items() if v is not None}}
    chans = args.get("in_chans", 3)
    if chans != 3 and "pixel_mean" not in args:  # ImageNet stats only fit RGB
        args["pixel_mean"], args["pixel_std"] = (0.5,) * chans, (0.5,) * chans
    return EnergyViTConfig(**args)


@dataclass(frozen=True)
class ModelOptions:
    """The architecture and energy of a new model (a resumed run takes its checkpoint's)."""

    model: str = option("vit_nano_patch4", "architecture name", choices=tuple(MODEL_ARCHS))
    input_size: int | None = option(None, "image size (default: the model's)", parse=int, rule=positive)
    energy: str = option("norm", "energy readout: norm (half the squared norm of each patch token of the last "
                         "block, over its width, summed), linear (a learned linear map of each normalized patch token, "
                         "summed) or cls (the class token's half squared norm, times the number of patches)",
                         choices=ENERGY_READOUTS)
    energy_head_depth: int = option(2, "transformer blocks that only the energy reads, between the encoder's "
                                    "normalized features and the readout (0: none; not exported)", rule=non_negative)
    energy_head_dim: int | None = option(None, "width of the energy head's blocks (default: half the encoder's)",
                                         parse=int, rule=positive)
    restore_steps: int = option(1, "K, gradient steps of restoration (1..8)", rule=in_range(1, 8), metavar="K")
    step_size_init: float = option(1.0, "initial step size a_k (a_k = exp(learned log step))", rule=positive)
    fused: bool = option(False, "fused Triton attention, LayerNorm and GELU, to second order (LayerNorm and GELU "
                         "stay aten's under --compile, which fuses them itself; needs triton and a CUDA GPU, or "
                         "TRITON_INTERPRET=1 on CPU)", resumable=True)

    def __post_init__(self) -> None:
        check_fields(self)
        patch = MODEL_ARCHS[self.model].get("patch_size", EnergyViTConfig.patch_size)
        if self.input_size is not None and self.input_size % patch:
            raise OptionError("input_size", self.input_size, f"a multiple of {self.model}'s patch size {patch}")
        if self.energy_head_dim is not None and self.energy_head_dim % 4:
            raise OptionError("energy_head_dim", self.energy_head_dim, "a multiple of 4")
        if self.energy == "linear" and self.energy_head_depth:
            raise OptionError("energy", self.energy, "norm or cls with an energy head (linear needs "
                              "--energy_head_depth 0)")

    def head_width(self) -> int:
        """The energy head's width: --energy_head_dim, or half the encoder's (a MAE-like decoder,
        the best measured on shapes: docs/results.md)."""
        return self.energy_head_dim or MODEL_ARCHS[self.model]["embed_dim"] // 2

    def config(self, in_chans: int, pixel_mean=None, pixel_std=None, compiled: bool = False) -> EnergyViTConfig:
        head_dim = self.head_width() if self.energy_head_depth else 0
        return model_config(self.model, img_size=self.input_size, in_chans=in_chans, energy=self.energy,
                            energy_head_depth=self.energy_head_depth, energy_head_dim=head_dim,
                            restore_steps=self.restore_steps, step_size_init=self.step_size_init,
                            pixel_mean=pixel_mean, pixel_std=pixel_std, **self.backends(compiled))

    def backends(self, compiled: bool = False) -> dict:
        """The config fields --fused sets: how the model runs, not what it is (a resumed run may change
        them). The fused LayerNorm/GELU ops run in an eager (or graphed) step only: in a compiled step
        Inductor fuses aten's LayerNorm and GELU with their neighbours into fewer kernels than the
        opaque custom ops leave (docs/kernels.md, "Launch counts")."""
        return {"attn_backend": "fused" if self.fused else "math",
                "ln_gelu_backend": "fused" if self.fused and not compiled else "aten"}


class PatchEmbed(nn.Module):
    def __init__(self, cfg: EnergyViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, backend: str) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        if self.backend == "fused":
            # the kernels read q, k, v in place and write (B, N, H, d): no permute copies, and the
            # reshape below is a view
            return self.proj(packed_attention(qkv, backend="fused").reshape(B, N, D))
        qkv = qkv.permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, backend: str = "aten") -> None:
        super().__init__()
        self.backend = backend
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(gelu(self.fc1(x), self.backend))


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (timm's parameter names) run by the named backend (energyvit.norm_act)."""

    def __init__(self, dim: int, eps: float, backend: str = "aten") -> None:
        super().__init__(dim, eps=eps)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps, self.backend)


class Block(nn.Module):
    def __init__(self, cfg: EnergyViTConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = LayerNorm(dim, 1e-6, cfg.ln_gelu_backend)
        self.attn = Attention(dim, cfg.num_heads, cfg.attn_backend)
        self.norm2 = LayerNorm(dim, 1e-6, cfg.ln_gelu_backend)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.ln_gelu_backend)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_linear_and_norm(modules) -> None:
    """MAE's init: xavier-uniform linear weights, zero biases, LayerNorms at identity."""
    for m in modules:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def gather_patches(tokens: Tensor, keep: Tensor) -> Tensor:
    """The tokens (B or 1, num_patches, D) of the patches `keep` (B, n) indexes: (B, n, D)."""
    index = keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    return tokens.expand(keep.shape[0], -1, -1).gather(1, index)


def sincos_pos_embed(dim: int, grid: int) -> Tensor:
    """2D sine-cosine position embedding (MAE's), (grid*grid, dim)."""
    if dim % 4:
        raise ValueError(f"embed_dim {dim} must be a multiple of 4 for the 2D sin-cos position embedding")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (ys.flatten(), xs.flatten()):
        out = pos[:, None] * omega[None, :]
        parts += [out.sin(), out.cos()]
    return torch.cat(parts, dim=1).float()


class SplitEnergy(NamedTuple):
    """E(x) with the token streams around the blocks whose second derivatives are dropped."""

    energy: Tensor  # (B,)
    tokens_in: Tensor  # the sequence entering the first block
    cut: Tensor  # the stream entering the last exact_blocks blocks (tokens_in itself when they are all)


class EnergyViT(nn.Module):
    """A ViT whose forward returns one scalar energy per image: low for real images."""

    def __init__(self, cfg: EnergyViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        # Fixed 2D sin-cos embedding (as MAE), stored as a frozen parameter under timm's name.
        grid = cfg.img_size // cfg.patch_size
        pos = torch.cat([torch.zeros(1, cfg.embed_dim), sincos_pos_embed(cfg.embed_dim, grid)])
        self.pos_embed = nn.Parameter(pos.unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = LayerNorm(cfg.embed_dim, 1e-6, cfg.ln_gelu_backend)
        # No bias: a constant shift of the energy has no gradient, so it could never train.
        self.energy_head = nn.Linear(cfg.embed_dim, 1, bias=False) if cfg.energy == "linear" else None
        self.energy_embed = self.energy_pos_embed = self.energy_blocks = None
        if cfg.energy_head_depth:
            # Blocks that only the energy reads, fed the encoder's normalized features (as MAE's
            # decoder is): the readout's demands fall on them, not on the features themselves.
            dh = cfg.head_dim
            self.energy_embed = nn.Linear(cfg.embed_dim, dh)
            head_pos = torch.cat([torch.zeros(1, dh), sincos_pos_embed(dh, grid)])
            self.energy_pos_embed = nn.Parameter(head_pos.unsqueeze(0), requires_grad=False)
            head_cfg = replace(cfg, embed_dim=dh, num_heads=max(1, dh // HEAD_DIM), energy_head_depth=0)
            self.energy_blocks = nn.ModuleList(Block(head_cfg) for _ in range(cfg.energy_head_depth))
        # a_k = exp(restore_log_step[k]) keeps every step size positive.
        self.restore_log_step = nn.Parameter(torch.full((cfg.restore_steps,), math.log(cfg.step_size_init)))
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, -1, 1, 1), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.cls_token, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        init_linear_and_norm(self.modules())

    def energy_parameters(self) -> list[nn.Parameter]:
        """The parameters of the energy alone (readout head, step sizes), not of the encoder."""
        return [p for n, p in self.named_parameters() if n.startswith(ENERGY_ONLY_KEYS)]

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters the energy never reads: the final norm, except for the `linear` readout and an
        energy head. The norm and cls readouts take the residual stream before it (after it every
        token's norm is fixed), so it never gets a gradient; the encoder's features still end with
        it (timm)."""
        reads_norm = self.cfg.energy == "linear" or self.cfg.energy_head_depth > 0
        return [] if reads_norm else list(self.norm.parameters())

    @property
    def step_sizes(self) -> Tensor:
        """The restoration step sizes a_k > 0, one per step."""
        return self.restore_log_step.exp()

    def check_input(self, x: Tensor) -> None:
        cfg = self.cfg
        expected = (cfg.in_chans, cfg.img_size, cfg.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (batch, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point images, got dtype {x.dtype}")

    def check_keep(self, keep: Tensor | None, batch: int, values: bool = True) -> None:
        """ValueError unless `keep` is None or (batch, n) int64 patch indices, 1 <= n <= num_patches.
        values: also check that every index is a patch of the image. That reads them, a host sync:
        the forward, which may run inside a compiled graph, checks the shape only, the callers of
        restoration the values too, except inside a CUDA-graph capture (where a sync is an error)."""
        if keep is None:
            return
        num_patches = self.cfg.num_patches
        if keep.ndim != 2 or keep.shape[0] != batch or not 1 <= keep.shape[1] <= num_patches:
            raise ValueError(f"keep must be (batch {batch}, n) patch indices with 1 <= n <= {num_patches}, got shape "
                             f"{tuple(keep.shape)}")
        if keep.dtype != torch.int64:
            raise TypeError(f"keep must hold int64 patch indices, got dtype {keep.dtype}")
        capturing = keep.is_cuda and torch.cuda.is_current_stream_capturing()
        if values and not capturing and (keep.min() < 0 or keep.max() >= num_patches):
            raise ValueError(f"keep holds indices outside 0..{num_patches - 1} (the image's patches)")

    def normalize(self, x: Tensor) -> Tensor:
        """Pixel-space images -> the model's input space: (x - pixel_mean) / pixel_std per channel."""
        return (x - self.pixel_mean) / self.pixel_std

    def embed_patches(self, x: Tensor) -> Tensor:
        """Patch tokens of pixel-space images with their position embedding (B, num_patches, D).

        The class token is left out so a caller can drop patches first (MAE encodes only the
        visible ones); its position embedding is pos_embed[:, :1].
        """
        self.check_input(x)
        return self.patch_embed(self.normalize(x)) + self.pos_embed[:, 1:]

    def input_tokens(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """The sequence entering the first block: the class token and the patch tokens (of the
        patches `keep` indexes, if given), position embeddings added, (B, 1 + n, D)."""
        x = self.embed_patches(x)
        if keep is not None:
            self.check_keep(keep, x.shape[0], values=False)
            x = gather_patches(x, keep)
        cls = self.cls_token + self.pos_embed[:, :1]
        return torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)

    def forward_tokens(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """The residual stream after the last block (B, 1 + num_patches, D), before the final norm;
        with `keep` (B, n) patch indices, of the class token and those patches only (B, 1 + n, D)."""
        x = self.input_tokens(x, keep)
        for block in self.blocks:
            x = block(x)
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """Final normalized token features (B, 1 + num_patches, D), as timm; index 0 is the class token."""
        return self.norm(self.forward_tokens(x))

    def energy_from_tokens(self, z: Tensor, keep: Tensor | None = None) -> Tensor:
        """Scalar energy per image from the residual stream z of the last block (of the class token
        and the patches `keep` indexes, if given; the sums and the cls scaling are then over those).

        `norm`: half the squared norm of each patch token over the width D, summed over patches.
        `linear`: a learned linear map of each normalized patch token to a scalar, summed.
        `cls`: half the squared norm of the class token over D, times the number of patches; the
        one global token must then carry everything the energy knows about the image.
        Norms are taken before the final LayerNorm (after it every token's norm is fixed), and
        scale with the number of patches so dE/dx per pixel does not depend on image size.
        With an energy head, its blocks first map the normalized features norm(z), and the readout
        takes their residual stream instead.
        """
        z = self._readout_stream(z, keep)
        if self.cfg.energy == "cls":
            return 0.5 * z[:, 0].pow(2).sum(dim=1) * (z.shape[1] - 1) / z.shape[-1]
        return self._patch_terms(z).sum(dim=1)

    def _readout_stream(self, z: Tensor, keep: Tensor | None = None) -> Tensor:
        """The tokens the readout reads: the encoder's residual stream, or the energy head's (whose
        position embedding, with `keep`, is that of the class token and the kept patches)."""
        if self.energy_blocks is not None:
            pos = self.energy_pos_embed
            if keep is not None:
                pos = torch.cat([pos[:, :1].expand(keep.shape[0], -1, -1), gather_patches(pos[:, 1:], keep)], dim=1)
            z = self.energy_embed(self.norm(z)) + pos
            for block in self.energy_blocks:
                z = block(z)
        return z

    def _patch_terms(self, z: Tensor) -> Tensor:
        """(B, num_patches): the `norm` or `linear` readout's term of each patch token."""
        if self.cfg.energy == "norm":
            return 0.5 * z[:, 1:].pow(2).sum(dim=2) / z.shape[-1]
        return self.energy_head(self.norm(z[:, 1:])).squeeze(-1)

    def forward(self, x: Tensor, keep: Tensor | None = None, exact_blocks: int | None = None) -> Tensor | SplitEnergy:
        """Energy E(x), shape (batch,). keep: (batch, n) int64 indices of the patches that enter (in
        patch order, the same n for every image); None: every patch.
        exact_blocks: also return the token streams the truncated restoring gradient needs
        (energyvit.restore.input_gradient): the blocks' input and the stream entering the last
        `exact_blocks` blocks. It is an argument of forward so that a DDP wrapper runs it."""
        if exact_blocks is None:
            return self.energy_from_tokens(self.forward_tokens(x, keep), keep)
        if not 0 <= exact_blocks <= self.cfg.depth:
            raise ValueError(f"exact_blocks must be in 0..{self.cfg.depth} (the encoder's depth), got {exact_blocks}")
        tokens_in = cut = self.input_tokens(x, keep)
        split = self.cfg.depth - exact_blocks
        for block in self.blocks[:split]:
            cut = block(cut)
        z = cut
        for block in self.blocks[split:]:
            z = block(z)
        return SplitEnergy(self.energy_from_tokens(z, keep), tokens_in, cut)

    def patch_energies(self, x: Tensor) -> Tensor:
        """E(x) split over the patches, (batch, num_patches), row sums = forward(x): the `norm` and
        `linear` readouts are sums of one term per patch token. The `cls` readout reads one global
        token and has no such split (ValueError)."""
        if self.cfg.energy == "cls":
            raise ValueError("the cls energy readout has no per-patch energies (one global token carries it)")
        return self._patch_terms(self._readout_stream(self.forward_tokens(x)))


def create_model(name: str = "vit_nano_patch4", **overrides) -> EnergyViT:
    """Create an energy ViT by architecture name; keyword overrides set any config field."""
    return EnergyViT(model_config(name, **overrides))


def config_to_dict(cfg: EnergyViTConfig) -> dict:
    return asdict(cfg)


def config_from_dict(d: dict) -> EnergyViTConfig:
    """The config saved by config_to_dict; ValueError for entries EnergyViTConfig does not have."""
    unknown = sorted(set(d) - {f.name for f in fields(EnergyViTConfig)})
    if unknown:
        raise ValueError(f"unknown model config entries: {', '.join(map(str, unknown))}")
    d = {k: tuple(v) if k in ("pixel_mean", "pixel_std") else v for k, v in d.items()}
    return replace(EnergyViTConfig(), **d)
