import math

import pytest
import torch
from PIL import Image

from energyvit.cli import main
from energyvit.export import export
from energyvit.commands.restore import image_psnr as psnr, load_image
from helpers import tiny_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny 1-channel and a tiny RGB checkpoint (8 px models), a 20x12 image, masks."""
    tmp = tmp_path_factory.mktemp("restore")
    tiny_checkpoint(tmp / "gray.pth")
    tiny_checkpoint(tmp / "rgb.pth", in_chans=3)
    export(tmp / "gray.pth", tmp / "encoder.safetensors")
    gen = torch.Generator().manual_seed(0)
    pixels = (torch.rand(12, 20, 3, generator=gen) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels, "RGB").save(tmp / "photo.png")
    mask = Image.new("L", (20, 12))
    mask.paste(255, (10, 0, 16, 6))  # after the center crop (columns 4..16) and resize: the top-right quarter
    mask.save(tmp / "mask.png")
    Image.new("L", (5, 5), 255).save(tmp / "mask_5x5.png")
    Image.new("L", (20, 12)).save(tmp / "mask_empty.png")
    (tmp / "not_an_image.png").write_text("hello")
    return tmp


def run_restore(files, *args: str) -> int:
    return main(["restore", *(a.format(tmp=files) for a in args)])


@pytest.mark.parametrize("task", ["inpaint", "denoise", "sr"])
def test_restore_writes_image_and_strip_and_prints_psnr(task, files, capsys):
    out = files / f"out-{task}.png"
    assert run_restore(files, "{tmp}/gray.pth", "{tmp}/photo.png", "--task", task, "--output", str(out)) == 0
    printed = capsys.readouterr().out
    assert "PSNR vs the input (synthetic corruption): corrupted" in printed
    restored = Image.open(out)
    assert restored.mode == "L" and restored.size == (8, 8)
    strip = Image.open(files / f"out-{task}-strip.png")
    # corrupted, x_1, restored (K = 2), reference: 4 frames of 8 px zoomed 16x, 3 gaps of 8 px
    assert strip.size == (4 * 128 + 3 * 8, 128)


def test_mask_file_fills_only_white_pixels(files, capsys):
    out = files / "masked.png"
    assert run_restore(files, "{tmp}/gray.pth", "{tmp}/photo.png", "--task", "inpaint", "--mask", "{tmp}/mask.png",
                       "--steps", "1", "--output", str(out)) == 0
    assert "1 steps" in capsys.readouterr().out
    clean = load_image(files / "photo.png", 8, 1)[0][0, 0]
    restored = load_image(out, 8, 1)[0][0, 0]
    masked = torch.zeros(8, 8, dtype=torch.bool)
    masked[:4, 4:] = True
    assert torch.equal(restored[~masked], clean[~masked])  # outside the mask: the input, untouched
    assert not torch.equal(restored[masked], clean[masked])


def test_clean_reference_and_already_corrupted_input(files, capsys):
    assert run_restore(files, "{tmp}/gray.pth", "{tmp}/photo.png", "--task", "denoise", "--corrupted",
                       "--clean", "{tmp}/photo.png", "--output", "{tmp}/c.png") == 0
    assert "PSNR vs --clean: corrupted inf dB" in capsys.readouterr().out  # the input is the clean image
    assert run_restore(files, "{tmp}/gray.pth", "{tmp}/photo.png", "--task", "sr", "--corrupted",
                       "--output", "{tmp}/c.png") == 0
    printed = capsys.readouterr().out
    assert "PSNR" not in printed and "(corrupted | steps | restored)" in printed


def test_inpainting_fill_defaults_to_the_checkpoints(files, tmp_path, monkeypatch):
    """The hidden patches get the fill the energy was trained on (recorded in the checkpoint's
    flags, kept by `export --full`); files that do not say were trained on noise."""
    import energyvit.commands.restore as restore_cmd
    from energyvit.checkpoint import load_checkpoint, save_checkpoint

    seen = []
    real = restore_cmd.corrupt_image
    monkeypatch.setattr(restore_cmd, "corrupt_image", lambda *a: seen.append(a[3].mask_fill) or real(*a))
    state = load_checkpoint(files / "gray.pth")
    save_checkpoint(tmp_path / "gray_gray.pth", {**state, "args": {"mask_fill": 0.5}})
    export(tmp_path / "gray_gray.pth", tmp_path / "full.safetensors", full=True)
    for ckpt, extra in (("{tmp}/gray.pth", []), (str(tmp_path / "gray_gray.pth"), []),
                        (str(tmp_path / "full.safetensors"), []), (str(tmp_path / "full.safetensors"),
                                                                   ["--mask_fill", "noise"])):
        assert run_restore(files, ckpt, "{tmp}/photo.png", "--task", "inpaint", "-o", str(tmp_path / "o.png"),
                           *extra) == 0
    assert seen == ["noise", 0.5, 0.5, "noise"]


def test_a_task_the_checkpoint_was_not_trained_on_gets_a_warning(files, tmp_path, capsys):
    from energyvit.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path / "mim.pth", {**load_checkpoint(files / "gray.pth"), "args": {"tasks": "mim"}})
    export(tmp_path / "mim.pth", tmp_path / "full.safetensors", full=True)
    for ckpt in (tmp_path / "mim.pth", tmp_path / "full.safetensors"):
        for task, warned in (("inpaint", False), ("denoise", True)):
            assert run_restore(files, str(ckpt), "{tmp}/photo.png", "--task", task, "-o", str(tmp_path / "o.png")) == 0
            err = capsys.readouterr().err
            assert ("was trained on mim only, not denoise: expect a poor restoration" in err) == warned


def test_colorize_on_an_rgb_model(files):
    assert run_restore(files, "{tmp}/rgb.pth", "{tmp}/photo.png", "--task", "colorize", "--output", "{tmp}/rgb.png") == 0
    assert Image.open(files / "rgb.png").mode == "RGB"


def test_psnr():
    a = torch.zeros(1, 1, 4, 4)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 0.1) == pytest.approx(20.0)


@pytest.mark.parametrize("args,needle", [
    (["{tmp}/gray.pth", "{tmp}/photo.png", "--task", "colorize"], "colorize needs a 3-channel (RGB) model"),
    (["{tmp}/gray.pth", "{tmp}/photo.png", "--task", "inpaint", "--mask", "{tmp}/mask_5x5.png"],
     "is 5x5, but the image is 20x12 and the model takes 8x8"),
    (["{tmp}/gray.pth", "{tmp}/photo.png", "--task", "inpaint", "--mask", "{tmp}/mask_empty.png"],
     "has no white (masked) pixels"),
    (["{tmp}/gray.pth", "{tmp}/photo.png", "--task", "denoise", "--mask", "{tmp}/mask.png"], "--mask is for --task inpaint"),
    (["{tmp}/gray.pth", "{tmp}/photo.png", "--task", "inpaint", "--corrupted"], "needs --mask"),
    (["{tmp}/gray.pth", "{tmp}/missing.png", "--task", "sr"], "image {tmp}/missing.png does not exist"),
    (["{tmp}/gray.pth", "{tmp}/not_an_image.png", "--task", "sr"], "could not be read as an image"),
    (["{tmp}/gray.pth", "{tmp}/photo.png", "--task", "sr", "--clean", "{tmp}/missing.png"],
     "clean reference {tmp}/missing.png does not exist"),
    (["{tmp}/missing.pth", "{tmp}/photo.png", "--task", "sr"], "checkpoint {tmp}/missing.pth does not exist"),
    (["{tmp}/encoder.safetensors", "{tmp}/photo.png", "--task", "sr"], "is an encoder-only export"),
    (["{tmp}/gray.pth", "{tmp}/photo.png", "--task", "sr", "--steps", "3"], "steps must be in 1..2"),
    (["{tmp}/gray.pth", "{tmp}/photo.png", "--task", "warp"], "invalid choice: 'warp'"),
])
def test_restore_errors_are_one_line(args, needle, files, capsys):
    assert run_restore(files, *args, "--output", "{tmp}/x.png") == 2
    err = capsys.readouterr().err.strip()
    assert needle.format(tmp=files) in err and len(err.splitlines()) == 1, err
