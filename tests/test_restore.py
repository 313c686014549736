import pytest
import torch

from energyvit.losses import restoration_loss
from energyvit.restore import restore
from energyvit.tasks import MaskedImageModeling
from helpers import images, tiny_model


def unrolled_loss(model, clean, corrupted, mask):
    result = restore(model, corrupted, mask, create_graph=True)
    return restoration_loss(result.restored, clean, mask)


@pytest.mark.parametrize("steps,energy,head", [(2, "norm", 0), (3, "linear", 0), (2, "norm", 1)])
def test_parameter_gradients_through_unrolled_restoration_match_finite_differences(steps, energy, head):
    """d loss / d theta through K gradient steps (second derivatives of E) vs central differences
    of the loss along a random direction in parameter space, in float64 (with an energy head too)."""
    model = tiny_model(energy=energy, restore_steps=steps, energy_head_depth=head, energy_head_dim=16 if head else 0)
    clean = images(batch=2)
    c = MaskedImageModeling(patch_size=2, mask_ratio=0.5)(clean, torch.Generator().manual_seed(0))
    # dE/dx cannot depend on the final LayerNorm's shift (a constant in E under the `linear` readout)
    # nor on the final LayerNorm at all under `norm`, which reads the residual stream before it.
    unused = {"norm": ("norm.weight", "norm.bias"), "linear": ("norm.bias",)}[energy] if not head else ()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n not in unused]
    names, params = [n for n, _ in named], [p for _, p in named]
    loss = unrolled_loss(model, clean, c.image, c.update_mask)
    grads = torch.autograd.grad(loss, params)  # raises if any parameter were left out of the graph
    assert grads[names.index("restore_log_step")].abs().min() > 0  # every step size is trained

    gen = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))
    eps = 1e-6  # central differences converge as eps^2 here: 1e-8 relative at 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
    plus = unrolled_loss(model, clean, c.image, c.update_mask).detach()
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
    minus = unrolled_loss(model, clean, c.image, c.update_mask).detach()
    numeric = (plus - minus) / (2 * eps)
    assert torch.allclose(analytic, numeric, rtol=1e-6, atol=1e-10), (analytic.item(), numeric.item())


def test_inference_restoration_lowers_energy_of_corrupted_images():
    model = tiny_model(step_size_init=0.02, restore_steps=4)
    clean = images(batch=6)
    corrupted = clean + 0.3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(3), dtype=clean.dtype)
    result = restore(model, corrupted)
    assert result.energies.shape == (5, 6)
    assert (result.energies[1:] < result.energies[:-1]).all()  # every step, every image
    assert len(result.steps) == 5 and torch.equal(result.steps[0], corrupted)
    assert not result.restored.requires_grad  # inference keeps no graph


def test_inference_holds_pixels_outside_the_update_mask():
    model = tiny_model()
    clean = images(batch=2)
    c = MaskedImageModeling(patch_size=2, mask_ratio=0.5)(clean, torch.Generator().manual_seed(0))
    result = restore(model, c.image, c.update_mask)
    keep = c.update_mask.expand_as(clean) == 0
    assert torch.equal(result.restored[keep], c.image[keep])
    assert not torch.equal(result.restored[~keep], c.image[~keep])


def test_training_mode_keeps_graph_and_steps_override():
    model = tiny_model(restore_steps=3)
    x = images(batch=2)
    result = restore(model, x, steps=1, create_graph=True)
    assert result.restored.requires_grad and len(result.steps) == 2 and result.energies.shape == (1, 2)
    with pytest.raises(ValueError, match="steps must be in 1..3"):
        restore(model, x, steps=4)
    with pytest.raises(ValueError, match="update_mask of shape"):
        restore(model, x, update_mask=torch.ones(2, 1, 4, 4, dtype=x.dtype))


def test_langevin_noise_is_reproducible_under_a_seed():
    model = tiny_model()
    x = images(batch=2)
    a = restore(model, x, noise_std=0.1, generator=torch.Generator().manual_seed(5)).restored
    b = restore(model, x, noise_std=0.1, generator=torch.Generator().manual_seed(5)).restored
    c = restore(model, x).restored
    assert torch.equal(a, b) and not torch.allclose(a, c)
