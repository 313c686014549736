"""WebDataset tar shards (energyvit.data.webdataset, ShardDataset): the index's order and labels,
the train/val and brace-pattern layouts, damaged input (corrupt member, truncated or garbage
shard, absurd sizes, bad labels) skipped and counted, and exact resume of a pretraining run on
shards with DataLoader workers, on small shards written with Python's tarfile."""
from __future__ import annotations

import io
import json
import logging
import signal
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from energyvit.cli import main
from energyvit.data import webdataset
from energyvit.data.files import ShardDataset, detect_format, open_dataset

BASE = ["pretrain", "--model", "vit_pico_patch2", "--input_size", "8", "--batch_size", "8", "--epochs", "2",
        "--warmup_epochs", "1", "--num_threads", "1", "--no-tensorboard", "--grid_rows", "0", "--probe_images", "16"]


@pytest.fixture(autouse=True)
def fresh_index_cache():
    webdataset._scan_cached.cache_clear()
    yield
    webdataset._scan_cached.cache_clear()


def pixels(seed: int, size=(12, 12)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def encoded(seed: int, fmt: str = "PNG", size=(12, 12)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels(seed, size)).save(buf, format=fmt)
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path, samples) -> None:
    """samples: (key, {extension: bytes}) in order, members in the dict's order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                add(tar, f"{key}.{ext}", data)


def labeled(keys_seeds_labels, fmt="PNG", ext="png"):
    return [(key, {ext: encoded(seed, fmt), "cls": f"{label}\n".encode()}) for key, seed, label in keys_seeds_labels]


def test_index_order_labels_and_ignored_members(tmp_path):
    write_shard(tmp_path / "b.tar", labeled([("x/s2", 2, 0), ("x/s3", 3, 2)]))
    shard = tmp_path / "a.tar"
    with tarfile.open(shard, "w") as tar:
        add(tar, "s0.png", encoded(0))
        add(tar, "s0.cls", b"1")
        add(tar, "s0.json", b"{}")  # other extensions: ignored
        add(tar, "s0.seg.png", encoded(9))  # second image of the sample: the first one counts
        dirinfo = tarfile.TarInfo("folder")
        dirinfo.type = tarfile.DIRTYPE
        tar.addfile(dirinfo)
        link = tarfile.TarInfo("s1.jpg")  # a link is never followed: not an image member
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        add(tar, "s1.webp", encoded(1, "WEBP"))
        add(tar, "s1.cls", b" 0 ")
        add(tar, ".hidden.png", encoded(5))  # hidden files: ignored
    with tarfile.open(tmp_path / "c.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        sparse = tarfile.TarInfo("s4.png")  # a sparse file's data is not one run of bytes: not read
        sparse.type, sparse.size = tarfile.GNUTYPE_SPARSE, 3
        tar.addfile(sparse, io.BytesIO(b"abc"))
        add(tar, "s4.cls", b"0")
        add(tar, "s5.png", encoded(5))
        add(tar, "s5.cls", b"1")
    (tmp_path / "notes.txt").write_text("not a shard")
    assert detect_format(str(tmp_path)) == "webdataset"
    ds = open_dataset(str(tmp_path), "train", 12, None, augment=False)
    assert isinstance(ds, ShardDataset) and len(ds) == 5 and ds.classes == ["0", "1", "2"]
    assert [ds[i][1] for i in range(5)] == [1, 0, 0, 2, 1]  # shards by name, members in order
    assert torch.equal(ds[0][0], torch.from_numpy(pixels(0)).permute(2, 0, 1))  # PNG: exact pixels
    assert ds[1][0].shape == (3, 12, 12) and ds[1][0].dtype == torch.uint8  # WebP, lossy
    assert torch.equal(ds[3][0], torch.from_numpy(pixels(3)).permute(2, 0, 1))
    assert "a.tar" in ds.where(0) and "b.tar" in ds.where(3)
    assert open_dataset(str(tmp_path), "val", 12, None, augment=False) is None  # no val split: held out later


def test_unlabeled_shards_and_jpeg_members(tmp_path):
    write_shard(tmp_path / "only.tar", [(f"k{i}", {"JPEG": encoded(i, "JPEG", (40, 30))}) for i in range(3)])
    ds = open_dataset(str(tmp_path), "train", 16, None, augment=True, jpeg_draft=True)
    assert ds.classes is None and [ds[i][1] for i in range(3)] == [-1, -1, -1]
    assert ds[(1, 5)][0].shape == (3, 16, 16) and torch.equal(ds[(1, 5)][0], ds[(1, 5)][0])


def test_train_val_folders_and_brace_patterns(tmp_path):
    for i in range(3):
        write_shard(tmp_path / "train" / f"shard-{i:03d}.tar", labeled([(f"t{i}", i, i)]))
    write_shard(tmp_path / "val" / "v.tar", labeled([("v0", 7, 1)]))
    train = open_dataset(str(tmp_path), "train", 12, None, augment=False)
    val = open_dataset(str(tmp_path), "val", 12, None, augment=False)
    assert len(train) == 3 and len(val) == 1 and val.classes == train.classes == ["0", "1", "2"]
    assert "(val, 1 shards)" in val.source
    pattern = str(tmp_path / "train" / "shard-{000..002}.tar")
    assert detect_format(pattern) == "webdataset"
    by_pattern = open_dataset(pattern, "train", 12, None, augment=False)
    assert [by_pattern[i][1] for i in range(3)] == [train[i][1] for i in range(3)] == [0, 1, 2]
    assert open_dataset(pattern, "val", 12, None, augment=False) is None
    assert webdataset.expand_braces("a{08..10}-{x,y}.tar") == ["a08-x.tar", "a08-y.tar", "a09-x.tar", "a09-y.tar",
                                                               "a10-x.tar", "a10-y.tar"]
    with pytest.raises(FileNotFoundError, match=r"1 of its 4 shards not found, first .*shard-003.tar"):
        open_dataset(str(tmp_path / "train" / "shard-{000..003}.tar"), "train", 12, None, augment=False)
    with pytest.raises(ValueError, match="must run upwards"):
        webdataset.expand_braces("s{5..1}.tar")


def test_val_labels_follow_the_training_classes(tmp_path):
    write_shard(tmp_path / "train" / "t.tar", labeled([("a", 0, 0), ("b", 1, 1)]))
    write_shard(tmp_path / "val" / "v.tar", labeled([("c", 2, 5)]))
    with pytest.raises(ValueError, match=r"has class 5, which the training split .* lacks \(its classes are 0..1\)"):
        open_dataset(str(tmp_path), "val", 12, None, augment=False)


def test_corrupt_member_is_skipped_counted_and_logged_once(tmp_path, caplog):
    samples = labeled([("a", 0, 0), ("b", 1, 1), ("c", 2, 0)])
    samples[1][1]["png"] = b"\x89PNG but not really" * 3
    write_shard(tmp_path / "s.tar", samples)
    ds = open_dataset(str(tmp_path), "train", 12, None, augment=False)
    with caplog.at_level(logging.WARNING, logger="energyvit.data.files"):
        assert [ds[i][2] for i in range(3)] == [0, 1, 0]  # skipped files, as the training loop sums them
        assert torch.equal(ds[1][0], ds[2][0]) and ds[1][1] == 0  # replaced by the next readable sample
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "s.tar (member at byte" in warnings[0]


def test_scoring_names_each_shard_member_and_never_replaces_a_corrupt_one(tmp_path):
    from energyvit.data.image_sets import dataset_set

    samples = labeled([("a", 0, 0), ("b", 1, 1), ("c", 2, 0)])
    samples[1][1]["png"] = b"broken"
    write_shard(tmp_path / "s.tar", samples)
    ds = open_dataset(str(tmp_path), "train", 12, None, augment=False)
    scored = dataset_set(ds, "shards")
    assert scored.labels == [0, 1, 0] and all("s.tar (member at byte" in n for n in scored.names)
    assert scored[1] == (None, 1)  # unreadable: skipped and counted by the scorer, not its neighbour's image
    assert torch.equal(scored[2][0], ds[2][0])


def test_a_member_of_another_format_is_not_decoded(tmp_path):
    """Shard bytes only reach the JPEG, PNG and WebP decoders, whatever the member claims."""
    gif = io.BytesIO()
    Image.fromarray(pixels(0)).save(gif, format="GIF")
    write_shard(tmp_path / "s.tar", [("a", {"png": gif.getvalue()}), ("b", {"png": encoded(1)})])
    ds = open_dataset(str(tmp_path), "train", 12, None, augment=False)
    assert ds[0][2] == 1 and torch.equal(ds[0][0], ds[1][0])


def shard_bytes(samples) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                add(tar, f"{key}.{ext}", data)
    return buf.getvalue()


def member_offsets(data: bytes) -> dict[str, int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m.offset_data for m in tar.getmembers()}


@pytest.mark.parametrize("cut", ["in_data", "in_header", "garbage_after"])
def test_a_damaged_shard_keeps_the_samples_before_the_damage(tmp_path, cut, caplog):
    samples = labeled([(f"k{i}", i, i % 2) for i in range(5)])
    data = shard_bytes(samples)
    offsets = member_offsets(data)
    if cut == "in_data":  # inside k3's image: k3 is lost
        data = data[: offsets["k3.png"] + 10]
    elif cut == "in_header":  # inside the header of k3's label: k3 may have lost its label, so it is dropped
        data = data[: offsets["k3.cls"] - 512 + 100]
    else:  # a block of garbage where k3's label header was: tarfile stops there without a word
        start = offsets["k3.cls"] - 512
        data = data[:start] + b"\x07" * 512 + data[start + 512:]
    (tmp_path / "bad.tar").write_bytes(data)
    write_shard(tmp_path / "good.tar", labeled([("g", 9, 1)]))
    with caplog.at_level(logging.WARNING, logger="energyvit.data.files"):
        ds = open_dataset(str(tmp_path), "train", 12, None, augment=False)
    index = ds.index
    assert len(ds) == 4 and [ds[i][1] for i in range(4)] == [0, 1, 0, 1]  # k0, k1, k2, then good.tar's g
    assert index.skipped_samples == 1 and index.bad_shards == 0 and "bad.tar: damaged at byte" in index.problems[0]
    assert "1 samples skipped while indexing" in ds.source
    assert any("bad.tar: damaged" in r.getMessage() for r in caplog.records)


def test_unreadable_shards_are_skipped_and_only_unreadable_ones_are_one_error(tmp_path, capsys):
    (tmp_path / "a-garbage.tar").write_bytes(b"\x01" * 3000)
    (tmp_path / "b-empty.tar").write_bytes(b"")
    import gzip
    (tmp_path / "c-gzipped.tar").write_bytes(gzip.compress(shard_bytes(labeled([("z", 0, 0)]))))
    write_shard(tmp_path / "d-good.tar", labeled([("a", 0, 0), ("b", 1, 1)]))
    ds = open_dataset(str(tmp_path), "train", 12, None, augment=False)
    assert len(ds) == 2 and ds.index.bad_shards == 3 and "3 of 4 shards unreadable" in ds.index.summary()
    (tmp_path / "d-good.tar").unlink()
    with pytest.raises(ValueError, match=r"no readable samples in the 3 shard\(s\) of .*not a readable uncompressed tar"):
        open_dataset(str(tmp_path), "train", 12, None, augment=False)
    assert main(BASE + ["--data_path", str(tmp_path), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no readable samples" in err[0] and str(tmp_path) in err[0], err


@pytest.mark.parametrize("case", ["missing_shard", "val_class", "empty_val", "no_images"])
def test_bad_shard_layouts_are_one_line_exit_2(tmp_path, capsys, case):
    write_shard(tmp_path / "train" / "s-0.tar", labeled([("a", 0, 0), ("b", 1, 1)] * 6))
    path, needle = str(tmp_path), ""
    if case == "missing_shard":
        path, needle = str(tmp_path / "train" / "s-{0..1}.tar"), "1 of its 2 shards not found"
    elif case == "val_class":
        write_shard(tmp_path / "val" / "v.tar", labeled([("c", 2, 7)]))
        needle = "has class 7, which the training split"
    elif case == "empty_val":
        (tmp_path / "val").mkdir()
        needle = "no .tar shards in"
    else:
        write_shard(tmp_path / "train" / "s-0.tar", [("a", {"txt": b"hello"})])
        needle = "no readable samples in the 1 shard(s)"
    assert main(BASE + ["--data_path", path, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_absurd_sizes_and_bad_labels_drop_their_samples(tmp_path, monkeypatch):
    monkeypatch.setattr(webdataset, "MAX_MEMBER_BYTES", 2000)
    samples = labeled([("ok0", 0, 0), ("big", 1, 1), ("text", 2, 0), ("neg", 3, 0), ("huge", 4, 0),
                       ("nolabel", 5, 0), ("ok1", 6, 3)])
    samples[1][1]["png"] = encoded(1, size=(60, 60))  # over the (patched) member limit
    samples[2][1]["cls"] = b"cat"
    samples[3][1]["cls"] = b"-1"
    samples[4][1]["cls"] = b"1000000"  # over MAX_LABEL
    del samples[5][1]["cls"]  # an unlabeled sample in a labeled set
    write_shard(tmp_path / "s.tar", samples)
    ds = open_dataset(str(tmp_path), "train", 12, None, augment=False)
    assert [ds[i][1] for i in range(len(ds))] == [0, 3] and ds.classes == ["0", "1", "2", "3"]
    assert ds.index.skipped_samples == 5
    text = " ".join(ds.index.problems)
    assert "over 2000" in text and "without a .cls label" in text


def test_a_shard_changed_after_indexing_is_a_skipped_sample(tmp_path):
    write_shard(tmp_path / "s.tar", labeled([("a", 0, 0), ("b", 1, 0)]))
    ds = open_dataset(str(tmp_path), "train", 12, None, augment=False)
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(data[: int(ds.index.offset[1]) + 5])
    assert ds[1][2] == 1 and torch.equal(ds[1][0], ds[0][0])


def write_two_class_shards(root, per_shard: int, shards: int, corrupt: int | None = None) -> None:
    """Noisy images brighter on the left (class 0) or right (class 1); sample `corrupt` broken."""
    rng = np.random.default_rng(0)
    n = 0
    for s in range(shards):
        samples = []
        for _ in range(per_shard):
            label = n % 2
            img = rng.integers(0, 120, (10, 10, 3), dtype=np.uint8)
            img[:, :5] += 120 * (label == 0)
            img[:, 5:] += 120 * (label == 1)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            samples.append((f"{n:05d}", {"png": buf.getvalue() if n != corrupt else b"broken", "cls": b"%d" % label}))
            n += 1
        write_shard(root / f"shard-{s:02d}.tar", samples)


def test_pretraining_on_shards_resumes_exactly_with_workers(tmp_path, monkeypatch):
    """44 samples in 4 shards, 4 held out (a tenth, by HOLD_OUT_SEED), 40 train: 5 steps of 8 per
    epoch, so every training sample is drawn once an epoch, the corrupt one included (counted in
    skipped_files). Stopped by SIGINT after step 6 (epoch 1, step 1) and resumed, with 2
    persistent DataLoader workers, the weights equal those of the uninterrupted run."""
    from energyvit.data.splits import HOLD_OUT_SEED

    held_out = set(torch.randperm(44, generator=torch.Generator().manual_seed(HOLD_OUT_SEED))[:4].tolist())
    data = tmp_path / "shards"
    write_two_class_shards(data, per_shard=11, shards=4, corrupt=min(set(range(44)) - held_out))
    args = BASE + ["--data_path", str(data), "--num_workers", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(args + ["--output_dir", str(full)]) == 0
    log = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10] and [r["skipped_files"] for r in log] == [1, 1]
    assert json.loads((full / "summary.json").read_text())["probe_held_out_images"] == 4

    calls = {"n": 0}
    step = torch.optim.AdamW.step

    def step_then_signal(self, *a, **k):
        out = step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 6:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_signal)
    assert main(args + ["--output_dir", str(part)]) == 130
    monkeypatch.undo()
    state = torch.load(part / "checkpoint-last.pth", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 1, 6)
    assert main(args + ["--output_dir", str(part), "--resume", str(part / "checkpoint-last.pth")]) == 0
    a = torch.load(full / "checkpoint-last.pth", weights_only=True)["model"]
    b = torch.load(part / "checkpoint-last.pth", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
