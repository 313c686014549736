"""Training progress on the console: a redrawn bar on a terminal, plain periodic lines otherwise.

On a TTY one line is redrawn in place with '\\r', at most every `_TTY_REDRAW_S` seconds:

    pretrain  1200/5000  [#####---------------]  24%  812.3 images/s  ETA 0:04:41  loss 0.1234

Elsewhere (log files, CI) a plain line, without '\\r' or bar, every `interval_s` seconds and at
the last step:

    pretrain  step 1200/5000  24%  812.3 images/s  ETA 0:04:41  elapsed 0:01:30  loss 0.1234

Rates are smoothed over the last ~`_SMOOTHING_S` seconds (time-discounted sums of images, steps
and seconds), so they follow speed changes without jumping on single slow steps. The first update
only starts the clock: its step includes start-up and compilation, and would bias every rate.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, TextIO

_TTY_REDRAW_S = 0.1  # at most ~10 redraws per second: redrawing costs terminal time
_SMOOTHING_S = 10.0  # time constant of the rate smoothing
_BAR_WIDTH = 20


def format_duration(seconds: float) -> str:
    """Seconds -> 'h:mm:ss' (hours unbounded, e.g. '27:03:04'); negatives read as 0."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
    """Progress of steps `first_step`..`total_steps` (global steps, so a resumed run keeps its count).

    Call `update` after each optimizer step, `close` at the end (it prints the latest state if
    the last update was not shown, and ends the TTY line). `is_tty` None asks `stream.isatty()`.
    `clock` returns seconds; tests inject a fake one.
    """

    def __init__(
        self,
        total_steps: int,
        first_step: int = 0,
        stream: TextIO = sys.stderr,
        is_tty: bool | None = None,
        interval_s: float = 30.0,
        desc: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total_steps < 1 or not 0 <= first_step <= total_steps:
            raise ValueError(f"need total_steps >= 1 and 0 <= first_step <= total_steps, got {first_step}/{total_steps}")
        self.total_steps = total_steps
        self.stream = stream
        self.is_tty = bool(getattr(stream, "isatty", lambda: False)()) if is_tty is None else is_tty
        self.interval_s = interval_s
        self.desc = desc
        self.clock = clock
        self.step = first_step
        self.postfix: dict[str, float] = {}
        self._start = clock()
        self._last_time: float | None = None  # time of the previous update; None before the first
        # time-discounted sums since the first update; rates are their ratios
        self._images = self._steps = self._seconds = 0.0
        # when the last line was written: a terminal shows the first update at once, a log
        # file gets its first line interval_s after the start
        self._last_shown = -math.inf if self.is_tty else self._start
        self._shown_step: int | None = None  # step of the last line written
        self._line_len = 0  # length of the TTY line on screen, to blank a longer previous one
        self._closed = False

    def update(self, step: int, images: int, **postfix: float) -> None:
        """Global `step` reached, `images` processed since the previous update; postfix: e.g. loss=0.12."""
        now = self.clock()
        if self._last_time is not None:
            dt = now - self._last_time
            decay = math.exp(-dt / _SMOOTHING_S)
            self._images = decay * self._images + images
            self._steps = decay * self._steps + (step - self.step)
            self._seconds = decay * self._seconds + dt
        self._last_time = now
        self.step = step
        self.postfix = postfix
        final = step >= self.total_steps
        wait = _TTY_REDRAW_S if self.is_tty else self.interval_s
        if final or now - self._last_shown >= wait:
            self._show(now)

    def images_per_s(self) -> float | None:
        """Smoothed images per second; None until two updates have timed a step."""
        return self._images / self._seconds if self._seconds > 0 else None

    def eta_s(self) -> float | None:
        """Seconds left at the smoothed step rate; None while the rate is unknown."""
        if self._seconds <= 0 or self._steps <= 0:
            return None
        return (self.total_steps - self.step) * self._seconds / self._steps

    def line(self, now: float | None = None) -> str:
        """The current progress line: with bar on a TTY, with elapsed time otherwise."""
        rate, eta = self.images_per_s(), self.eta_s()
        frac = self.step / self.total_steps
        parts = [self.desc] if self.desc else []
        if self.is_tty:
            filled = int(frac * _BAR_WIDTH)
            parts += [f"{self.step}/{self.total_steps}", f"[{'#' * filled}{'-' * (_BAR_WIDTH - filled)}]"]
        else:
            parts.append(f"step {self.step}/{self.total_steps}")
        parts.append(f"{100 * frac:3.0f}%")
        parts.append("? images/s" if rate is None else f"{rate:.1f} images/s")
        parts.append("ETA ?" if eta is None else f"ETA {format_duration(eta)}")
        if not self.is_tty:
            parts.append(f"elapsed {format_duration((self.clock() if now is None else now) - self._start)}")
        parts += [f"{k} {v:.4g}" for k, v in self.postfix.items()]
        return "  ".join(parts)

    def _show(self, now: float) -> None:
        text = self.line(now)
        if self.is_tty:
            # spaces blank the tail of a longer previous line
            self.stream.write("\r" + text + " " * max(0, self._line_len - len(text)))
            self._line_len = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._last_shown = now
        self._shown_step = self.step

    def close(self) -> None:
        """Show the latest state if it was not shown (throttled, or a run stopped early); end the TTY line."""
        if self._closed:
            return
        self._closed = True
        if self._last_time is not None and self._shown_step != self.step:
            self._show(self.clock())
        if self.is_tty and self._line_len:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
