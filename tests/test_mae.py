import pytest
import torch

from energyvit.methods.mae import MAEBaseline, MAEDecoderConfig, default_decoder, masked_patch_loss, patchify, unpatchify
from energyvit.model import MODEL_ARCHS, EnergyViT, model_config
from helpers import images

# vit_pico_patch2 on 8x8 grayscale: 16 patches of 2x2 pixels, encoder width 32.
L = 16


def tiny_mae(seed: int = 0, dtype=torch.float64, **kwargs) -> MAEBaseline:
    torch.manual_seed(seed)
    return MAEBaseline(model_config("vit_pico_patch2", in_chans=1), **kwargs).to(dtype)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_is_a_finite_scalar(one_thread, norm_pix_loss):
    loss = tiny_mae(norm_pix_loss=norm_pix_loss).forward_loss(images(batch=3), gen(0))
    assert loss.shape == () and torch.isfinite(loss) and loss > 0


def test_encoder_state_dict_loads_as_an_energy_vit(one_thread):
    model = tiny_mae()
    fresh = EnergyViT(model.encoder.cfg)
    assert set(model.encoder.state_dict()) == set(fresh.state_dict())
    fresh.load_state_dict(model.encoder.state_dict())  # strict: what probe/finetune/export do
    decoder_keys = {k for k in model.state_dict() if not k.startswith("encoder.")}
    assert {"mask_token", "decoder_embed.weight", "decoder_pos_embed", "decoder_blocks.0.attn.qkv.weight",
            "decoder_norm.weight", "decoder_pred.weight", "decoder_pred.bias"} <= decoder_keys
    assert all(k.startswith(("mask_token", "decoder_")) for k in decoder_keys)


def test_default_decoder_sizes():
    sizes = {name: default_decoder(model_config(name)) for name in MODEL_ARCHS}
    assert sizes["vit_base_patch16"] == MAEDecoderConfig(512, 8, 16)  # MAE's decoder
    assert sizes["vit_large_patch16"] == MAEDecoderConfig(512, 8, 16)  # capped, as MAE
    assert sizes["vit_nano_patch4"] == MAEDecoderConfig(32, 2, 1)
    assert sizes["vit_pico_patch2"] == MAEDecoderConfig(32, 1, 1)
    for name, dec in sizes.items():
        enc = model_config(name)
        assert dec.embed_dim <= enc.embed_dim and dec.depth <= enc.depth, name


# visible = L - round(ratio * L), the `mim` task's count of masked patches
@pytest.mark.parametrize("ratio, visible", [(0.75, 4), (0.5, 8), (0.6, 6), (0.9, 2), (0.99, 1), (0.01, 15)])
def test_visible_token_count(one_thread, ratio, visible):
    model = tiny_mae(mask_ratio=ratio)
    assert model.num_visible == visible
    latent, mask, ids_restore = model.encode_visible(images(batch=2), gen(0))
    assert latent.shape == (2, 1 + visible, 32)
    assert mask.shape == (2, L) and (mask.sum(dim=1) == L - visible).all()
    assert (ids_restore.sort(dim=1).values == torch.arange(L)).all()  # a permutation per image


def test_masking_is_seeded_and_per_image(one_thread):
    model, x = tiny_mae(), images(batch=4)
    _, mask_a, _ = model.encode_visible(x, gen(0))
    _, mask_b, _ = model.encode_visible(x, gen(0))
    _, mask_c, _ = model.encode_visible(x, gen(1))
    assert torch.equal(mask_a, mask_b)
    assert not torch.equal(mask_a, mask_c)
    assert len({tuple(m.tolist()) for m in mask_a}) > 1  # each image draws its own mask
    assert model.forward_loss(x, gen(0)) == model.forward_loss(x, gen(0))


def test_hidden_pixels_never_reach_encoder_or_decoder(one_thread):
    model, x = tiny_mae(), images(batch=2)
    latent, mask, ids_restore = model.encode_visible(x, gen(0))
    pixel_mask = unpatchify(mask[..., None].expand(-1, -1, 4), 2, 1)
    changed = x + pixel_mask * torch.rand(x.shape, generator=gen(5), dtype=x.dtype)
    latent2, mask2, _ = model.encode_visible(changed, gen(0))
    assert torch.equal(mask, mask2)
    assert torch.allclose(latent, latent2, atol=1e-12)
    assert torch.allclose(model.decode(latent, ids_restore), model.decode(latent2, ids_restore), atol=1e-12)


def test_masked_patch_loss_counts_only_masked_patches():
    g = gen(0)
    pred, target = torch.randn(3, L, 4, generator=g), torch.randn(3, L, 4, generator=g)
    mask = (torch.rand(3, L, generator=g) < 0.75).float()
    loss = masked_patch_loss(pred, target, mask)
    per_patch = (pred - target).pow(2).mean(dim=-1)
    assert torch.allclose(loss, per_patch[mask.bool()].mean())
    noise = torch.randn(target.shape, generator=g)
    visible_changed = target + noise * (1 - mask)[..., None]
    assert torch.equal(masked_patch_loss(pred, visible_changed, mask), loss)
    hidden_changed = target + noise * mask[..., None]
    assert masked_patch_loss(pred, hidden_changed, mask) != loss
    with pytest.raises(ValueError, match="do not match"):
        masked_patch_loss(pred, target, mask[:, :-1])


def test_patchify_matches_mae_layout_and_inverts():
    x = images(batch=2, chans=3, size=8)
    # MAE: reshape (N, C, h, p, w, q), einsum nchpwq->nhwpqc, reshape (N, h*w, p*q*C)
    mae = torch.einsum("nchpwq->nhwpqc", x.reshape(2, 3, 4, 2, 4, 2)).reshape(2, 16, 12)
    assert torch.equal(patchify(x, 2), mae)
    assert torch.equal(unpatchify(patchify(x, 2), 2, 3), x)
    with pytest.raises(ValueError, match="not a square grid"):
        unpatchify(torch.zeros(1, 15, 4), 2, 1)


def test_targets_are_normalized_pixels_or_standardized_patches():
    x = images(batch=2)
    plain = tiny_mae().targets(x)
    assert torch.allclose(plain, patchify((x - 0.5) / 0.5, 2))  # grayscale stats: mean 0.5, std 0.5
    assert torch.allclose(unpatchify(plain, 2, 1), (x - 0.5) / 0.5)
    standard = tiny_mae(norm_pix_loss=True).targets(x)
    assert torch.allclose(standard.mean(dim=-1), torch.zeros(2, L, dtype=x.dtype), atol=1e-9)
    assert torch.allclose(standard.var(dim=-1), torch.ones(2, L, dtype=x.dtype), atol=1e-3)


def test_one_backward_reaches_encoder_and_decoder(one_thread):
    model = tiny_mae()
    model.forward_loss(images(batch=2), gen(0)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in ("encoder.patch_embed.proj.weight", "encoder.cls_token", "encoder.blocks.1.mlp.fc2.weight",
                 "encoder.norm.weight", "decoder_embed.weight", "mask_token",
                 "decoder_blocks.0.attn.qkv.weight", "decoder_norm.weight", "decoder_pred.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    # fixed sin-cos embeddings and the energy-only step sizes take no gradient
    for name in ("encoder.pos_embed", "decoder_pos_embed", "encoder.restore_log_step"):
        assert grads[name] is None, name


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_adam_overfits_a_fixed_batch(one_thread, norm_pix_loss):
    model = tiny_mae(dtype=torch.float32, norm_pix_loss=norm_pix_loss)
    x = images(batch=4, dtype=torch.float32)
    _, mask, _ = model.encode_visible(x, gen(0))
    hidden = model.targets(x)[mask.bool()]
    best_constant = (hidden - hidden.mean()).pow(2).mean().item()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # ~30 steps only fit the output's scale down to best_constant; memorizing takes ~200 (< 1 s)
    for _ in range(200):
        loss = model.forward_loss(x, gen(0))  # the same masks every step
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * best_constant


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_reconstruct_returns_pixel_space_images_and_mask(one_thread, norm_pix_loss):
    model, x = tiny_mae(norm_pix_loss=norm_pix_loss), images(batch=2)
    pred, pixel_mask = model.reconstruct(x, gen(0))
    assert pred.shape == x.shape and not pred.requires_grad and torch.isfinite(pred).all()
    _, mask, ids_restore = model.encode_visible(x, gen(0))
    assert torch.equal(pixel_mask, unpatchify(mask[..., None].expand(-1, -1, 4), 2, 1))
    assert pixel_mask.shape == (2, 1, 8, 8) and (pixel_mask.mean(dim=(1, 2, 3)) == 0.75).all()
    if not norm_pix_loss:  # the loss is the mean squared error of the prediction, in normalized pixels
        loss = model.forward_loss(x, gen(0))
        err = ((pred - x) / 0.5).pow(2)
        assert torch.allclose((err * pixel_mask).sum() / pixel_mask.sum(), loss)


def test_bad_configs_and_inputs_raise_clear_errors():
    cfg = model_config("vit_pico_patch2", in_chans=1)
    for ratio in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\)"):
            MAEBaseline(cfg, mask_ratio=ratio)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        MAEDecoderConfig(embed_dim=32, depth=1, num_heads=3)
    with pytest.raises(ValueError, match="multiple of 4"):
        MAEDecoderConfig(embed_dim=30, depth=1, num_heads=1)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        MAEDecoderConfig(embed_dim=32, depth=0, num_heads=1)
    model = tiny_mae()
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 1, 8, 8\), got \(2, 3, 8, 8\)"):
        model.forward_loss(images(batch=2, chans=3), gen(0))
    with pytest.raises(ValueError, match="expected images of shape"):
        model.forward_loss(torch.rand(8, 8, dtype=torch.float64), gen(0))


def test_explicit_decoder_config_is_used(one_thread):
    model = tiny_mae(decoder=MAEDecoderConfig(embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0))
    assert len(model.decoder_blocks) == 2 and model.decoder_pred.in_features == 16
    assert model.decoder_blocks[0].mlp.fc1.out_features == 32
    assert torch.isfinite(model.forward_loss(images(batch=2), gen(0)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_gives_the_same_masks_on_cuda():
    model, x = tiny_mae(), images(batch=2)
    _, mask_cpu, _ = model.encode_visible(x, gen(0))
    _, mask_cuda, _ = model.to("cuda").encode_visible(x.cuda(), gen(0))
    assert torch.equal(mask_cpu, mask_cuda.cpu())
    cuda_gen = torch.Generator(device="cuda").manual_seed(0)
    assert torch.isfinite(model.forward_loss(x.cuda(), cuda_gen))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_sdpa_backend_gives_the_math_loss_and_gradients(one_thread, dtype, tol):
    """attn_backend="sdpa" (first order, what `energyvit bench` times MAE with) in encoder and
    decoder: the same loss and parameter gradients as the math path, same weights and masks."""
    math_mae, sdpa_mae = tiny_mae(dtype=dtype), tiny_mae(dtype=dtype, attn_backend="sdpa")
    sdpa_mae.load_state_dict(math_mae.state_dict())
    assert {b.attn.backend for b in [*sdpa_mae.encoder.blocks, *sdpa_mae.decoder_blocks]} == {"sdpa"}
    assert {b.attn.backend for b in math_mae.decoder_blocks} == {"math"}
    x = images(batch=3).to(dtype)
    losses, grads = [], []
    for model in (math_mae, sdpa_mae):
        loss = model.forward_loss(x, gen(4))
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=tol)
    assert grads[0].abs().sum() > 0 and ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < tol


def test_energy_training_refuses_a_first_order_attention(one_thread):
    """sdpa has no second derivative: training restoration (eager or compiled) says so in one line
    instead of failing deep inside autograd; inference restoration (first order) runs."""
    from energyvit.compiled import compiled_train_step
    from energyvit.restore import restore

    torch.manual_seed(0)
    model = EnergyViT(model_config("vit_pico_patch2", in_chans=1, attn_backend="sdpa", restore_steps=1)).double()
    x = images(batch=2)
    with pytest.raises(ValueError, match="'sdpa' has no second derivative"):
        restore(model, x, create_graph=True)
    with pytest.raises(ValueError, match="'sdpa' has no second derivative"):
        compiled_train_step(model)
    assert restore(model, x).restored.shape == x.shape


def test_pretrain_mae_attention_sdpa_is_the_math_step(one_thread):
    """`pretrain --method mae --mae_attention sdpa`: the method's MAE runs SDPA in encoder and
    decoder and its step loss equals the math one's (same weights, seed and images); --fused
    with it is refused in one line."""
    from energyvit.methods.mae import MAEMethod, MAEOptions
    from energyvit.options import OptionError
    from energyvit.pretrain import PretrainOptions

    torch.manual_seed(0)
    encoder = EnergyViT(model_config("vit_pico_patch2", in_chans=1))
    math_method, sdpa_method = MAEMethod(encoder, MAEOptions()), MAEMethod(encoder, MAEOptions(mae_attention="sdpa"))
    sdpa_method.module.load_state_dict(math_method.module.state_dict())
    assert {b.attn.backend for b in sdpa_method.module.decoder_blocks} == {"sdpa"}
    assert sdpa_method.encoder.cfg.attn_backend == "sdpa" and math_method.encoder.cfg.attn_backend == "math"
    x = images(batch=3).float()
    (_, loss_math), (_, loss_sdpa) = (m.step_loss()(x, None, 7) for m in (math_method, sdpa_method))
    assert loss_sdpa.item() == pytest.approx(loss_math.item(), rel=1e-5)
    with pytest.raises(OptionError, match="mae_attention"):
        PretrainOptions.from_flat({"method": "mae", "mae_attention": "sdpa", "fused": True})
