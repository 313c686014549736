"""Training metrics: a JSON-lines log, TensorBoard scalars when tensorboard is installed, and
Weights & Biases when asked (`--wandb`) and wandb is installed.

`log.jsonl` in the output folder gets one JSON object per `MetricsLogger.log` call, flushed at
once, so a crash loses nothing already logged; the file is opened for appending, so a resumed run
continues it. Records are written as given (nested dicts and lists included, no step added),
except that non-finite floats (NaN, +-inf) become null: Python's NaN/Infinity tokens are not JSON
and break other readers (jq, JavaScript). TensorBoard gets the true values.

With TensorBoard on, every numeric leaf of a record is a scalar tagged by its '/'-joined path at
the given global step: {"tasks": {"mim": {"psnr": 20.1}}, "step_sizes": [0.1, 0.2]} gives
"tasks/mim/psnr", "step_sizes/0" and "step_sizes/1". Event files go to the output folder itself,
so `tensorboard --logdir <output_dir>` shows the run.

With Weights & Biases on, the same scalars (and the restoration pictures) go to one W&B run per
output folder: its id is kept in `wandb-run-id` there, so a resumed or requeued run continues
the same W&B run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

LOG_NAME = "log.jsonl"
WANDB_ID_NAME = "wandb-run-id"


def require_wandb() -> None:
    """Raise ImportError (one line) when --wandb was asked for and wandb is not installed: said
    before training starts, not after its first epoch."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ImportError("--wandb: the wandb package is not installed (pip install wandb), or drop the flag") from None


def _json_safe(value: Any) -> Any:
    """`value` with non-finite floats replaced by None, containers rebuilt as dicts and lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def scalar_leaves(record: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """('/'-joined path, number) for every int or float leaf; bools, strings and None are skipped."""
    if isinstance(record, dict):
        for k, v in record.items():
            yield from scalar_leaves(v, f"{prefix}{k}/")
    elif isinstance(record, (list, tuple)):
        for i, v in enumerate(record):
            yield from scalar_leaves(v, f"{prefix}{i}/")
    elif isinstance(record, (int, float)) and not isinstance(record, bool):
        yield prefix.rstrip("/"), float(record)


def _ends_mid_line(path: Path) -> bool:
    """Whether `path` exists, is not empty and does not end with a newline."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) != b"\n"


class MetricsLogger:
    """Writes `log.jsonl` in `output_dir` and, if `tensorboard` and importable, TensorBoard events.

    `tensorboard_note` is None unless TensorBoard was asked for but could not be imported; it is
    then a one-line message for the caller to print, and logging goes on without TensorBoard.
    purge_step: a resumed run's first step; TensorBoard hides events at or after it that an
    interrupted run wrote past its last checkpoint.
    """

    def __init__(self, output_dir: Path, tensorboard: bool = True, purge_step: int | None = None,
                 wandb: dict | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / LOG_NAME
        # a crash mid-line (before a flush) can leave a partial last line; start ours on a new one
        needs_newline = _ends_mid_line(self.path)
        self._file = self.path.open("a", encoding="utf-8")
        if needs_newline:
            self._file.write("\n")
        self.tensorboard_note: str | None = None
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as e:  # ImportError without the package; a protobuf clash raises TypeError
                self.tensorboard_note = f"TensorBoard logging off ({type(e).__name__}: {e}); `pip install tensorboard` turns it on"
            else:
                self._writer = SummaryWriter(log_dir=str(self.output_dir), purge_step=purge_step)
        self._wandb = self._start_wandb(wandb) if wandb is not None else None

    def _start_wandb(self, settings: dict):
        """A W&B run (settings: wandb.init's project and config), resumed if this folder had one."""
        import wandb

        id_file = self.output_dir / WANDB_ID_NAME
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        run = wandb.init(id=run_id, resume="allow", dir=str(self.output_dir), name=self.output_dir.name, **settings)
        id_file.write_text(run_id + "\n")
        return run

    @property
    def tensorboard_active(self) -> bool:
        return self._writer is not None

    def log(self, record: dict, step: int) -> None:
        """Append `record` as one JSON line (flushed) and its numeric leaves as scalars at `step`."""
        self._file.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for tag, value in scalar_leaves(record):
                self._writer.add_scalar(tag, value, step)
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(dict(scalar_leaves(record)), step=step)

    def add_image(self, tag: str, image: str | Path | torch.Tensor | np.ndarray, step: int) -> None:
        """Log an image to TensorBoard and W&B (no-op without them): a PNG path, or uint8 (H, W, C)
        with C 1 or 3."""
        if self._writer is None and self._wandb is None:
            return
        if isinstance(image, (str, Path)):
            with Image.open(image) as img:
                array = np.asarray(img if img.mode in ("L", "RGB") else img.convert("RGB"))
        else:
            array = image.numpy(force=True) if isinstance(image, torch.Tensor) else np.asarray(image)
        if array.ndim == 2:
            array = array[:, :, None]
        if self._writer is not None:
            self._writer.add_image(tag, array, step, dataformats="HWC")
            self._writer.flush()
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(array)}, step=step)

    def close(self) -> None:
        """Close the log file and the TensorBoard writer; safe to call twice."""
        if not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
