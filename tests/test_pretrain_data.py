"""`energyvit pretrain --data_path` on small generated image folders: an ImageFolder with a corrupt
file (skipped and counted, DataLoader workers), a flat unlabeled folder, idx files, the MAE
baseline, and clear errors."""
import gzip
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from energyvit.cli import main

BASE = ["pretrain", "--model", "vit_pico_patch2", "--input_size", "8", "--batch_size", "8", "--epochs", "2",
        "--warmup_epochs", "1", "--tasks", "mim:0.5,denoise:0.25,sr:0.25", "--num_threads", "1", "--no-tensorboard",
        "--grid_rows", "2"]


def write_images(folder, n: int, bright_left: bool, seed: int, size=(20, 24)) -> None:
    """Noisy RGB images, brighter on the left or the right half: two learnable classes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = rng.integers(0, 120, (size[1], size[0], 3), dtype=np.uint8)
        half = slice(0, size[0] // 2) if bright_left else slice(size[0] // 2, None)
        img[:, half] += 120
        Image.fromarray(img).save(folder / f"img{i:03d}.{'png' if i % 2 else 'jpg'}")


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "data"
    write_images(root / "left", 24, True, 0)
    write_images(root / "right", 24, False, 1)
    (root / "left" / "broken.png").write_bytes(b"not an image at all")
    return root


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_image_folder_with_a_corrupt_file_and_workers(image_folder, tmp_path):
    out = tmp_path / "out"
    assert main(BASE + ["--data_path", str(image_folder), "--num_workers", "2", "--output_dir", str(out)]) == 0
    log = read_log(out)
    # 49 files, 4 held out (a tenth), 45 train: 5 steps of 8 per epoch; the broken file is skipped when drawn
    assert [r["step"] for r in log] == [5, 10]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["probe_pool"] == "mean" and summary["probe_held_out_images"] == 4
    assert 0 <= summary["probe_acc"] <= 1 and summary["probe_acc_raw_pixels"] == 1.0  # halves are separable
    assert summary["model_config"]["in_chans"] == 3 and summary["model_config"]["img_size"] == 8
    assert sorted(p.name for p in (out / "pictures").iterdir()) == [
        f"epoch{e:04d}-{t}.png" for e in (1, 2) for t in ("denoise", "mim", "sr")]
    skipped = sum(r["skipped_files"] for r in log)
    assert skipped in (0, 1, 2)  # the broken file is drawn at most once per epoch (if it is not held out)


def test_broken_files_are_counted(tmp_path):
    root = tmp_path / "data"
    write_images(root / "a", 20, True, 0)
    for i in range(20):
        (root / "a" / f"bad{i}.png").write_bytes(b"garbage")
    out = tmp_path / "out"
    assert main(BASE + ["--data_path", str(root), "--epochs", "1", "--output_dir", str(out)]) == 0
    assert read_log(out)[0]["skipped_files"] > 0


def test_flat_folder_without_labels_skips_the_probe(tmp_path, capsys):
    root = tmp_path / "flat"
    write_images(root, 10, True, 0)  # images at the top: not an ImageFolder
    write_images(root / "nested" / "deeper", 20, True, 1)
    out = tmp_path / "out"
    assert main(BASE + ["--data_path", str(root), "--tasks", "mim,colorize", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["probe_acc"] is None and "no labels" in summary["probe_note"]
    assert set(summary["tasks"]) == {"mim", "colorize"}
    assert "linear probe: skipped" in capsys.readouterr().out


def write_idx(folder, prefix: str, n: int, seed: int, gz: bool) -> None:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (n, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with opener(folder / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, 8, 8) + images.tobytes())
    with opener(folder / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">II", 0x801, n) + labels.tobytes())


def test_idx_files_train_on_one_channel_and_resume(tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    write_idx(root, "train", 40, 0, gz=True)
    write_idx(root, "t10k", 12, 1, gz=False)
    out = tmp_path / "out"
    assert main(BASE + ["--data_path", str(root), "--epochs", "1", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_config"]["in_chans"] == 1 and summary["probe_held_out_images"] == 12
    assert main(BASE + ["--data_path", str(root), "--output_dir", str(out), "--resume",
                        str(out / "checkpoint-last.pth")]) == 0
    assert [r["epoch"] for r in read_log(out)] == [0, 1]


def test_mae_baseline_pretrains_and_its_encoder_probes(image_folder, tmp_path, capsys):
    out = tmp_path / "mae"
    assert main(BASE + ["--method", "mae", "--data_path", str(image_folder), "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "mae" and set(summary["tasks"]) == {"mae"}
    assert summary["tasks"]["mae"]["mse_restored"] > 0 and summary["probe_acc"] is not None
    state = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert state["method"] == "mae" and "decoder_pred.weight" in state["mae"]
    assert "blocks.0.attn.qkv.weight" in state["model"] and not any(k.startswith("decoder") for k in state["model"])
    # MAE never reads the energy, so its encoder carries no energy head (a default of energy runs)
    assert state["model_config"]["energy_head_depth"] == 0 and not any(k.startswith("energy") for k in state["model"])
    assert main(["probe", str(out / "checkpoint-last.pth"), "--knn_k", "5"]) == 0
    capsys.readouterr()
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(img)
    assert main(["restore", str(out / "checkpoint-last.pth"), str(img), "--task", "denoise", "-o", str(tmp_path / "r.png")]) == 2
    assert "pretrained with --method mae" in capsys.readouterr().err
    # a resumed run is MAE again without saying so; asking for the other method is refused
    assert main(BASE + ["--method", "energy", "--data_path", str(image_folder), "--output_dir", str(out), "--resume",
                        str(out / "checkpoint-last.pth")]) == 2
    assert "--method energy (the checkpoint's: mae)" in capsys.readouterr().err
    assert main(BASE + ["--epochs", "3", "--data_path", str(image_folder), "--output_dir", str(out), "--resume",
                        str(out / "checkpoint-last.pth")]) == 0
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["method"] == "mae"


@pytest.mark.parametrize("make,needle", [
    (lambda p: None, "dataset path not found"),
    (lambda p: p.mkdir(), "no images found"),
])
def test_bad_data_path_is_one_clear_line(tmp_path, capsys, make, needle):
    path = tmp_path / "nothing"
    make(path)
    assert main(BASE + ["--data_path", str(path), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and str(path) in err and len(err.splitlines()) == 1, err
