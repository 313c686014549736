import torch

import energyvit


def test_public_api_round_trip():
    """The documented API: create by name, energies, corrupt by task name, restore in both modes, loss."""
    torch.manual_seed(0)
    model = energyvit.create_model("vit_pico_patch2", in_chans=1)
    images = torch.rand(2, 1, 8, 8)
    assert model(images).shape == (2,)
    c = energyvit.corrupt(images, "inpaint", patch_size=2, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    r = energyvit.restore(model, c.image, c.update_mask)
    assert len(r.steps) == model.cfg.restore_steps + 1
    r = energyvit.restore(model, c.image, c.update_mask, create_graph=True)
    loss = energyvit.restoration_loss(r.restored, images, c.loss_mask)
    loss.backward()
    assert model.restore_log_step.grad is not None and model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_norm_pix_loss_weights_each_patch_by_its_variance():
    clean = torch.rand(1, 1, 4, 4)
    restored = clean + 0.1
    plain = energyvit.restoration_loss(restored, clean)
    normed = energyvit.restoration_loss(restored, clean, norm_pix_patch=2)
    var = clean.reshape(1, 1, 2, 2, 2, 2).var(dim=(3, 5), unbiased=True) + 1e-6
    assert torch.allclose(plain, torch.tensor(0.01))
    assert torch.allclose(normed, (0.01 / var).mean())
