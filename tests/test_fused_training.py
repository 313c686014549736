"""The fused Triton backend inside the model: training through restoration matches the math path.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""
import pytest
import torch

pytest.importorskip("triton")

from energyvit.data.digits import load_digits
from energyvit.objective import EnergyOptions, task_loss
from energyvit.model import EnergyViT, model_config
from energyvit.tasks import build_mixture

STEPS, BATCH = 20, 2


def train_losses(backend: str) -> list[float]:
    """Per-step losses of 20 AdamW steps of vit_pico_patch2 (K=2) on digits with `backend`."""
    images = load_digits(img_size=8)[0].images[: STEPS * BATCH]
    torch.manual_seed(0)
    model = EnergyViT(model_config("vit_pico_patch2", in_chans=1, attn_backend=backend))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mixture = build_mixture("mim:0.5,sort:0.25,denoise:0.25", patch_size=2, in_chans=1)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for clean in images.split(BATCH):
        _, corrupted = mixture(clean, gen)
        loss = task_loss(model, clean, corrupted, EnergyOptions())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_twenty_training_steps_fused_match_math():
    """fp32 on CPU: the interpreter's dots are IEEE fp32, so the paths differ only in rounding
    order; over 20 optimizer steps the losses stay within 1e-4 relative of each other."""
    math_losses, fused_losses = train_losses("math"), train_losses("fused")
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(math_losses), rtol=1e-4, atol=1e-7)
    assert len(set(math_losses)) == STEPS  # a real sequence of different batches and tasks


def restoration_step_grads(attn_backend: str, ln_gelu_backend: str) -> dict:
    """Parameter gradients of one training loss through a full unrolled restoration (K=2), with an
    energy head (so every LayerNorm, GELU and the final norm are on the path), fp32."""
    torch.manual_seed(0)
    cfg = model_config("vit_pico_patch2", in_chans=1, restore_steps=2, energy_head_depth=1, energy_head_dim=16,
                       attn_backend=attn_backend, ln_gelu_backend=ln_gelu_backend)
    model = EnergyViT(cfg)
    clean = load_digits(img_size=8)[0].images[:3]
    _, corrupted = build_mixture("mim:0.5,denoise:0.5", patch_size=2, in_chans=1)(clean, torch.Generator().manual_seed(1))
    task_loss(model, clean, corrupted, EnergyOptions()).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn_backend", ["math", "fused"])
def test_unrolled_restoration_parameter_grads_fused_ln_gelu_match_eager(attn_backend):
    """Every parameter's gradient through K=2 unrolled steps with the fused LayerNorm/GELU ops (and
    the math or fused attention) matches the all-aten eager model: 1e-5 relative per tensor (fp32,
    IEEE in the interpreter; measured ~5e-7)."""
    ref = restoration_step_grads("math", "aten")
    got = restoration_step_grads(attn_backend, "fused")
    assert got.keys() == ref.keys() and any(n.endswith("norm1.weight") for n in ref)
    for name, g in ref.items():
        err = ((got[name] - g).norm() / g.norm().clamp_min(1e-30)).item()
        assert err < 1e-5, (name, err)


def test_fused_flag_selects_fused_ln_gelu_when_eager_and_keeps_timm_names():
    from energyvit.model import ModelOptions

    cfg = ModelOptions(model="vit_pico_patch2", fused=True, energy_head_depth=0).config(in_chans=1)
    assert (cfg.attn_backend, cfg.ln_gelu_backend) == ("fused", "fused")
    fused, plain = EnergyViT(cfg), EnergyViT(model_config("vit_pico_patch2", in_chans=1))
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert fused.blocks[0].norm1.backend == fused.blocks[0].mlp.backend == fused.norm.backend == "fused"
    # compiled, Inductor fuses aten's LayerNorm/GELU into fewer kernels than the custom ops leave
    compiled = ModelOptions(model="vit_pico_patch2", fused=True).config(in_chans=1, compiled=True)
    assert (compiled.attn_backend, compiled.ln_gelu_backend) == ("fused", "aten")


def test_sparse_restoration_fused_matches_math():
    """Sparse restoration only shortens the token sequence (1 + 8 visible + 4 restored of 16 patches:
    13 tokens, not a multiple of any block size): parameter gradients through K=2 steps, fused fp32
    kernels against the float64 math path of the same weights."""
    from energyvit.tasks import build_task
    from helpers import images, tiny_model

    model = tiny_model(dtype=torch.float32, attn_backend="fused", restore_steps=2)
    reference = tiny_model(dtype=torch.float64, attn_backend="math", restore_steps=2)
    reference.load_state_dict(model.state_dict())
    clean = images(3)
    c = build_task("mim", 2, mask_ratio=0.5, restore_fraction=0.5)(clean, torch.Generator().manual_seed(0))
    assert c.keep.shape == (3, 12)

    def grads(m, dtype):
        corrupted = type(c)(c.image.to(dtype), c.loss_mask.to(dtype), c.update_mask.to(dtype), c.keep)
        loss = task_loss(m, clean.to(dtype), corrupted, EnergyOptions())
        params = [p for p in m.parameters() if p.requires_grad]
        return torch.cat([g.flatten().double() for g in torch.autograd.grad(loss, params, allow_unused=True)
                          if g is not None])

    fused, math = grads(model, torch.float32), grads(reference, torch.float64)
    assert ((fused - math).norm() / math.norm()).item() < 1e-5
