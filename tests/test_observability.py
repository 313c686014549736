"""Observability of `energyvit pretrain`: progress lines, the metrics log (JSON lines and
TensorBoard) and the restoration grids."""
import io
import json
import math
import sys

import pytest
import torch
from PIL import Image

from energyvit.metrics import LOG_NAME, MetricsLogger, scalar_leaves
from energyvit.progress import Progress, format_duration
from energyvit.restore import restore
from energyvit.visualize import BORDER_VALUE, restoration_grid, save_png, save_restoration_grid
from helpers import images, tiny_model


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


# ---------------------------------------------------------------- progress


def test_format_duration():
    assert format_duration(0) == "0:00:00"
    assert format_duration(3661) == "1:01:01"
    assert format_duration(27 * 3600 + 3 * 60 + 4) == "27:03:04"
    assert format_duration(59.6) == "0:01:00"
    assert format_duration(-5) == "0:00:00"


def _run(progress: Progress, clock: FakeClock, steps: range, first_t: float, dt: float, images_per_step: int) -> None:
    """Update `progress` at each of `steps`: the first at `first_t`, then every `dt` seconds."""
    for n, step in enumerate(steps):
        clock.t = first_t + n * dt
        progress.update(step, images_per_step, loss=0.1234)


def test_plain_lines_at_the_interval_and_at_the_last_step():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(400, stream=out, interval_s=30.0, desc="pretrain", clock=clock)
    assert not progress.is_tty  # StringIO is no terminal
    # first step at 5 s (compilation), then 4 steps/s of 16 images: 64 images/s
    _run(progress, clock, range(1, 401), first_t=5.0, dt=0.25, images_per_step=16)
    progress.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # a line once 30 s have passed since the last one (t = 30, 60, 90 at steps 101, 221, 341), and the last step
    assert [line.split()[2] for line in lines] == ["101/400", "221/400", "341/400", "400/400"]
    assert lines[0] == "pretrain  step 101/400   25%  64.0 images/s  ETA 0:01:15  elapsed 0:00:30  loss 0.1234"
    assert all("64.0 images/s" in line for line in lines)
    assert "ETA 0:00:00" in lines[-1] and "100%" in lines[-1]


def test_close_shows_a_run_stopped_early_once():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(1000, stream=out, interval_s=30.0, clock=clock)
    _run(progress, clock, range(1, 11), first_t=1.0, dt=1.0, images_per_step=8)
    assert out.getvalue() == ""  # 10 s: no line yet
    progress.close()
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("step 10/1000") and "8.0 images/s" in lines[0]


def test_tty_redraws_one_line_at_most_ten_times_a_second():
    clock, out = FakeClock(), TtyStream()
    progress = Progress(200, stream=out, desc="pretrain", clock=clock)
    assert progress.is_tty
    # 100 steps per second for 2 s
    _run(progress, clock, range(1, 201), first_t=0.01, dt=0.01, images_per_step=4)
    text = out.getvalue()
    assert "\n" not in text
    assert 18 <= text.count("\r") <= 22  # ~10 redraws/s (fake-clock rounding: +-1 per second)
    last = text.split("\r")[-1]
    assert last.startswith("pretrain  200/200  [####################]  100%  400.0 images/s  ETA 0:00:00  loss 0.1234")
    progress.close()
    assert out.getvalue() == text + "\n"  # the last step was drawn: close only ends the line


def test_tty_blanks_the_tail_of_a_longer_previous_line():
    clock, out = FakeClock(), TtyStream()
    progress = Progress(10, stream=out, clock=clock)
    progress.update(1, 1, loss=123456.0, lr=0.5)
    clock.t = 1.0
    progress.update(2, 1)
    first, second = out.getvalue().split("\r")[1:]
    assert len(second) == len(first) and second.endswith(" ")


def test_eta_for_a_constant_rate_and_the_first_step_excluded():
    clock = FakeClock()
    progress = Progress(3000, first_step=1000, stream=io.StringIO(), clock=clock)
    clock.t = 100.0  # a slow first step (compilation) starts the clock but is not timed
    progress.update(1001, 32)
    assert progress.images_per_s() is None and progress.eta_s() is None
    assert "? images/s" in progress.line() and "ETA ?" in progress.line()
    # then 2 steps (64 images) per update, one update every 0.5 s: 4 steps/s, 128 images/s
    for n in range(1, 51):
        clock.t = 100.0 + 0.5 * n
        progress.update(1001 + 2 * n, 64)
    assert progress.images_per_s() == pytest.approx(128.0)
    assert progress.eta_s() == pytest.approx((3000 - 1101) / 4.0)


def test_rate_follows_a_change_of_speed():
    clock = FakeClock()
    progress = Progress(10_000, stream=io.StringIO(), clock=clock)
    _run(progress, clock, range(1, 101), first_t=0.0, dt=1.0, images_per_step=10)  # 10 images/s
    assert progress.images_per_s() == pytest.approx(10.0)
    _run(progress, clock, range(101, 501), first_t=100.25, dt=0.25, images_per_step=10)  # 40 images/s for 100 s
    assert progress.images_per_s() == pytest.approx(40.0, rel=1e-3)
    assert progress.eta_s() == pytest.approx((10_000 - 500) / 4.0, rel=1e-3)


def test_bad_step_range_raises():
    with pytest.raises(ValueError):
        Progress(0)
    with pytest.raises(ValueError):
        Progress(10, first_step=11)


# ---------------------------------------------------------------- metrics


RECORD = {"epoch": 1, "step": 100, "loss": 0.5, "tasks": {"mim": {"psnr": 20.1}}, "step_sizes": [0.25, 0.125], "name": "run"}


def test_jsonl_records_parse_back_and_nonfinite_floats_become_null(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(RECORD, step=100)
        log.log({"step": 200, "loss": math.nan, "tasks": {"mim": {"psnr": math.inf}}}, step=200)
    lines = (tmp_path / LOG_NAME).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [RECORD, {"step": 200, "loss": None, "tasks": {"mim": {"psnr": None}}}]


def test_jsonl_is_flushed_per_record_and_appended_on_reopen(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log({"step": 1}, step=1)
    assert (tmp_path / LOG_NAME).read_text() == '{"step": 1}\n'  # readable before close
    log.close()
    with MetricsLogger(tmp_path, tensorboard=False) as log:  # a resumed run
        log.log({"step": 2}, step=2)
    assert (tmp_path / LOG_NAME).read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_partial_last_line_does_not_swallow_the_next_record(tmp_path):
    (tmp_path / LOG_NAME).write_text('{"step": 1}\n{"st')  # a crash mid-write
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log({"step": 2}, step=2)
    assert (tmp_path / LOG_NAME).read_text().splitlines()[-1] == '{"step": 2}'


def test_scalar_leaves_join_paths_and_skip_non_numbers():
    leaves = dict(scalar_leaves({**RECORD, "ok": True, "none": None}))
    assert leaves == {
        "epoch": 1.0, "step": 100.0, "loss": 0.5, "tasks/mim/psnr": 20.1, "step_sizes/0": 0.25, "step_sizes/1": 0.125
    }


def test_tensorboard_scalars_and_image_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as log:
        assert log.tensorboard_active and log.tensorboard_note is None
        log.log(RECORD, step=100)
        log.log({**RECORD, "tasks": {"mim": {"psnr": 22.5}}}, step=200)
        log.add_image("grid/mim", torch.full((6, 10, 1), 200, dtype=torch.uint8), step=200)
        png = tmp_path / "grid.png"
        save_png(torch.zeros(4, 4, 3, dtype=torch.uint8), png)
        log.add_image("grid/png", png, step=200)
    assert list(tmp_path.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    psnr = events.Scalars("tasks/mim/psnr")
    assert [e.step for e in psnr] == [100, 200]
    assert [e.value for e in psnr] == pytest.approx([20.1, 22.5])
    assert [e.value for e in events.Scalars("step_sizes/1")] == pytest.approx([0.125, 0.125])
    assert "name" not in events.Tags()["scalars"]
    shown = events.Images("grid/mim")[0]
    assert (shown.step, shown.width, shown.height) == (200, 10, 6)
    assert events.Images("grid/png")[0].width == 4


def test_without_tensorboard_a_note_and_the_log_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import now fails
    with MetricsLogger(tmp_path) as log:
        assert not log.tensorboard_active
        assert "pip install tensorboard" in log.tensorboard_note
        log.log(RECORD, step=100)
        log.add_image("grid", torch.zeros(4, 4, 1, dtype=torch.uint8), step=100)  # a no-op
    assert json.loads((tmp_path / LOG_NAME).read_text()) == RECORD
    assert not list(tmp_path.glob("events.out.tfevents.*"))


def test_tensorboard_off_by_request_leaves_no_note(tmp_path):
    with MetricsLogger(tmp_path / "run", tensorboard=False) as log:
        assert not log.tensorboard_active and log.tensorboard_note is None
    assert [p.name for p in (tmp_path / "run").iterdir()] == [LOG_NAME]


# ---------------------------------------------------------------- restoration grids


def _trajectory(batch: int, chans: int, h: int, w: int, K: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Corrupted all 0, step k all k / (K + 1), clean all 1."""
    corrupted = torch.zeros(batch, chans, h, w)
    steps = [corrupted] + [torch.full_like(corrupted, k / (K + 1)) for k in range(1, K + 1)]
    return corrupted, steps, torch.ones_like(corrupted)


def _cell(grid: torch.Tensor, row: int, col: int, ch: int, cw: int, pad: int) -> torch.Tensor:
    top, left = pad + row * (ch + pad), pad + col * (cw + pad)
    return grid[top : top + ch, left : left + cw]


def test_grid_shape_columns_and_upscaled_cells():
    corrupted, steps, clean = _trajectory(batch=5, chans=1, h=16, w=16, K=3)
    grid = restoration_grid(corrupted, steps, clean, max_rows=3, pad=2)
    # 3 rows, K + 2 = 5 columns of 16 * 4 = 64 px cells, 2 px borders around and between
    assert grid.dtype == torch.uint8 and grid.shape == (3 * 64 + 4 * 2, 5 * 64 + 6 * 2, 1)
    expected = [0, 64, 128, 191, 255]  # corrupted | x_1 = 0.25 | x_2 = 0.5 | restored x_3 = 0.75 | clean
    for row in range(3):
        for col, value in enumerate(expected):
            assert (_cell(grid, row, col, 64, 64, 2) == value).all()
    assert (grid[:2] == BORDER_VALUE).all() and (grid[:, 66:68] == BORDER_VALUE).all()


def test_grid_places_pixels_row_major_and_scales_non_square_images():
    corrupted, steps, clean = _trajectory(batch=2, chans=3, h=8, w=12, K=1)
    clean = torch.zeros_like(clean)
    clean[1, 0, 1, 2] = 1.0  # one red pixel at y = 1, x = 2 of the second image
    grid = restoration_grid(corrupted, steps, clean, pad=1)
    scale = 8  # ceil(64 / 8), from the shorter side
    assert grid.shape == (2 * 64 + 3, 3 * 96 + 4, 3)
    cell = _cell(grid, 1, 2, 64, 96, 1)
    red = torch.zeros(64, 96, dtype=torch.bool)
    red[1 * scale : 2 * scale, 2 * scale : 3 * scale] = True
    assert (cell[red] == torch.tensor([255, 0, 0], dtype=torch.uint8)).all()
    assert (cell[~red] == 0).all()


def test_grid_keeps_large_images_unscaled_and_clamps():
    corrupted, steps, clean = _trajectory(batch=1, chans=1, h=70, w=70, K=2)
    steps[1] = torch.full_like(corrupted, -3.0)
    steps[2] = torch.full_like(corrupted, math.nan)
    clean = torch.full_like(clean, 7.0)
    grid = restoration_grid(corrupted, steps, clean, pad=0)
    assert grid.shape == (70, 4 * 70, 1)
    assert grid[:, 70:210].max() == 0 and (grid[:, 210:] == 255).all()


def test_grid_rejects_bad_inputs():
    corrupted, steps, clean = _trajectory(batch=2, chans=1, h=8, w=8, K=2)
    with pytest.raises(ValueError, match="steps"):
        restoration_grid(corrupted, steps[:1], clean)
    with pytest.raises(ValueError, match="shape"):
        restoration_grid(corrupted, steps, clean[:, :, :4])
    with pytest.raises(ValueError, match="1 or 3"):
        restoration_grid(*_trajectory(batch=2, chans=2, h=8, w=8, K=1))


@pytest.mark.parametrize("chans, mode", [(1, "L"), (3, "RGB")])
def test_saved_png_mode_and_pixels(tmp_path, chans, mode):
    corrupted, steps, clean = _trajectory(batch=2, chans=chans, h=16, w=16, K=2)
    path = tmp_path / "grid.png"
    grid = save_restoration_grid(path, corrupted, steps, clean)
    assert torch.equal(grid, restoration_grid(corrupted, steps, clean))
    with Image.open(path) as image:
        assert image.mode == mode and image.size == (grid.shape[1], grid.shape[0])
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(grid.shape)
    assert torch.equal(pixels, grid)


def test_save_png_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "grid.png"
    save_png(torch.zeros(4, 4, 1, dtype=torch.uint8), path)
    save_png(torch.full((4, 4, 1), 9, dtype=torch.uint8), path)  # overwrites
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]

    def broken_save(self, f, *args, **kwargs):
        f.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_png(torch.ones(4, 4, 3, dtype=torch.uint8), path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left behind
    with Image.open(path) as image:
        assert image.mode == "L" and image.getpixel((0, 0)) == 9  # the previous image, intact


def test_grid_of_a_real_restoration(tmp_path, one_thread):
    model = tiny_model(dtype=torch.float32)
    clean = images(batch=3, dtype=torch.float32)
    corrupted = clean * 0.5
    result = restore(model, corrupted)
    grid = save_restoration_grid(tmp_path / "r.png", corrupted, result.steps, clean, max_rows=2)
    K = model.cfg.restore_steps
    assert grid.shape == (2 * 64 + 3 * 2, (K + 2) * 64 + (K + 3) * 2, 1)


# ---------------------------------------------------------------- Weights & Biases
class FakeWandb:
    """What pretrain asks of the wandb package, recorded: init, log (scalars and images), finish."""

    def __init__(self) -> None:
        self.inits, self.logs, self.finished = [], [], 0
        self.util = type("util", (), {"generate_id": staticmethod(lambda: f"id{len(self.inits)}")})

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, values: dict, step: int) -> None:
        self.logs.append((step, values))

    def finish(self) -> None:
        self.finished += 1

    @staticmethod
    def Image(array):  # noqa: N802 (wandb's name)
        return ("image", array.shape)


WANDB_RUN = ["pretrain", "--model", "vit_pico_patch2", "--batch_size", "250", "--num_threads", "1", "--no-tensorboard",
             "--grid_rows", "2", "--probe_images", "100", "--wandb", "--wandb_project", "proj"]


def test_wandb_gets_the_scalars_and_pictures_and_a_resumed_run_continues_its_run(tmp_path, monkeypatch, one_thread):
    from energyvit.cli import main

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    assert main(WANDB_RUN + ["--epochs", "1", "--output_dir", str(out)]) == 0
    init = fake.inits[0]
    assert init["project"] == "proj" and init["id"] == "id0" and init["resume"] == "allow"
    assert init["config"]["model"] == "vit_pico_patch2" and init["config"]["wandb"] is True
    scalars = [v for _, v in fake.logs if "loss" in v]
    assert [s for s, v in fake.logs if "loss" in v] == [6] and math.isfinite(scalars[0]["tasks/mim/psnr_restored"])
    assert any(v.get("restoration/mim", (None,))[0] == "image" for _, v in fake.logs) and fake.finished == 1
    assert (out / "wandb-run-id").read_text() == "id0\n"
    assert main(WANDB_RUN + ["--epochs", "2", "--output_dir", str(out), "--resume", "auto"]) == 0
    assert fake.inits[1]["id"] == "id0" and [s for s, v in fake.logs if "loss" in v] == [6, 12]


def test_wandb_without_the_package_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    from energyvit.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    assert main(WANDB_RUN + ["--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "energyvit: error: --wandb: the wandb package is not installed (pip install wandb), or drop the flag"
    assert not (tmp_path / "run" / "checkpoint-last.pth").exists()
