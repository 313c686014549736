"""Typed option groups: dataclasses whose fields are the command-line flags of the same name.

An option group (DataOptions, TaskOptions, TrainOptions, ...) is a frozen dataclass declared
with `option(...)` fields. Each field carries its help text and the rule its value must satisfy;
`check_fields` enforces the rules when the object is built, so the Python API and the command
line refuse the same values with the same words. The command layer (energyvit.commands.args)
turns every field into a flag `--name` and builds the object once from the parsed flags; nothing
below the command layer sees an argparse Namespace.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, Field, field, fields
from typing import Any

import torch

# A rule: value -> None when it holds, else what the value must be ("> 0", "in (0, 1)").
Rule = Callable[[Any], str | None]


class OptionError(ValueError):
    """An option value that breaks its rule; `name` is the field (and flag) name."""

    def __init__(self, name: str, value: Any, requirement: str) -> None:
        self.name, self.value, self.requirement = name, value, requirement
        super().__init__(f"{name} must be {requirement}, got {value!r}")


def option(default: Any = MISSING, help: str = "", *, rule: Rule | None = None, parse: Callable | None = None,
           choices: tuple | None = None, metavar: str | None = None, resumable: bool = False) -> Field:
    """A dataclass field that is also a flag. parse: how the flag's text becomes a value (default:
    the type of the default value); choices: the allowed values, checked by the flag parser and
    by check_fields. resumable: the value may change when a run resumes (where and how it runs,
    what it logs, how long: never what it computes); every other option is the checkpoint's."""
    meta = {"help": help, "rule": rule, "parse": parse, "choices": choices, "metavar": metavar,
            "resumable": resumable}
    return field(default=default, metadata=meta)


def resumable_fields(*groups: type) -> frozenset[str]:
    """The names of the fields of these option groups that may change when a run resumes."""
    return frozenset(f.name for g in groups for f in fields(g) if f.metadata.get("resumable"))


def check_fields(obj) -> None:
    """Raise OptionError for the first field of `obj` that breaks its rule. Every float must be
    finite (a NaN would pass any comparison below unnoticed)."""
    for f in fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise OptionError(f.name, value, "a finite number")
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise OptionError(f.name, value, f"one of {', '.join(map(str, meta['choices']))}")
        rule = meta.get("rule")
        requirement = rule(value) if rule is not None else None
        if requirement is not None:
            raise OptionError(f.name, value, requirement)


# ----------------------------------------------------------------------------------- rules
def positive(value) -> str | None:
    return None if value > 0 else "> 0"


def non_negative(value) -> str | None:
    return None if value >= 0 else ">= 0"


def open_unit(value) -> str | None:
    return None if 0 < value < 1 else "in (0, 1)"


def half_open_unit(value) -> str | None:
    return None if 0 < value <= 1 else "in (0, 1]"


def below_one(value) -> str | None:
    return None if 0 <= value < 1 else "in [0, 1)"


def in_range(low: float, high: float) -> Rule:
    """low <= value <= high."""
    def rule(value) -> str | None:
        return None if low <= value <= high else f"in [{low:g}, {high:g}]"
    return rule


def device(value: str) -> str | None:
    """A torch device this machine has."""
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        return "cpu, cuda or cuda:N"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return "a device of this machine (CUDA is not available here)"
    return None
