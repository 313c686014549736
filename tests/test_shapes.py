"""The procedural shapes dataset: determinism, the ImageFolder layout the data layer reads, class
balance, atomic writes, one-line flag errors, speed."""
from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest
from PIL import Image

from energyvit.cli import main
from energyvit.data import shapes
from energyvit.data.files import open_dataset

SMALL = dict(train_per_class=3, val_per_class=2, size=16)


def digest(root) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    shapes.generate(tmp_path / "a", seed=5, **SMALL)
    shapes.generate(tmp_path / "b", seed=5, **SMALL)
    shapes.generate(tmp_path / "c", seed=6, **SMALL)
    a, b, c = (digest(tmp_path / name) for name in "abc")
    assert a == b
    images = [name for name in a if name.endswith(".png")]
    assert len(images) == 10 * 5 and all(a[name] != c[name] for name in images)


def test_image_depends_only_on_its_address(tmp_path):
    # more images per class must not change the ones already there
    shapes.generate(tmp_path / "few", **SMALL)
    shapes.generate(tmp_path / "more", **{**SMALL, "train_per_class": 5})
    few, more = digest(tmp_path / "few"), digest(tmp_path / "more")
    assert all(more[name] == h for name, h in few.items() if name.endswith(".png"))
    images = [h for name, h in more.items() if name.endswith(".png")]
    assert len(set(images)) == len(images) == 10 * 7  # and no two alike


def test_layout_is_read_as_a_labeled_imagefolder_with_val_split(tmp_path):
    summary = shapes.generate(tmp_path / "d", **SMALL)
    assert summary["images"] == 10 * 5 and summary["classes"] == list(shapes.CLASSES)
    train = open_dataset(str(tmp_path / "d"), "train", 16, None, augment=False)
    val = open_dataset(str(tmp_path / "d"), "val", 16, None, augment=False)
    assert val is not None and len(train) == 30 and len(val) == 20
    assert sorted(train.classes) == sorted(shapes.CLASSES) and val.classes == train.classes
    for dataset in (train, val):
        for i in range(len(dataset)):
            image, label, skipped = dataset[i]
            assert image.shape == (3, 16, 16) and skipped == 0
            assert f"/{dataset.classes[label]}/" in dataset.path(i)  # the label is the class folder


def test_classes_are_balanced_and_images_are_rgb_of_the_size(tmp_path):
    shapes.generate(tmp_path / "d", train_per_class=4, val_per_class=3, size=24)
    for split, per_class in (("train", 4), ("val", 3)):
        folders = sorted((tmp_path / "d" / split).iterdir())
        assert [f.name for f in folders] == sorted(shapes.CLASSES)
        assert all(len(list(f.glob("*.png"))) == per_class for f in folders)
    with Image.open(next((tmp_path / "d" / "val" / "ring").glob("*.png"))) as img:
        assert img.mode == "RGB" and img.size == (24, 24)


@pytest.mark.parametrize("label", shapes.CLASSES)
def test_object_is_lighter_than_the_background(label):
    # object_contrast 0.5: every channel of the object >= 0.5, of the background <= 0.5, so without
    # clutter a pixel is light or dark in all its channels at once unless it lies on the edge
    params = {k: v for k, v in shapes.DEFAULTS.items() if k not in ("train_per_class", "val_per_class", "seed")}
    image = shapes.render(label, np.random.default_rng(1), **{**params, "clutter": 0, "object_contrast": 0.5})
    light, dark = (image >= 127).all(axis=2), (image <= 128).all(axis=2)
    assert 0.05 < light.mean() < 0.7 and dark.mean() > 0.2
    assert (~light & ~dark).mean() < 0.2  # edge pixels only


def test_occluders_leave_most_of_the_object_visible():
    # the same seed draws the same background and object before any distractor, so a scene
    # without clutter shows the object that the cluttered scene occludes
    params = {k: v for k, v in shapes.DEFAULTS.items() if k not in ("train_per_class", "val_per_class", "seed")}
    params.update(size=32, object_contrast=0.5, min_visible=0.8)
    unchanged = []
    for seed in range(20):
        clean = shapes.render("disc", np.random.default_rng(seed), **{**params, "clutter": 0})
        busy = shapes.render("disc", np.random.default_rng(seed), **{**params, "clutter": 30, "front_fraction": 1.0})
        obj = (clean >= 128).all(axis=2)
        unchanged.append((busy[obj] == clean[obj]).all(axis=1).mean())
    assert min(unchanged) > 0.6  # not 0.8: an output pixel changes when any of its subpixels is hidden
    assert np.mean(unchanged) < 0.95  # occluders do hide parts of it


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        shapes.generate(out, **SMALL)
    assert (out / "keep.txt").read_text() == "mine"
    shapes.generate(out, overwrite=True, **SMALL)
    assert not (out / "keep.txt").exists() and (out / "val" / "disc").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary folder left behind


def test_a_crash_leaves_no_dataset_and_no_temporary_folder(tmp_path, monkeypatch):
    calls = 0

    def failing_render(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 7:
            raise RuntimeError("boom")
        return np.zeros((16, 16, 3), np.uint8)

    monkeypatch.setattr(shapes, "render", failing_render)
    with pytest.raises(RuntimeError, match="boom"):
        shapes.generate(tmp_path / "d", **SMALL)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, flag", [
    (["--train_per_class", "0"], "--train_per_class"),
    (["--size", "abc"], "--size"),
    (["--min_visible", "1.5"], "--min_visible"),
    (["--texture_contrast", "nan"], "--texture_contrast"),
    (["--min_scale", "0.9", "--max_scale", "0.5"], "--min_scale"),
])
def test_bad_flag_is_one_line_and_exit_status_2(tmp_path, capsys, argv, flag):
    # tiny counts first: should a check fail to fire, it stays fast
    status = main(["shapes", str(tmp_path / "d"), "--train_per_class", "1", "--val_per_class", "1", "--size", "8", *argv])
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: argument " + flag in err
    assert not (tmp_path / "d").exists()


def test_existing_folder_error_from_the_command_line(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("")
    status = main(["shapes", str(tmp_path / "d"), "--train_per_class", "1", "--val_per_class", "1"])
    assert status == 2 and "--overwrite" in capsys.readouterr().err


def test_bad_parameter_in_python_names_it(tmp_path):
    with pytest.raises(ValueError, match="clutter"):
        shapes.generate(tmp_path / "d", clutter=-1)
    with pytest.raises(TypeError, match="colour"):
        shapes.generate(tmp_path / "d", colour=1)


def test_small_dataset_is_fast(tmp_path):
    t0 = time.perf_counter()
    assert main(["shapes", str(tmp_path / "d"), "--train_per_class", "10", "--val_per_class", "2"]) == 0
    assert time.perf_counter() - t0 < 5  # 120 images of 32x32; about 0.5 s on one free core
