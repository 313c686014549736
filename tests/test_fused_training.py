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
