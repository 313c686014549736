"""The energy method's objective: the restoration loss and the optional explicit energy term."""
import pytest
import torch

import energyvit.compiled as compiled
from energyvit.objective import EnergyOptions, energy_contrast, task_loss
from energyvit.options import OptionError
from energyvit.restore import restore
from energyvit.tasks import MaskedImageModeling
from helpers import images, tiny_model


def corrupt(batch=3):
    clean = images(batch=batch)
    return clean, MaskedImageModeling(patch_size=2, mask_ratio=0.5)(clean, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("negative", ["corrupted", "restored"])
def test_the_energy_term_is_a_hinge_on_per_patch_energies_added_to_the_loss(negative):
    model = tiny_model()
    clean, c = corrupt()
    plain = task_loss(model, clean, c, EnergyOptions())
    opts = EnergyOptions(contrast_weight=0.5, contrast_negative=negative, contrast_margin=2.0)
    with_term = task_loss(model, clean, c, opts)
    neg = c.image if negative == "corrupted" else restore(model, c.image, c.update_mask).restored
    gap = (model(clean) - model(neg)) / model.cfg.num_patches
    expected = plain + 0.5 * torch.relu(2.0 + gap).mean()
    torch.testing.assert_close(with_term, expected, rtol=1e-12, atol=1e-12)
    assert (torch.relu(2.0 + gap) > 0).any()  # the margin makes the term active here


def test_the_energy_term_trains_the_energies_not_the_negative():
    model = tiny_model()
    clean, c = corrupt()
    negative = c.image.clone().requires_grad_(True)
    term = energy_contrast(model, clean, negative, EnergyOptions(contrast_margin=5.0), model.cfg.num_patches)
    term.backward()
    assert negative.grad is None  # detached inside
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_energy_term_options_are_checked():
    with pytest.raises(OptionError, match="contrast_weight must be >= 0"):
        EnergyOptions(contrast_weight=-1.0)
    with pytest.raises(OptionError, match="contrast_negative must be one of corrupted, restored"):
        EnergyOptions(contrast_negative="clean")


def test_compiled_step_with_the_energy_term_matches_eager_and_ignores_padding():
    """float64: the compiled step's gradients with the term equal eager ones, also when a smaller
    batch is padded to the compiled size (the padding rows weigh nothing in the term either)."""
    model = tiny_model(dtype=torch.float64, restore_steps=1)
    opts = EnergyOptions(contrast_weight=1.0, contrast_margin=5.0)
    step = compiled.compiled_train_step(model, opts, backend="aot_eager")
    params = [p for p in model.parameters() if p.requires_grad]
    for batch in (4, 3):
        clean, c = corrupt(batch)
        grads = torch.autograd.grad(step(clean, c), params, allow_unused=True)
        ref = torch.autograd.grad(task_loss(model, clean, c, opts), params, allow_unused=True)
        flat = lambda gs: torch.cat([g.flatten() for g in gs if g is not None])  # noqa: E731
        assert step.mode == "compiled"
        assert ((flat(grads) - flat(ref)).norm() / flat(ref).norm()).item() < 1e-9
