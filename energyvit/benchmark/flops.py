"""Model FLOPs of the benchmarked steps, counted analytically (matmuls and convolutions only, 2
FLOPs per multiply-add), and the datasheet peaks MFU divides by.

Units, per image: a linear layer of `t` tokens from `i` to `o` features costs 2*t*i*o forward; one
attention layer of `n` tokens and width `D` (all heads) costs 4*n^2*D forward (q k^T and p v).

Energy step (`energy_step_flops`; the model `pretrain` builds: encoder + energy head, K restoration
steps, the loss's backward): per restoration step
- linear layers and the patch embedding 6x forward: the forward, the input gradient dE/dx (one
  matmul per layer: no weight gradient inside restoration), the outer backward of the forward
  (input and weight gradients) and of the input-gradient graph (two matmuls per matmul there);
- attention 9x forward: forward 2 matmuls, input gradient 4, outer backward of the forward 4 and
  of the input-gradient graph 8 (every matmul there has two differentiable inputs): 18 = 9 x 2.
MAE step (`mae_step_flops`: encoder on the visible tokens, decoder on all, forward + backward):
3x forward (forward, input and weight gradients), except the patch embedding, which sees every
patch (MAE embeds, then drops) and gets no input gradient: 2x.

Truncated second order (`--second_order_blocks L`): the encoder blocks below the last L drop the
outer backward of their input-gradient graph: linear layers 4x forward (forward, input gradient,
outer backward of the forward), attention 5x (2 + 4 + 4 matmuls of 2).

Sparse restoration (mim with `--restore_fraction` < 1): the blocks, the energy head and the
readout see the class token and the `patches` that enter (visible + restored hidden); the patch
embedding still runs on every patch (embedded, then dropped, as MAE), so it is counted in full.

These are model FLOPs (what the math defines, as MFU counts them): the fused kernels recompute
the attention matrix and execute more, SDPA's flash backward too; none of that is counted.
tests/test_bench_flops.py checks both counts against torch.utils.flop_counter on tiny models.
"""
from __future__ import annotations

from energyvit.model import EnergyViTConfig

# Dense (no sparsity) bf16/fp16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets, which list
# them "with sparsity" (twice these): H100 datasheet (SXM 1,979; PCIe 1,513; NVL 1,671), H200
# datasheet (SXM 1,979; NVL 1,671), A100 datasheet (312 dense, SXM and PCIe). Matched against
# torch.cuda.get_device_name, most specific first.
DATASHEET_BF16_TFLOPS = (
    ("H200 NVL", 835.5), ("H200", 989.4),
    ("H100 NVL", 835.5), ("H100 PCIe", 756.5), ("H100", 989.4),  # "NVIDIA H100 80GB HBM3" is the SXM
    ("A100", 312.0),
)


def datasheet_peak(device_name: str, dtype: str) -> float | None:
    """The datasheet's dense bf16/fp16 peak of this GPU (TFLOP/s), None for another dtype or an
    unlisted device (the CPU)."""
    if dtype not in ("bf16", "fp16"):
        return None
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


def linear_flops(tokens: int, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def blocks_flops(tokens: int, width: int, depth: int, mlp_ratio: float) -> tuple[float, float]:
    """(linear, attention) forward FLOPs of `depth` transformer blocks on `tokens` tokens."""
    hidden = int(width * mlp_ratio)
    linear = depth * (linear_flops(tokens, width, 3 * width) + linear_flops(tokens, width, width)
                      + linear_flops(tokens, width, hidden) + linear_flops(tokens, hidden, width))
    return linear, depth * 4.0 * tokens * tokens * width


def patch_embed_flops(cfg: EnergyViTConfig, patches: int) -> float:
    return linear_flops(patches, cfg.patch_size ** 2 * cfg.in_chans, cfg.embed_dim)


def energy_forward_flops(cfg: EnergyViTConfig, patches: int | None = None) -> tuple[float, float]:
    """(linear incl. the patch embedding, attention) FLOPs of one energy forward E(x), one image:
    the encoder and, when the config has one, the energy head (its embedding and blocks).
    patches: how many patch tokens enter (sparse restoration); default every patch."""
    patches = cfg.num_patches if patches is None else patches
    n = patches + 1
    linear, attn = blocks_flops(n, cfg.embed_dim, cfg.depth, cfg.mlp_ratio)
    linear += patch_embed_flops(cfg, cfg.num_patches)
    if cfg.energy_head_depth:
        dh = cfg.head_dim
        head_linear, head_attn = blocks_flops(n, dh, cfg.energy_head_depth, cfg.mlp_ratio)
        linear += linear_flops(n, cfg.embed_dim, dh) + head_linear
        attn += head_attn
    elif cfg.energy == "linear":
        linear += linear_flops(patches, cfg.embed_dim, 1)
    return linear, attn


def energy_step_flops(cfg: EnergyViTConfig, restore_steps: int, batch: int, contrast: bool = False,
                      patches: int | None = None, exact_blocks: int | None = None) -> float:
    """Model FLOPs of one energy training step (module docstring: 6x linear, 9x attention per step).
    contrast: with the explicit energy term (`--contrast_weight` > 0): E of the clean image and of
    the detached negative, each forward + backward to the weights (3x, the patch embedding 2x: its
    input, the pixels, needs no gradient).
    patches: the patch tokens that enter each energy (sparse restoration: visible + restored
    hidden, `tasks.mim_patch_counts`); default every patch.
    exact_blocks: the truncated second-order path's L (module docstring); default every block."""
    linear, attn = energy_forward_flops(cfg, patches)
    flops = restore_steps * (6.0 * linear + 9.0 * attn)
    if exact_blocks is not None:
        n = (cfg.num_patches if patches is None else patches) + 1
        cut_linear, cut_attn = blocks_flops(n, cfg.embed_dim, cfg.depth - exact_blocks, cfg.mlp_ratio)
        flops -= restore_steps * (2.0 * cut_linear + 4.0 * cut_attn)
    if contrast:
        embed = patch_embed_flops(cfg, cfg.num_patches)
        flops += 2 * (3.0 * (linear - embed + attn) + 2.0 * embed)
    return batch * flops


def mae_step_flops(cfg: EnergyViTConfig, decoder, num_visible: int, batch: int) -> float:
    """Model FLOPs of one MAE step (loss + backward): the encoder on 1 + num_visible tokens, the
    decoder (`MAEDecoderConfig`) on every patch + the class token, 3x forward; the patch
    embedding of every patch 2x."""
    n_vis, n = num_visible + 1, cfg.num_patches + 1
    enc_linear, enc_attn = blocks_flops(n_vis, cfg.embed_dim, cfg.depth, cfg.mlp_ratio)
    dec_linear, dec_attn = blocks_flops(n, decoder.embed_dim, decoder.depth, decoder.mlp_ratio)
    linear = (enc_linear + dec_linear + linear_flops(n_vis, cfg.embed_dim, decoder.embed_dim)
              + linear_flops(n, decoder.embed_dim, cfg.patch_size ** 2 * cfg.in_chans))
    return batch * (3.0 * (linear + enc_attn + dec_attn) + 2.0 * patch_embed_flops(cfg, cfg.num_patches))


def vit_forward_flops(cfg: EnergyViTConfig) -> float:
    """One plain ViT forward of the encoder alone (no energy head), one image: the unit the
    docs state step costs in."""
    n = cfg.num_patches + 1
    linear, attn = blocks_flops(n, cfg.embed_dim, cfg.depth, cfg.mlp_ratio)
    return linear + attn + patch_embed_flops(cfg, cfg.num_patches)

