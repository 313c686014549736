import json
import subprocess
import sys

import pytest
import torch

from energyvit.cli import main

TINY = ["pretrain", "--model", "vit_pico_patch2", "--batch_size", "250", "--warmup_epochs", "1",
        "--tasks", "mim:0.5,sort:0.25,denoise:0.25", "--restore_steps", "2", "--probe_images", "200"]


@pytest.mark.parametrize("argv,needle", [
    (["pretrain", "--bogus"], "unrecognized arguments: --bogus"),
    (["pretrain", "--mask_ratio", "2"], "--mask_ratio/--mask-ratio: must be in (0, 1), got 2.0"),
    (["pretrain", "--model", "vit_huge"], "invalid choice: 'vit_huge'"),
    (["pretrain", "--tasks", "mim,warp"], "unknown task 'warp'"),
    (["pretrain", "--tasks", "colorize"], "without colorize for 1-channel data (it needs RGB)"),
    (["pretrain", "--resume", "/nonexistent/ckpt.pth"], "checkpoint /nonexistent/ckpt.pth does not exist"),
    (["pretrain", "--batch_size", "0"], "--batch_size/--batch-size: must be > 0, got 0"),
    (["pretrain", "--device", "gpu7"], "--device: must be cpu, cuda or cuda:N, got gpu7"),
])
def test_bad_flags_and_values_give_one_clear_line(argv, needle, capsys, tmp_path):
    assert main(argv + ["--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_pretrain_writes_checkpoint_log_and_summary_and_resumes_exactly(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(TINY + ["--epochs", "2", "--output_dir", str(full)]) == 0
    summary = json.loads((full / "summary.json").read_text())
    for key in ("probe_acc", "probe_acc_random_init", "probe_acc_raw_pixels"):
        assert 0.0 <= summary[key] <= 1.0
    assert set(summary["tasks"]) == {"mim", "sort", "denoise"}
    assert len({r["energy_clean"] for r in summary["tasks"].values()}) == 1  # same clean images for every task
    for r in summary["tasks"].values():
        assert r["mse_corrupted"] > 0 and r["mse_restored"] >= 0
    log = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and all(len(r["step_sizes"]) == 2 for r in log)

    # stop after epoch 1 of 2 (hyphenated aliases), then resume: the same weights as the uninterrupted run
    assert main(TINY + ["--epochs", "1", "--output-dir", str(part)]) == 0
    # the resumed run names no --model: the architecture comes from the checkpoint
    resume_argv = [a for a in TINY if a not in ("--model", "vit_pico_patch2")]
    assert main(resume_argv + ["--epochs", "2", "--output_dir", str(part), "--resume", str(part / "checkpoint-last.pth")]) == 0
    a = torch.load(full / "checkpoint-last.pth", weights_only=True)["model"]
    b = torch.load(part / "checkpoint-last.pth", weights_only=True)["model"]
    assert json.loads((part / "summary.json").read_text())["model"] == "vit_pico_patch2"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_console_entry_point_prints_help():
    out = subprocess.run([sys.executable, "-m", "energyvit.cli", "pretrain", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--batch_size" in out.stdout and "--batch-size" in out.stdout
