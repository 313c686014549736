"""Sparse restoration (mim with --restore_fraction < 1): only the visible patches and a seeded
fraction of the hidden ones enter the energy (EnergyViT.forward's `keep`), only those hidden
patches are restored and scored. Checked against references built here by hand, in float64."""
import math

import pytest
import torch

from energyvit.cli import main
from energyvit.losses import restoration_loss
from energyvit.model import EnergyViT
from energyvit.objective import EnergyOptions, task_loss
from energyvit.options import OptionError
from energyvit.pretrain import PretrainOptions, RunOptions, build_method
from energyvit.restore import restore
from energyvit.tasks import MaskedImageModeling, TaskOptions, build_task, mim_patch_counts
from helpers import assert_ddp_task_loss_grads, images, tiny_model

PATCH, GRID, L = 2, 4, 16  # tiny_model: vit_pico_patch2 on 8x8 single-channel images


def sparse_mim(fraction=0.5, mask_ratio=0.5, fill=0.5):
    return MaskedImageModeling(PATCH, mask_ratio, fill, restore_fraction=fraction)


def corrupt(x, fraction=0.5, seed=0, **kwargs):
    return sparse_mim(fraction, **kwargs)(x, torch.Generator().manual_seed(seed))


def patch_mask(pixel_mask):
    """(B, 1, H, W) pixel mask of whole patches -> (B, L) bool."""
    return pixel_mask[:, 0, ::PATCH, ::PATCH].reshape(len(pixel_mask), -1) > 0


def reference_energy(model: EnergyViT, x, keep):
    """E(x) of the patches `keep` indexes, image by image, without EnergyViT's embedding or
    readout code: patches cut out by reshape, embedded by the conv's weights as a matmul, position
    rows picked from the tables, the class token prepended; the blocks are the model's."""
    cfg = model.cfg
    B, C = x.shape[:2]
    xn = (x - model.pixel_mean) / model.pixel_std
    patches = xn.reshape(B, C, GRID, PATCH, GRID, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(B, L, -1)
    w = model.patch_embed.proj.weight.reshape(cfg.embed_dim, -1)
    out = []
    for i in range(B):
        idx = keep[i]
        tokens = patches[i, idx] @ w.T + model.patch_embed.proj.bias + model.pos_embed[0, 1 + idx]
        z = torch.cat([model.cls_token[0] + model.pos_embed[0, :1], tokens])[None]
        for block in model.blocks:
            z = block(z)
        if cfg.energy_head_depth:
            rows = torch.cat([torch.zeros(1, dtype=torch.long), 1 + idx])
            z = model.energy_embed(model.norm(z)) + model.energy_pos_embed[0, rows]
            for block in model.energy_blocks:
                z = block(z)
        z = z[0]
        if cfg.energy == "norm":
            e = 0.5 * z[1:].pow(2).sum() / z.shape[-1]
        elif cfg.energy == "linear":
            e = model.energy_head(model.norm(z[1:])).sum()
        else:
            e = 0.5 * z[0].pow(2).sum() * len(idx) / z.shape[-1]
        out.append(e)
    return torch.stack(out)


MODELS = [dict(energy="norm", energy_head_depth=2, energy_head_dim=16), dict(energy="linear"), dict(energy="cls")]
MODEL_IDS = ["norm-head", "linear", "cls"]


# ------------------------------------------------------------------------------------ the model
@pytest.mark.parametrize("kw", MODELS, ids=MODEL_IDS)
def test_keep_every_patch_is_the_full_forward_and_a_subset_is_the_hand_built_energy(kw):
    model = tiny_model(**kw)
    x = images(3)
    every = torch.arange(L).expand(3, L)
    assert torch.equal(model(x, every), model(x))
    assert torch.allclose(reference_energy(model, x, every), model(x), rtol=1e-12, atol=0)  # the reference itself
    keep = corrupt(x, 0.5).keep
    assert keep.shape == (3, 12)  # 8 visible + 4 of the 8 hidden
    assert torch.allclose(model(x, keep), reference_energy(model, x, keep), rtol=1e-12, atol=0)
    assert not torch.allclose(model(x, keep), model(x))  # the dropped patches did count before


def test_bad_keep_gives_a_clear_error():
    model = tiny_model()
    x = images(2)
    with pytest.raises(ValueError, match=r"keep must be \(batch 2, n\)"):
        model(x, torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="1 <= n <= 16"):
        model(x, torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        model(x, torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="outside 0..15"):
        restore(model, x, keep=torch.full((2, 4), 16))


# ------------------------------------------------------------------------------------ the task
def test_kept_hidden_patches_are_a_seeded_subset_and_the_rest_of_the_draw_is_unchanged():
    x = images(4)
    hidden, restored = mim_patch_counts(L, 0.5, 0.25)
    assert (hidden, restored) == (8, 2)
    g_full, g_sparse = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    full = sparse_mim(1.0)(x, g_full)
    sparse = sparse_mim(0.25)(x, g_sparse)
    # the same hidden patches and fill (the corrupted image), and the same generator state after
    assert full.keep is None and torch.equal(sparse.image, full.image)
    assert torch.equal(torch.rand(3, generator=g_full), torch.rand(3, generator=g_sparse))
    hid, kept = patch_mask(full.update_mask), patch_mask(sparse.update_mask)
    assert torch.equal(sparse.loss_mask, sparse.update_mask)
    assert (kept.sum(1) == restored).all() and not (kept & ~hid).any()  # restored: among the hidden
    entering = torch.zeros(4, L, dtype=torch.bool).scatter_(1, sparse.keep, True)
    assert torch.equal(entering, ~hid | kept)  # every visible patch and the restored hidden ones enter
    assert torch.equal(sparse.keep, sparse.keep.sort(dim=1).values)  # in patch order
    # seeded: the same seed gives the same set, other seeds other sets
    assert torch.equal(corrupt(x, 0.25, seed=5).keep, sparse.keep)
    others = [corrupt(x, 0.25, seed=s).keep for s in range(6, 9)]
    assert all(not torch.equal(k, sparse.keep) for k in others)


def test_full_fraction_is_mains_mim_bitwise_and_its_loss_and_gradients():
    """restore_fraction 1 (the default): the task is the draw main makes (uniform noise, argsort,
    the first hidden), no keep; task_loss equals restoring and scoring without any keep, bitwise."""
    x = images(3)
    c = build_task("mim", PATCH, TaskOptions(mask_ratio=0.5))(x, torch.Generator().manual_seed(2))
    noise = torch.rand(3, L, generator=torch.Generator().manual_seed(2), dtype=torch.float32)
    chosen = noise.argsort(dim=1)[:, :8]
    mask = torch.zeros(3, L, dtype=x.dtype).scatter_(1, chosen, 1.0).view(3, 1, GRID, GRID)
    mask = mask.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)
    assert c.keep is None and torch.equal(c.update_mask, mask) and torch.equal(c.image, x * (1 - mask) + 0.5 * mask)
    model = tiny_model()
    opts = EnergyOptions(langevin_std=0.05, contrast_weight=0.5)
    loss = task_loss(model, x, c, opts, torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    r = restore(model, c.image, c.update_mask, create_graph=True, noise_std=0.05,
                generator=torch.Generator().manual_seed(3))
    ref = restoration_loss(r.restored, x, c.loss_mask)
    ref = ref + 0.5 * torch.relu((model(x) - model(r.restored.detach())) / L).mean()
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    assert torch.equal(loss, ref)
    assert all((g is None and h is None) or torch.equal(g, h) for g, h in zip(grads, ref_grads))


# ------------------------------------------------------------------------------------ restoration and loss
def test_dropped_patches_are_not_restored_and_count_for_nothing():
    model = tiny_model()
    x = images(3)
    c = corrupt(x, 0.25)
    dropped = patch_mask(c.image != x) & ~patch_mask(c.update_mask)  # hidden, not restored
    assert dropped.any()
    pixels = dropped.view(3, 1, GRID, GRID).repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)
    # dE/dx is exactly zero on them: they do not enter
    xi = c.image.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xi, c.keep).sum(), xi)
    assert (g[pixels] == 0).all() and (g[~pixels] != 0).any()
    # restoration (with Langevin noise) changes only the restored hidden patches
    r = restore(model, c.image, c.update_mask, noise_std=0.1, generator=torch.Generator().manual_seed(0), keep=c.keep)
    moved = r.restored != c.image
    assert not moved[c.update_mask == 0].any() and moved[c.update_mask > 0].all()
    # anything in the dropped patches, of the input or of the target, leaves loss and gradients as they are
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(corrupted, clean):
        loss = task_loss(model, clean, corrupted, EnergyOptions(contrast_weight=0.5))
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    other = torch.rand(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(9))
    scrambled = type(c)(torch.where(pixels, other, c.image), c.loss_mask, c.update_mask, c.keep)
    loss, grads = loss_and_grads(c, x)
    loss2, grads2 = loss_and_grads(scrambled, torch.where(pixels, 1 - other, x))
    assert torch.equal(loss, loss2)
    for a, b in zip(grads, grads2):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kw", MODELS, ids=MODEL_IDS)
def test_parameter_gradients_through_two_restoration_steps_match_a_hand_built_reference(kw):
    """K = 2 unrolled steps, second order, float64: task_loss (restore's loop, the model's keep)
    against a loop written here around reference_energy."""
    model = tiny_model(restore_steps=2, **kw)
    x = images(3)
    c = corrupt(x, 0.5, seed=4)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = task_loss(model, x, c, EnergyOptions())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    xk = c.image.clone().requires_grad_(True)
    for a in model.step_sizes:
        (g,) = torch.autograd.grad(reference_energy(model, xk, c.keep).sum(), xk, create_graph=True)
        xk = xk - a * g * c.update_mask
    region = c.loss_mask
    ref = ((xk - x).pow(2) * region).sum() / region.sum()
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    flat = torch.cat([g.flatten() for g in grads if g is not None])
    ref_flat = torch.cat([g.flatten() for g in ref_grads if g is not None])
    assert [g is None for g in grads] == [g is None for g in ref_grads]
    assert ((flat - ref_flat).norm() / ref_flat.norm()).item() < 1e-11
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert grads[names.index("blocks.0.attn.qkv.weight")].abs().sum() > 0  # through dE/dx: second order


def test_the_ddp_energy_passes_keep_through():
    """Under DDP the first energy of a step is the wrapper's forward: keep reaches the model
    through it, and the gradients are those without DDP."""
    model = tiny_model()
    model.norm.requires_grad_(False)  # as EnergyMethod does: DDP needs a gradient for every trainable one
    x = images(3)
    assert_ddp_task_loss_grads(model, x, corrupt(x, 0.5), EnergyOptions())


# ------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("value", ["0", "1.5", "nan", "-0.5"])
def test_bad_fractions_give_one_line(value, capsys, tmp_path):
    assert main(["pretrain", "--restore_fraction", value, "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--restore_fraction" in err, err
    assert "in (0, 1]" in err or "finite" in err, err


@pytest.mark.parametrize("argv,needle", [
    (["--tasks", "mim,sr"], "--restore_fraction/--restore-fraction: must be 1 with --tasks mim,sr"),
    (["--tasks", "denoise"], "below 1 it needs --tasks mim alone"),
    (["--method", "mae"], "--restore_fraction: must be 1 with --method mae"),
])
def test_refused_combinations_give_one_line(argv, needle, capsys, tmp_path):
    assert main(["pretrain", "--restore_fraction", "0.5", *argv, "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_the_python_api_refuses_the_same():
    for bad in (0.0, 1.5, math.nan):
        with pytest.raises(OptionError, match="restore_fraction"):
            TaskOptions(restore_fraction=bad)
    with pytest.raises(OptionError, match="--tasks mim alone"):
        TaskOptions(tasks="mim:0.5,denoise:0.5", restore_fraction=0.5)
    with pytest.raises(ValueError, match="for the mim task only, not sort"):
        build_task("sort", PATCH, restore_fraction=0.5)
    with pytest.raises(OptionError, match="--method mae"):
        PretrainOptions(tasks=TaskOptions(restore_fraction=0.5), run=RunOptions(method="mae"))
    assert TaskOptions(restore_fraction=1.0).restore_fraction == 1.0


def test_pretrain_trains_sparse_and_evaluates_every_hidden_patch():
    """The method's training task is sparse; its held-out evaluation restores every hidden patch
    with every patch entering (one measure whatever the fraction)."""
    from types import SimpleNamespace

    options = PretrainOptions(tasks=TaskOptions(mask_ratio=0.5, restore_fraction=0.5))
    method = build_method(options, tiny_model(dtype=torch.float32), SimpleNamespace(in_chans=1))
    x = images(2, dtype=torch.float32)
    assert method.mixture.tasks["mim"](x, torch.Generator().manual_seed(0)).keep.shape == (2, 12)
    assert method.eval_mixture.tasks["mim"](x, torch.Generator().manual_seed(0)).keep is None
    name, loss = method.step_loss()(x, None, 0)
    assert name == "mim" and torch.isfinite(loss)
    dense = build_method(PretrainOptions(), tiny_model(dtype=torch.float32), SimpleNamespace(in_chans=1))
    assert dense.eval_mixture is dense.mixture


def test_evaluating_a_sparse_task_restores_its_kept_patches():
    from energyvit.methods.energy import evaluate_restoration
    from energyvit.tasks import TaskMixture

    model = tiny_model()
    x = images(4)
    results, _ = evaluate_restoration(model, x, TaskMixture({"mim": sparse_mim(0.5)}, {"mim": 1.0}), seed=3)
    c = corrupt(x, 0.5, seed=3)
    r = restore(model, c.image, c.update_mask, keep=c.keep)
    mse = restoration_loss(r.restored, x, c.loss_mask).item()
    assert results["mim"]["mse_restored"] == pytest.approx(mse, rel=1e-12)
    assert results["mim"]["energy_restored"] == pytest.approx(r.energies[-1].mean().item(), rel=1e-12)
