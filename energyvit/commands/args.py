"""Flags shared by the commands: parser set-up, flag types, and flags made from option groups.

Flags follow MAE's names (--batch_size), each with a timm-style hyphenated alias (--batch-size).
Every bad value ends in one line naming the flag and the value, exit status 2, before any work
starts: argparse checks the types and choices, the option groups (energyvit.options) the rules.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, fields

from energyvit.options import OptionError, device


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage block first
        raise CliError(f"{self.prog}: error: {message}")


def add(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add --snake_case with its --kebab-case alias."""
    names = [name] + ([name.replace("_", "-")] if "_" in name else [])
    parser.add_argument(*names, **kwargs)


def _number(convert, test, requirement: str):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}") from None
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a finite number > 0")
non_negative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")


def device_flag(text: str) -> str:
    requirement = device(text)
    if requirement is not None:
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
    return text


def flag_type(parse):
    """A field's parse function as an argparse type: its ValueError message becomes argparse's."""
    if parse in (int, float, str):
        return parse

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def add_options(parser: argparse.ArgumentParser, group: type, only: tuple[str, ...] | None = None,
                defaults: dict | None = None, helps: dict | None = None) -> None:
    """One flag per field of the option dataclass `group` (or the fields named in `only`), with
    the field's help, type and choices; `defaults` and `helps` replace a field's default and help
    for this command.
    A flag another group already added (a shared option such as --norm_pix_loss) is kept once."""
    defaults = defaults or {}
    taken = {s for a in parser._actions for s in a.option_strings}
    for f in fields(group):
        if (only is not None and f.name not in only) or f"--{f.name}" in taken:
            continue
        meta = f.metadata
        default = defaults.get(f.name, f.default if f.default is not MISSING else None)
        kwargs = {"default": default, "help": (helps or {}).get(f.name, meta.get("help"))}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        else:
            parse = meta.get("parse") or type(default)
            kwargs["type"] = flag_type(parse)
            if meta.get("choices") is not None:
                kwargs["choices"] = meta["choices"]
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        add(parser, f"--{f.name}", **kwargs)


def build_options(group: type, args: argparse.Namespace, prog: str, **fixed):
    """The option dataclass `group` from the parsed flags (fields without a flag keep their
    default, `fixed` sets some); a value that breaks a rule is a CliError naming its flag."""
    values = {f.name: getattr(args, f.name) for f in fields(group) if hasattr(args, f.name)}
    try:
        return group(**{**values, **fixed})
    except OptionError as e:
        flag = f"--{e.name}" + (f"/--{e.name.replace('_', '-')}" if "_" in e.name else "")
        raise CliError(f"{prog}: error: argument {flag}: must be {e.requirement}, got {e.value}") from None
