import pytest
import torch

from energyvit.checkpoint import load_checkpoint, save_checkpoint
from energyvit.data.in_memory import ImageSplit, SplitDataset
from energyvit.evaluation.features import features, pool_tokens
from energyvit.evaluation.probes import linear_probe
from helpers import tiny_model


def test_linear_probe_separates_separable_classes_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    centers = torch.randn(3, 10, generator=gen) * 3
    x = centers[y] + 0.3 * torch.randn(300, 10, generator=gen)
    assert linear_probe(x[:200], y[:200], x[200:], y[200:]) == 1.0
    noise = torch.randn(300, 10, generator=gen)  # no information: near chance (1/3)
    assert linear_probe(noise[:200], y[:200], noise[200:], y[200:]) < 0.6


def test_feature_poolings_have_their_shapes():
    model = tiny_model(dtype=torch.float32).eval()
    x = torch.rand(5, 1, 8, 8)
    split = SplitDataset(ImageSplit(x, torch.arange(5)))
    feats, pixels, labels = features([model], split, 4, ("tokens", "mean", "cls"), num_workers=0)
    assert feats[(0, "tokens")].shape == (4, 16 * 32)
    assert feats[(0, "mean")].shape == (4, 32)
    assert feats[(0, "cls")].shape == (4, 32)
    # fewer than all: a fixed random subset (a class-sorted set must not lose its last classes)
    assert pixels.shape == (4, 64) and len(set(labels.tolist())) == 4 and labels.tolist() != [0, 1, 2, 3]
    assert features([model], split, 5, ("mean",), num_workers=0)[2].tolist() == [0, 1, 2, 3, 4]  # all, in order
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        pool_tokens(model.forward_features(x), "max")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, {"epoch": 1})

    def broken_save(obj, f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1  # the old checkpoint survives intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temporary file left behind
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth could not be read"):
        load_checkpoint(tmp_path / "bad.pth")


def test_random_shift_translates_each_image_within_bounds():
    from energyvit.data.in_memory import random_shift

    x = torch.zeros(64, 1, 16, 16)
    x[:, :, 6:10, 6:10] = 1.0  # a square away from the border
    shifted = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape and torch.equal(random_shift(x, 0), x)
    rows = shifted[:, 0].sum(2).argmax(1)  # first row of the square per image
    assert set(rows.tolist()) == {4, 5, 6, 7, 8}  # every offset in [-2, 2] occurs, none beyond
    assert torch.equal(shifted.sum((1, 2, 3)), x.sum((1, 2, 3)))  # content moved, not cut
