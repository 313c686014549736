"""Bad input through the command line, one table: every case ends in one clear line naming the
flag, file or value (exit status 2), or in a warning while the work goes on; never a traceback,
lost work, or code run from a file.

Each case builds what it needs in a fresh folder, runs `energyvit ...` in this process (an
exception escaping main() fails the test: that is the traceback a user would see), then checks
the exit status, that stderr is exactly one line holding the expected words, that no marker file
was created by a crafted checkpoint, and any files the case promises.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from energyvit import pretrain
from energyvit.checkpoint import save_checkpoint, save_json
from energyvit.cli import main
from energyvit.training import LossTrend
from helpers import tiny_checkpoint

PICO = ["--model", "vit_pico_patch2", "--batch_size", "250", "--num_threads", "1", "--no-tensorboard", "--probe_images",
        "200"]
MARKER = "MARKER"


class RunsCode:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __reduce__(self):
        return os.system, (f"touch {self.folder / MARKER}",)


def crafted(tmp: Path) -> str:
    path = tmp / "evil.pth"
    torch.save({"model": RunsCode(tmp), "model_config": {}}, path)
    return str(path)


def image(tmp: Path, name: str = "img.png", size: int = 8) -> str:
    Image.new("L", (size, size), 128).save(tmp / name)
    return str(tmp / name)


def huge_png(tmp: Path) -> str:
    """A small file whose header says 30000 x 30000 pixels (what Pillow's size check reads)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 30001)) + chunk(b"IEND", b"")
    (tmp / "huge.png").write_bytes(data)
    return str(tmp / "huge.png")


def ckpt(tmp: Path, **overrides) -> str:
    tiny_checkpoint(tmp / "ckpt.pth", **overrides)
    return str(tmp / "ckpt.pth")


def saved(tmp: Path, name: str, obj) -> str:
    torch.save(obj, tmp / name)
    return str(tmp / name)


def resumable(tmp: Path) -> str:
    """A checkpoint with every entry `pretrain --resume` reads (the weights of tiny_checkpoint)."""
    state = torch.load(ckpt(tmp), weights_only=True)
    state.update(optimizer={}, step_in_epoch=0, steps_per_epoch=6, global_step=0, method="energy",
                 args={"model": "vit_pico_patch2"})
    return saved(tmp, "resumable.pth", state)


def mismatched(tmp: Path) -> str:
    """A checkpoint whose weights are of another width than its config says."""
    state = torch.load(resumable(tmp), weights_only=True)
    state["model_config"]["embed_dim"] = 64
    state["model_config"]["num_heads"] = 4
    return saved(tmp, "mismatch.pth", state)


def missing_keys(tmp: Path) -> str:
    state = torch.load(ckpt(tmp), weights_only=True)
    return saved(tmp, "partial.pth", {k: v for k, v in state.items() if k != "model_config"})


def corrupt_folder(tmp: Path) -> str:
    folder = tmp / "corrupt"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i}.png").write_bytes(b"not a png")
    return str(folder)


def self_link_folder(tmp: Path) -> str:
    folder = tmp / "links"
    (folder / "a").mkdir(parents=True)
    for i in range(20):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / "a" / f"{i}.png")
    os.symlink("loop.png", folder / "a" / "loop.png")  # points at itself
    return str(folder)


def unlabeled_folder(tmp: Path) -> str:
    folder = tmp / "flat"
    folder.mkdir()
    for i in range(20):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i}.png")
    return str(folder)


@dataclass
class Case:
    name: str
    argv: object  # list of strings, or tmp -> list of strings
    status: int = 2
    needle: str | tuple = ()  # words the single stderr line must hold
    files: tuple[str, ...] = ()  # files that must exist afterwards (relative to tmp)


CASES = [
    # 1. a checkpoint can never run code: every command and resume refuse the crafted pickle
    Case("pickle-probe", lambda t: ["probe", crafted(t)], needle=("evil.pth refused", "posix.system")),
    Case("pickle-restore", lambda t: ["restore", crafted(t), image(t), "--task", "inpaint", "-o", str(t / "o.png")],
         needle="evil.pth refused"),
    Case("pickle-export", lambda t: ["export", crafted(t), "-o", str(t / "e.safetensors")], needle="evil.pth refused"),
    Case("pickle-finetune", lambda t: ["finetune", crafted(t)], needle="evil.pth refused"),
    Case("pickle-resume", lambda t: ["pretrain", "--resume", crafted(t), "--output_dir", str(t / "o")],
         needle="evil.pth refused"),
    # 3. values that trained silently wrong or did odd things
    Case("clip-grad", ["pretrain", "--clip_grad", "-1"], needle="--clip_grad/--clip-grad: must be > 0, got -1.0"),
    Case("checkpoint-minutes", ["pretrain", "--checkpoint_minutes", "-1"], needle="--checkpoint_minutes"),
    Case("save-every", ["pretrain", "--save_every", "-1"], needle="--save_every/--save-every: must be >= 0, got -1"),
    Case("warmup", ["pretrain", "--warmup_epochs", "-1"], needle="--warmup_epochs"),
    Case("noise-sigma", ["pretrain", "--noise_sigma", "-1"], needle="--noise_sigma"),
    Case("langevin", ["pretrain", "--langevin_std", "-1"], needle="--langevin_std"),
    Case("tasks-twice", ["pretrain", "--tasks", "mim,mim"], needle="'mim' appears twice"),
    Case("grid-rows", ["pretrain", "--grid_rows", "-1"], needle="--grid_rows"),
    Case("blr-negative", ["pretrain", "--blr", "-1"], needle="--blr: must be > 0, got -1.0"),
    Case("blr-nan", ["pretrain", "--blr", "nan"], needle="--blr: must be a finite number, got nan"),
    # 4. restore sizes are bounded
    Case("zoom", lambda t: ["restore", ckpt(t), image(t), "--task", "inpaint", "-o", str(t / "o.png"),
                            "--zoom", "100000"], needle="--zoom"),
    Case("bomb", lambda t: ["restore", ckpt(t), huge_png(t), "--task", "inpaint", "-o", str(t / "o.png")],
         needle=("huge.png", "--max_image_pixels")),
    # 5. tracebacks that were
    Case("self-symlink", lambda t: ["pretrain", "--data_path", self_link_folder(t), "--epochs", "1", *PICO,
                                    "--batch_size", "8", "--output_dir", str(t / "o")], status=0,
         files=("o/checkpoint-last.pth",)),
    Case("all-corrupt", lambda t: ["pretrain", "--data_path", corrupt_folder(t), *PICO, "--output_dir", str(t / "o")],
         needle=("could not be decoded", "corrupt")),
    Case("tasks-nan", ["pretrain", "--tasks", "mim:nan"], needle="finite weights > 0"),
    Case("tasks-inf", ["pretrain", "--tasks", "mim:inf"], needle="finite weights > 0"),
    Case("threads-pretrain", ["pretrain", "--num_threads", "-3"], needle="--num_threads"),
    Case("threads-finetune", lambda t: ["finetune", ckpt(t), "--num_threads", "-3"], needle="--num_threads"),
    Case("threads-probe", lambda t: ["probe", ckpt(t), "--num_threads", "-3"], needle="--num_threads"),
    Case("mismatch-probe", lambda t: ["probe", mismatched(t)], needle=("mismatch.pth", "does not match")),
    Case("mismatch-resume", lambda t: ["pretrain", "--resume", mismatched(t), "--output_dir", str(t / "o")],
         needle=("mismatch.pth", "does not match")),
    Case("keys-probe", lambda t: ["probe", missing_keys(t)], needle=("partial.pth", "model_config")),
    Case("keys-resume", lambda t: ["pretrain", "--resume", missing_keys(t), "--output_dir", str(t / "o")],
         needle=("partial.pth", "model_config")),
    # 6. messages that misled
    Case("restore-folder", lambda t: ["restore", ckpt(t), str(t), "--task", "inpaint", "-o", str(t / "o.png")],
         needle="is a folder, not an image file"),
    Case("resume-non-dict", lambda t: ["pretrain", "--resume", saved(t, "int.pth", 5), "--output_dir", str(t / "o")],
         needle="holds a int, not the dict energyvit writes"),
    Case("output-no-extension", lambda t: ["restore", ckpt(t), image(t), "--task", "inpaint", "-o", str(t / "noext")],
         needle=("--output", "image file extension")),
    # more: values and files a new user may give
    Case("epochs-zero", ["pretrain", "--epochs", "0"], needle="--epochs: must be > 0, got 0"),
    Case("input-size", ["pretrain", "--input_size", "15"], needle="multiple of vit_nano_patch4's patch size 4"),
    Case("data-is-file", lambda t: ["pretrain", "--data_path", image(t), "--output_dir", str(t / "o")],
         needle="must be a folder, not a file"),
    Case("data-missing", lambda t: ["pretrain", "--data_path", str(t / "nowhere"), "--output_dir", str(t / "o")],
         needle="dataset path not found"),
    Case("batch-too-large", lambda t: ["pretrain", "--batch_size", "5000", "--output_dir", str(t / "o")],
         needle="training set has 1500"),
    Case("probe-unlabeled", lambda t: ["probe", ckpt(t), "--data_path", unlabeled_folder(t)], needle="no labels"),
    Case("finetune-unlabeled", lambda t: ["finetune", ckpt(t), "--data_path", unlabeled_folder(t)],
         needle="needs labels"),
    Case("knn-k", lambda t: ["probe", ckpt(t), "--knn_k", "0"], needle="--knn_k/--knn-k: must be a positive integer"),
    # probe --protocol mae and the flags that came with it
    Case("probe-protocol", lambda t: ["probe", ckpt(t), "--protocol", "sgd"],
         needle=("--protocol: invalid choice: 'sgd'", "lbfgs", "mae")),
    Case("probe-epochs", lambda t: ["probe", ckpt(t), "--protocol", "mae", "--epochs", "0"],
         needle="--epochs: must be > 0, got 0"),
    Case("probe-warmup", lambda t: ["probe", ckpt(t), "--protocol", "mae", "--warmup_epochs", "-1"],
         needle="--warmup_epochs/--warmup-epochs: must be >= 0, got -1"),
    Case("probe-batch", lambda t: ["probe", ckpt(t), "--batch_size", "0"], needle="--batch_size/--batch-size: must be > 0"),
    Case("probe-blr", lambda t: ["probe", ckpt(t), "--protocol", "mae", "--blr", "nan"],
         needle="--blr: must be a finite number, got nan"),
    Case("probe-lr", lambda t: ["probe", ckpt(t), "--protocol", "mae", "--lr", "0"], needle="--lr: must be > 0, got 0.0"),
    Case("probe-optimizer", lambda t: ["probe", ckpt(t), "--protocol", "mae", "--optimizer", "adam"],
         needle=("--optimizer: invalid choice: 'adam'", "lars", "sgd")),
    Case("probe-momentum", lambda t: ["probe", ckpt(t), "--protocol", "mae", "--momentum", "1"],
         needle="--momentum: must be in [0, 1), got 1.0"),
    Case("probe-weight-decay", lambda t: ["probe", ckpt(t), "--protocol", "mae", "--weight_decay", "-0.1"],
         needle="--weight_decay/--weight-decay: must be >= 0, got -0.1"),
    Case("probe-precision", lambda t: ["probe", ckpt(t), "--precision", "fp16"],
         needle="--precision: invalid choice: 'fp16'"),
    Case("probe-shift", lambda t: ["probe", ckpt(t), "--protocol", "mae", "--shift", "-1"],
         needle="--shift: must be >= 0, got -1"),
    Case("probe-device", lambda t: ["probe", ckpt(t), "--device", "tpu"], needle="--device: must be cpu, cuda or cuda:N"),
    Case("probe-mae-flag-with-lbfgs", lambda t: ["probe", ckpt(t), "--epochs", "5"],
         needle="--epochs: applies to --protocol mae only"),
    Case("probe-shift-with-lbfgs", lambda t: ["probe", ckpt(t), "--shift", "0"], needle="--shift: applies to --protocol mae only"),
    Case("probe-images-with-mae", lambda t: ["probe", ckpt(t), "--protocol", "mae", "--probe_images", "100"],
         needle="--probe_images: applies to --protocol lbfgs only"),
    Case("probe-mae-batch-too-large", lambda t: ["probe", ckpt(t), "--protocol", "mae", "--batch_size", "2000"],
         needle="training set has 1500"),
    Case("probe-mae-batch-one", lambda t: ["probe", ckpt(t), "--protocol", "mae", "--batch_size", "1"],
         needle="BatchNorm needs at least 2 images per step"),
    Case("probe-resume-with-lbfgs", lambda t: ["probe", ckpt(t), "--resume", str(t / "s.pth")],
         needle="--resume: applies to --protocol mae only"),
    Case("probe-resume-missing", lambda t: ["probe", ckpt(t), "--protocol", "mae", "--resume", str(t / "s.pth")],
         needle=("s.pth does not exist",)),
    Case("probe-resume-not-a-state", lambda t: ["probe", ckpt(t), "--protocol", "mae", "--resume", ckpt(t)],
         needle="ckpt.pth is not a probe state"),
    Case("probe-output-pth", lambda t: ["probe", ckpt(t), "--output", str(t / "r.pth")],
         needle=("--output", "r.pth: the results are JSON")),
    Case("export-suffix", lambda t: ["export", ckpt(t), "-o", str(t / "e.pt")], needle="must end in .safetensors"),
    Case("restore-steps", lambda t: ["restore", ckpt(t), image(t), "--task", "sr", "-o", str(t / "o.png"),
                                     "--steps", "0"], needle="--steps: must be a positive integer"),
    Case("mask-fill", ["pretrain", "--mask_fill", "3"], needle="--mask_fill/--mask-fill: must be 'noise', 'learned' or a pixel"),
    Case("restore-mask-fill", lambda t: ["restore", ckpt(t), image(t), "--task", "inpaint", "-o", str(t / "o.png"),
                                         "--mask_fill", "2"], needle="--mask_fill/--mask-fill: must be 'noise', 'learned' or a pixel"),
    Case("energy-head-dim", ["pretrain", "--energy_head_dim", "0"], needle="--energy_head_dim"),
    Case("energy-head-dim-4", ["pretrain", "--energy_head_dim", "30"], needle="a multiple of 4"),
    Case("linear-with-head", ["pretrain", "--energy", "linear"], needle="linear needs --energy_head_depth 0"),
    Case("compile-mae", ["pretrain", "--method", "mae", "--compile"], needle="--compile"),
    # fine-tuning: every flag of its own, one line each
    *[Case(f"finetune-{flag}", lambda t, flag=flag, value=value: ["finetune", ckpt(t), f"--{flag}", value],
           needle=needle) for flag, value, needle in [
        ("aa", "rand-m12", "--aa: must be 'none' or a RandAugment spec such as rand-m9-mstd0.5-inc1 (m (magnitude)"),
        ("aa", "augmix", "--aa: must be 'none' or a RandAugment spec"),
        ("reprob", "1.5", "--reprob: must be in [0, 1], got 1.5"),
        ("mixup", "-0.8", "--mixup: must be >= 0, got -0.8"),
        ("cutmix", "nan", "--cutmix: must be a finite number, got nan"),
        ("mixup_prob", "2", "--mixup_prob/--mixup-prob: must be in [0, 1], got 2.0"),
        ("mixup_switch_prob", "-1", "--mixup_switch_prob/--mixup-switch-prob: must be in [0, 1]"),
        ("smoothing", "1", "--smoothing: must be in [0, 1), got 1.0"),
        ("min_lr", "-0.5", "--min_lr/--min-lr: must be >= 0, got -0.5"),
        ("accum_iter", "0", "--accum_iter/--accum-iter: must be > 0, got 0"),
        ("precision", "fp16", "invalid choice: 'fp16'"),
        ("checkpoint_minutes", "-5", "--checkpoint_minutes/--checkpoint-minutes: must be >= 0"),
        ("epochs", "0", "--epochs: must be > 0, got 0"),
        ("batch_size", "5000", "training set has 1500"),
        ("clip_grad", "-1", "--clip_grad/--clip-grad: must be > 0, got -1.0"),
        ("lr", "0", "--lr: must be > 0, got 0.0"),
    ]],
    Case("finetune-aa-digits", lambda t: ["finetune", ckpt(t), "--aa", "rand-m9", "--output_dir", str(t / "o")],
         needle="--aa rand-m9: RandAugment is for image files"),
    Case("finetune-no-checkpoint", lambda t: ["finetune", "--output_dir", str(t / "o")],
         needle="the pretrained checkpoint is required"),
    Case("finetune-resume-pretrain", lambda t: ["finetune", ckpt(t), "--resume", resumable(t)],
         needle="not a checkpoint-last.pth of `energyvit finetune`"),
    Case("finetune-resume-missing", lambda t: ["finetune", ckpt(t), "--resume", str(t / "none.pth")],
         needle="none.pth does not exist"),
    Case("pickle-finetune-resume", lambda t: ["finetune", ckpt(t), "--resume", crafted(t)], needle="evil.pth refused"),
    Case("finetune-device", lambda t: ["finetune", ckpt(t), "--device", "tpu"], needle="--device: must be cpu, cuda or cuda:N"),
    Case("resume-other-method", lambda t: ["pretrain", "--method", "mae", "--resume", resumable(t), "--output_dir",
                                           str(t / "o")], needle="was pretrained with --method energy, not mae"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_clear_line(case, tmp_path, capsys, one_thread):
    argv = case.argv(tmp_path) if callable(case.argv) else case.argv + ["--output_dir", str(tmp_path / "o")]
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status == case.status, err
    assert not (tmp_path / MARKER).exists(), "a checkpoint ran code"
    for f in case.files:
        assert (tmp_path / f).exists(), f
    if case.status == 0:
        return
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in (case.needle,) if isinstance(case.needle, str) else case.needle:
        assert needle in err, err


def test_the_python_api_refuses_a_crafted_checkpoint_too(tmp_path):
    from energyvit.checkpoint import load_checkpoint, load_model

    for load in (load_checkpoint, load_model):
        with pytest.raises(ValueError, match="refused"):
            load(crafted(tmp_path))
    assert not (tmp_path / MARKER).exists()
    with pytest.raises(pickle.UnpicklingError):  # the control: unrestricted unpickling runs the code
        torch.load(crafted(tmp_path), weights_only=True)
    torch.load(crafted(tmp_path), weights_only=False)
    assert (tmp_path / MARKER).exists()


def test_a_failure_after_the_epoch_keeps_its_checkpoint(tmp_path, capsys, one_thread):
    """The pictures cannot be written (pictures/ is a file): a warning, and the epoch is saved."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "pictures").write_text("in the way")
    assert main(["pretrain", *PICO, "--epochs", "1", "--output_dir", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: epoch 1's log or pictures could not be written" in err and "checkpoint was" in err
    state = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert state["epoch"] == 0 and state["step_in_epoch"] == state["steps_per_epoch"]


def test_training_that_goes_wrong_with_finite_numbers_warns(tmp_path, capsys, one_thread):
    """A far too high lr collapses the step sizes: warned on the console and in log.jsonl."""
    out = tmp_path / "o"
    assert main(["pretrain", *PICO, "--epochs", "3", "--blr", "30", "--grid_rows", "0", "--output_dir", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: epoch" in err and "step sizes collapsed towards 0" in err, err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("step sizes collapsed" in w for r in log for w in r.get("warnings", []))


def test_the_loss_rising_for_epochs_warns():
    trend = LossTrend(epochs=3, factor=1.2)
    assert [trend.check(x) for x in (1.0, 0.5, 0.52, 0.54)] == [[], [], [], []]  # rising, but near the best
    assert trend.check(0.9) and "rose for 3 epochs in a row, to 1.1 (best 0.5)" in trend.check(1.1)[0]


def test_an_interrupt_during_setup_names_no_checkpoint(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(pretrain, "load_splits", interrupted)
    assert main(["pretrain", "--output_dir", str(tmp_path)]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "energyvit: interrupted" and not list(tmp_path.iterdir())


def test_flags_that_would_change_a_resumed_run_are_refused(tmp_path, capsys, one_thread):
    out = tmp_path / "o"
    assert main(["pretrain", *PICO, "--epochs", "1", "--grid_rows", "0", "--output_dir", str(out)]) == 0
    capsys.readouterr()
    assert main(["pretrain", "--model", "vit_micro_patch4", "--restore_steps", "3", "--epochs", "2", "--num_threads",
                 "1", "--output_dir", str(out), "--resume", str(out / "checkpoint-last.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--model vit_micro_patch4 (the checkpoint's: vit_pico_patch2), --restore_steps 3 (the checkpoint's: 1)" in err
    assert "a resumed run keeps the options of" in err and "--epochs" in err  # says which may change


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "c.pth", {"epoch": 1})
        save_json(tmp_path / "s.json", {})
    finally:
        os.umask(old)
    assert {(tmp_path / n).stat().st_mode & 0o777 for n in ("c.pth", "s.json")} == {0o640}


def test_the_restoration_table_keeps_its_columns_apart(capsys):
    pretrain.print_summary({"tasks": {"mim": {"mse_corrupted": 123456789.0, "mse_restored": 0.5}},
                            "probe_acc": None, "probe_note": "the data has no labels"})
    row = capsys.readouterr().out.splitlines()[3].split()
    assert row == ["mim", "123456789.00000", "0.50000"]


def test_a_huge_image_in_the_data_is_skipped_with_a_line_saying_how_to_allow_it(tmp_path, caplog, one_thread):
    folder = Path(self_link_folder(tmp_path))
    (folder / "a" / "loop.png").unlink()
    os.replace(huge_png(tmp_path), folder / "a" / "huge.png")
    assert main(["pretrain", "--data_path", str(folder), "--epochs", "1", *PICO, "--batch_size", "8",
                 "--output_dir", str(tmp_path / "o")]) == 0
    warned = caplog.text  # the warning goes to the `logging` module (stderr on the command line)
    assert "skipping image" in warned and "huge.png" in warned and "--max_image_pixels raises it" in warned, warned
    assert (tmp_path / "o" / "checkpoint-last.pth").exists()
