"""Resuming a run: which checkpoint to continue from, and which options the continued run keeps.

A resumed run is the same run. Every option takes the value its checkpoint recorded ("args"),
except the few marked `resumable` in their option group (where and how it runs, what it logs,
how long it trains: `energyvit.options.resumable_fields`). A flag given at resume that would
change any other option is refused, naming it, instead of silently training a different run.

`--resume auto` continues from `checkpoint-last.pth` in the output folder when there is one and
starts a new run otherwise, so a job that is requeued with the same command carries on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

AUTO = "auto"
LAST_CHECKPOINT = "checkpoint-last.pth"


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to continue from: None for a new run ("", or "auto" without a checkpoint
    in output_dir), else the path given (or found)."""
    if not resume:
        return None
    if resume == AUTO:
        path = Path(output_dir) / LAST_CHECKPOINT
        return path if path.is_file() else None
    return Path(resume)


def _flag(name: str, value: Any) -> str:
    return f"--{name} {value}"


def conflicts(saved: dict, values: dict, resumable: frozenset[str], names=None) -> list[str]:
    """The options among `names` (default: all of `values`) that the checkpoint recorded
    (`saved`) with another value and that may not change: '--name VALUE (the checkpoint's:
    SAVED)' each."""
    names = values if names is None else names
    return [f"{_flag(n, values[n])} (the checkpoint's: {saved[n]})" for n in names
            if n in saved and n not in resumable and saved[n] != values[n]]


def resumed_values(saved: dict, values: dict, given: set[str], resumable: frozenset[str], path: str | Path
                   ) -> tuple[dict, list[str], list[str]]:
    """The options of a run resumed from the checkpoint at `path`.

    saved: the checkpoint's options; values: this invocation's (flags and defaults); given: the
    names set explicitly (command line or --config). Returns (options, what changed as
    '--name OLD -> NEW', the names the checkpoint does not record, which keep this invocation's
    value). Raises ValueError naming the given flags that would change an option that may not."""
    refused = conflicts(saved, values, resumable, [n for n in values if n in given])
    if refused:
        allowed = ", ".join(f"--{n}" for n in sorted(resumable))
        raise ValueError(f"{', '.join(refused)}: a resumed run keeps the options of {path}; only {allowed} may "
                         "change (drop the flag, or start a new run in another --output_dir)")
    out, changed = dict(values), []
    for name in values:
        if name not in saved:
            continue
        if name in resumable and name in given:
            if saved[name] != values[name] and name != "resume":  # that one always differs
                changed.append(f"--{name} {saved[name]} -> {values[name]}")
        else:
            out[name] = saved[name]
    unrecorded = sorted(n for n in values if n not in saved)
    return out, changed, unrecorded
