"""Fine-tuning's augmentations: mixup and cutmix with smoothed soft targets, random erasing,
RandAugment and the fine-tuning view of image files; each a pure function of its seed."""
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from energyvit.data.files import ArrayDataset
from energyvit.data.finetune_transform import FinetuneTransform
from energyvit.data.mixup import Mixup, cutmix_box, smooth_one_hot, soft_target_cross_entropy
from energyvit.data.randaugment import DEFAULT_SPEC, RandAugment, RandAugmentSpec, operations, parse_spec
from energyvit.data.random_erasing import MAX_AREA, MIN_AREA, erasing_boxes, random_erase
from energyvit.sampling import EpochSampler

B, C = 6, 5  # batch, classes
LABELS = torch.tensor([0, 1, 2, 3, 4, 0])


def constant_images() -> torch.Tensor:
    """Image i filled with the value i: which image a mixed pixel came from can be read back."""
    return torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, 8, 10).clone()


def test_mixup_blends_each_image_with_the_mirror_and_mixes_smoothed_targets():
    mix = Mixup(C, mixup_alpha=0.8, smoothing=0.1)
    lam, use_cutmix = mix.draw(np.random.default_rng(7))
    assert not use_cutmix and 0 < lam < 1
    x = torch.rand(B, 3, 8, 10, generator=torch.Generator().manual_seed(0))
    mixed, targets = mix(x, LABELS, np.random.default_rng(7))
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    smooth = smooth_one_hot(LABELS, C, 0.1)
    assert smooth[0, 0].item() == pytest.approx(0.9 + 0.02) and smooth[0, 1].item() == pytest.approx(0.02)
    torch.testing.assert_close(targets, lam * smooth + (1 - lam) * smooth.flip(0))
    torch.testing.assert_close(targets.sum(1), torch.ones(B))
    again, again_targets = mix(x, LABELS, np.random.default_rng(7))  # the same seed, the same batch
    assert torch.equal(again, mixed) and torch.equal(again_targets, targets)
    assert not torch.equal(mix(x, LABELS, np.random.default_rng(8))[0], mixed)


@pytest.mark.parametrize("seed", range(8))
def test_cutmix_pastes_one_box_and_lambda_is_the_area_left(seed):
    mix = Mixup(C, cutmix_alpha=1.0)
    x = constant_images()
    mixed, targets = mix(x, LABELS, np.random.default_rng(seed))
    from_mirror = mixed.ne(x)[:, 0]  # (B, H, W): pixels taken from the mirror image
    assert torch.equal(mixed.eq(x) | mixed.eq(x.flip(0)), torch.ones_like(mixed, dtype=torch.bool))
    box = from_mirror[0]
    rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
    if len(rows):  # one rectangle, the same in every image
        assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert (from_mirror == box).all()
    area = box.float().mean().item()
    for i in range(B):  # labels 0 and 0 of images 0 and 5 are the same class: skip that pair
        if LABELS[i] != LABELS[B - 1 - i]:
            assert targets[i, LABELS[i]].item() == pytest.approx(1 - area)
            assert targets[i, LABELS[B - 1 - i]].item() == pytest.approx(area)
    torch.testing.assert_close(targets.sum(1), torch.ones(B))


def test_cutmix_box_is_clipped_to_the_image():
    rng = np.random.default_rng(0)
    boxes = [cutmix_box(8, 10, 0.36, rng) for _ in range(200)]  # sides int(0.8 x 8) = 6 and 8, halves 3 and 4
    assert all(0 <= t <= b <= 8 and 0 <= l <= r <= 10 for t, b, l, r in boxes)
    assert max((b - t) * (r - l) for t, b, l, r in boxes) == 6 * 8  # centered well inside: the whole box
    assert min((b - t) * (r - l) for t, b, l, r in boxes) < 6 * 8  # at an edge: clipped


def test_switch_and_mix_probabilities():
    x = constant_images()
    cut, _ = Mixup(C, 0.8, 1.0, switch_prob=1.0)(x, LABELS, np.random.default_rng(3))  # both on, always cutmix
    assert torch.equal(cut.eq(x) | cut.eq(x.flip(0)), torch.ones_like(cut, dtype=torch.bool))
    blend, _ = Mixup(C, 0.8, 1.0, switch_prob=0.0)(x, LABELS, np.random.default_rng(3))  # always mixup
    assert not (blend.eq(x) | blend.eq(x.flip(0))).any()
    same, targets = Mixup(C, 0.8, 1.0, prob=0.0, smoothing=0.1)(x, LABELS, np.random.default_rng(3))
    assert same is x and torch.equal(targets, smooth_one_hot(LABELS, C, 0.1))  # off: smoothing only
    assert not Mixup(C).active and Mixup(C, cutmix_alpha=1.0).active


def test_soft_target_cross_entropy_of_smoothed_labels_is_label_smoothing():
    logits = torch.randn(B, C, generator=torch.Generator().manual_seed(1))
    expected = F.cross_entropy(logits, LABELS, label_smoothing=0.1)
    torch.testing.assert_close(soft_target_cross_entropy(logits, smooth_one_hot(LABELS, C, 0.1)), expected)


# ------------------------------------------------------------------------------ random erasing
def test_random_erasing_boxes_fit_and_have_the_area_range():
    boxes = erasing_boxes(2000, 16, 20, 0.5, np.random.default_rng(0))
    erased = [b for b in boxes if b is not None]
    assert 0.45 < len(erased) / len(boxes) < 0.55
    for top, left, h, w in erased:
        assert 0 <= top and top + h <= 16 and 0 <= left and left + w <= 20 and 0 < h < 16 and 0 < w < 20
    areas = np.array([h * w / (16 * 20) for _, _, h, w in erased])
    assert areas.min() > MIN_AREA * 0.5 and areas.max() < MAX_AREA * 1.3  # rounding to whole pixels
    assert erasing_boxes(50, 16, 20, 0.0, np.random.default_rng(0)) == [None] * 50


def test_random_erasing_fills_noise_of_the_input_normalization_reproducibly():
    x = torch.full((64, 3, 16, 16), -1.0)
    mean, std = torch.tensor([0.2, 0.5, 0.8]).view(1, 3, 1, 1), torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)

    def erase(seed):
        return random_erase(x, 1.0, mean, std, np.random.default_rng(seed), torch.Generator().manual_seed(seed))

    out = erase(0)
    assert torch.equal(out, erase(0)) and not torch.equal(out, erase(1)) and x.eq(-1).all()  # x untouched
    noise = out[out.ne(-1)].numel()
    assert noise > 0 and out.eq(-1).any(1).eq(out.eq(-1).all(1)).all()  # a box spans every channel
    for c in range(3):
        filled = out[:, c][out[:, c] != -1]
        assert filled.mean().item() == pytest.approx(mean.flatten()[c].item(), abs=0.02)
        assert filled.std().item() == pytest.approx(std.flatten()[c].item(), rel=0.1)
    assert random_erase(x, 0.0, mean, std, np.random.default_rng(0), torch.Generator()) is x


# ------------------------------------------------------------------------------ RandAugment
def test_randaugment_spec_parsing():
    assert parse_spec(DEFAULT_SPEC) == RandAugmentSpec(num_ops=2, magnitude=9.0, magnitude_std=0.5, increasing=True)
    assert parse_spec("rand-n3-m5") == RandAugmentSpec(3, 5.0, 0.0, False)
    for bad, words in [("auto-m9", "starts with 'rand'"), ("rand-m11", "m (magnitude)"), ("rand-q3", "unknown part"),
                       ("rand-n0", "whole number >= 1"), ("rand-inc2", "inc must be 0 or 1")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            parse_spec(bad)


def test_randaugment_levels_follow_timm():
    inc, original = operations(True), operations(False)
    assert len(inc) == len(original) == 15
    assert inc["Rotate"][1](1.0, -1.0) == -30.0 and inc["ShearX"][1](0.5, 1.0) == pytest.approx(0.15)
    assert inc["TranslateXRel"][1](0.9, 1.0) == pytest.approx(0.405)
    assert inc["Posterize"][1](0.9, 1.0) == 1 and original["Posterize"][1](0.9, 1.0) == 3  # bits kept
    assert inc["Solarize"][1](0.9, 1.0) == 26 and original["Solarize"][1](0.9, 1.0) == 230  # threshold
    assert inc["Contrast"][1](0.9, -1.0) == pytest.approx(0.19)
    assert original["Contrast"][1](0.9, 1.0) == pytest.approx(1.72)
    assert inc["SolarizeAdd"][1](1.0, 1.0) == 110


def picture(mode: str = "RGB", size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(0)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_every_randaugment_operation_keeps_size_and_mode(mode):
    img = picture(mode)
    for increasing in (True, False):
        for name, (op, level) in operations(increasing).items():
            for sign in (-1.0, 1.0):
                out = op(img, level(1.0, sign) if level else None, 128)
                assert out.size == img.size and out.mode == mode, name


def test_randaugment_is_a_function_of_the_seed():
    ra, img = RandAugment(parse_spec(DEFAULT_SPEC)), picture()
    runs = [np.asarray(ra(img, torch.Generator().manual_seed(s))) for s in (0, 0, 1, 2, 3)]
    assert np.array_equal(runs[0], runs[1])
    assert sum(not np.array_equal(runs[0], r) for r in runs[2:]) >= 2


def test_finetune_view_is_uint8_of_the_input_size_and_the_same_in_workers():
    images = np.random.default_rng(0).integers(0, 256, (12, 20, 24, 3), dtype=np.uint8)
    view = FinetuneTransform(16, 3, RandAugment(parse_spec(DEFAULT_SPEC)))
    dataset = ArrayDataset(images, list(range(12)), view, channels=3)
    keys = list(EpochSampler(12, 4, seed=5, epoch=1))

    def batches(workers):
        loader = DataLoader(dataset, batch_size=4, sampler=keys, num_workers=workers)
        return torch.cat([x for x, _, _ in loader])

    here = batches(0)
    assert here.dtype == torch.uint8 and here.shape == (12, 3, 16, 16)
    assert torch.equal(here, batches(2))
    gray = FinetuneTransform(16, 1)(images[0], torch.Generator().manual_seed(0))
    assert gray.shape == (1, 16, 16) and gray.dtype == torch.uint8
