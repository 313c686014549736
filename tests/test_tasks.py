import re

import pytest
import torch

from energyvit.options import OptionError
from energyvit.tasks import (Colorize, Denoise, MaskedImageModeling, PatchSort, SuperResolution, TaskOptions,
                             build_mixture, build_task, parse_task_weights)


def batch(chans=3, size=16, seed=0):
    return torch.rand(4, chans, size, size, generator=torch.Generator().manual_seed(seed))


ALL_TASKS = [MaskedImageModeling(4, 0.5), PatchSort(4, 0.5), SuperResolution(2), SuperResolution(4), Denoise(0.1),
             Colorize()]


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: f"{t.name}")
def test_shapes_and_reproducible_under_a_seed(task):
    x = batch()
    a = task(x, torch.Generator().manual_seed(7))
    b = task(x, torch.Generator().manual_seed(7))
    assert a.image.shape == x.shape and a.loss_mask.shape == (4, 1, 16, 16)
    assert torch.equal(a.image, b.image) and torch.equal(a.loss_mask, b.loss_mask)
    assert set(a.loss_mask.unique().tolist()) <= {0.0, 1.0}
    assert not torch.allclose(a.image, x)


def test_mim_masks_whole_patches_at_the_ratio_and_keeps_the_rest():
    x = batch()
    c = MaskedImageModeling(4, mask_ratio=0.75, fill=0.5)(x, torch.Generator().manual_seed(0))
    patch_mask = c.loss_mask[:, 0, ::4, ::4]  # one value per 4x4 patch
    assert torch.equal(c.loss_mask, patch_mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1))
    assert (patch_mask.flatten(1).sum(1) == 12).all()  # 75% of 16 patches
    keep = c.loss_mask.expand_as(x) == 0
    assert torch.equal(c.image[keep], x[keep]) and (c.image[~keep] == 0.5).all()
    assert c.update_mask is c.loss_mask


def test_sort_moves_every_chosen_patch_and_only_those():
    x = batch()
    c = PatchSort(4, fraction=0.5)(x, torch.Generator().manual_seed(0))
    assert (c.loss_mask[:, 0, ::4, ::4].flatten(1).sum(1) == 8).all()
    keep = c.loss_mask.expand_as(x) == 0
    assert torch.equal(c.image[keep], x[keep])
    # each chosen patch now holds another chosen patch's content (a permutation, no fixed point)
    p = lambda t: t.reshape(4, 3, 4, 4, 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(4, 16, -1)
    moved = c.loss_mask[:, 0, ::4, ::4].flatten(1).bool()
    for i in range(4):
        src, dst = p(x)[i][moved[i]], p(c.image)[i][moved[i]]
        assert not (src == dst).all(dim=1).any()
        assert torch.equal(src.sort(0).values, dst.sort(0).values)


def test_sr_denoise_colorize_cover_the_whole_image():
    x = batch()
    for task in (SuperResolution(4), Denoise(0.2), Colorize()):
        c = task(x, torch.Generator().manual_seed(0))
        assert (c.loss_mask == 1).all() and c.update_mask is None
    # SR keeps only the low-resolution content: images with equal 2x2 means corrupt alike
    detail = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(8, 8) * 0.1
    assert torch.allclose(SuperResolution(2)(x).image, SuperResolution(2)(x + detail).image, atol=1e-6)
    assert torch.allclose(SuperResolution(4)(torch.full((1, 3, 16, 16), 0.3)).image, torch.tensor(0.3))
    gray = Colorize()(x).image
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    noisy = Denoise(0.2)(x, torch.Generator().manual_seed(0)).image
    assert abs((noisy - x).std().item() - 0.2) < 0.02


def test_mixture_samples_by_weight_and_parses_specs():
    assert parse_task_weights("mim:0.5,denoise:0.25,sr") == {"mim": 0.5, "denoise": 0.25, "sr": 1.0}
    mix = build_mixture("mim:3,denoise:1", patch_size=4, in_chans=1)
    gen = torch.Generator().manual_seed(0)
    names = [mix.sample(gen) for _ in range(2000)]
    assert abs(names.count("mim") / 2000 - 0.75) < 0.04
    name, c = mix(batch(chans=1), gen)
    assert name in ("mim", "denoise") and c.image.shape == (4, 1, 16, 16)


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown task 'warp'"):
        parse_task_weights("mim:0.5,warp:0.5")
    with pytest.raises(ValueError, match="unknown task 'warp'"):
        build_task("warp", 4)
    for spec, why in [("mim:x", "numeric weights ('x' for 'mim')"), ("mim:nan", "finite weights > 0 ('nan' for 'mim')"),
                      ("mim:inf", "finite weights > 0 ('inf'"), ("mim:0", "finite weights > 0"),
                      ("mim,mim", "each task once ('mim' appears twice)"), ("mim,inpaint", "'mim' appears twice"),
                      (" , ", "a mixture such as")]:
        with pytest.raises(OptionError, match=re.escape(why)) as e:
            TaskOptions(tasks=spec)
        assert e.value.name == "tasks"
    with pytest.raises(ValueError, match="needs 3-channel RGB images, got 1 channel"):
        Colorize()(batch(chans=1))
    with pytest.raises(ValueError, match="without colorize for 1-channel data"):
        build_mixture("colorize", patch_size=4, in_chans=1)
    with pytest.raises(ValueError, match="not a multiple of patch_size 4"):
        MaskedImageModeling(4)(torch.rand(1, 3, 10, 10))
    with pytest.raises(ValueError, match="expected images of shape"):
        Denoise()(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="factor must be 2 or 4"):
        SuperResolution(3)
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        MaskedImageModeling(4, mask_ratio=1.0)
