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
from energyvit.resume import AUTO, LAST_CHECKPOINT, resolve_resume, resumed_values


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
        if meta.get("resumable") and f.name != "resume":
            kwargs["help"] += " (may change at --resume)"
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


# ------------------------------------------------------------------------------ --config and given flags
CONFIG_HELP = ("YAML file of flags (keys: flag names, e.g. batch_size: 64; true/false for switches); flags on the "
               "command line win")


def add_config(parser: argparse.ArgumentParser) -> None:
    add(parser, "--config", default=None, metavar="FILE", help=CONFIG_HELP)


def _config_tokens(key: str, value, action: argparse.Action, where: str) -> list[str]:
    """The command-line tokens that set `action` to a YAML value, checked as the flag's text is."""
    flag = action.option_strings[0]
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        if not isinstance(value, bool):
            raise CliError(f"{where}: {key}: must be true or false, got {value!r}")
        if isinstance(action, argparse._StoreTrueAction):
            return [flag] if value else []
        return [flag if value else f"--no-{flag[2:]}"]
    if isinstance(value, (dict, list, bool)) or value is None:
        raise CliError(f"{where}: {key}: must be a single number or string, got {value!r}")
    text = repr(value) if isinstance(value, float) else str(value)
    try:  # the flag's own parse and choices, so a recipe is refused with the command line's words
        parsed = action.type(text) if action.type is not None else text
    except argparse.ArgumentTypeError as e:
        raise CliError(f"{where}: {key}: {e}") from None
    except (TypeError, ValueError):  # a plain int or float: argparse's own words
        raise CliError(f"{where}: {key}: invalid {getattr(action.type, '__name__', 'value')} value: {text!r}") from None
    if action.choices is not None and parsed not in action.choices:
        raise CliError(f"{where}: {key}: must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return [flag, text]


def config_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """The flags of the YAML file at `path` as command-line tokens of `parser`'s command (to be
    placed before the real command line, which then wins). Keys are flag names (snake or kebab
    case); a key that is no flag of the command, a value of the wrong kind or a file that is
    not a YAML mapping is a CliError naming the file and the key. Read with yaml.safe_load: no
    tag in the file can build a Python object."""
    where = f"{parser.prog}: error: --config {path}"
    try:
        import yaml
    except ImportError:
        raise CliError(f"{where}: reading YAML needs PyYAML (pip install pyyaml)") from None
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except OSError as e:
        raise CliError(f"{where}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise CliError(f"{where}: not valid YAML{at} ({getattr(e, 'problem', None) or type(e).__name__})") from None
    if values is None:
        return []
    if not isinstance(values, dict):
        raise CliError(f"{where}: must hold a mapping of flag names to values, not a {type(values).__name__}")
    actions = {s: a for a in parser._actions for s in a.option_strings}
    tokens = []
    for key, value in values.items():
        action = actions.get(f"--{key}")
        if action is None or not isinstance(key, str) or key in ("config", "help"):
            raise CliError(f"{where}: unknown key {key!r}: not a flag of {parser.prog}")
        if value is not None:  # null: the flag's default
            tokens += _config_tokens(key, value, action, where)
    return tokens


def given_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations that `argv` sets explicitly (whatever their values), as opposed to those
    left at their defaults: a resumed run refuses given flags that would change it."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for a, default in saved:
            a.default = default
    return set(vars(namespace))


# ------------------------------------------------------------------------------ a run's options, resumed or not
def run_options(args: argparse.Namespace, groups: dict[str, type], options_type: type, prog: str, output_dir,
                saved_args, say=print):
    """The options of a run (`options_type`, made of the option `groups` by name) from the flags,
    or, resuming (--resume CHECKPOINT or auto), from the checkpoint's: only the resumable flags
    given may change them, and others given are refused (energyvit.resume). saved_args(path)
    reads a checkpoint's options. Says on the console what it resumes and what changed."""
    values = {f.name: getattr(args, f.name) for group in groups.values() for f in fields(group) if hasattr(args, f.name)}
    path = resolve_resume(args.resume, output_dir)
    if args.resume == AUTO:
        say(f"{prog}: --resume auto: " + (f"continuing from {path}" if path is not None
                                          else f"no {LAST_CHECKPOINT} in {output_dir}, a new run"))
        values["resume"] = str(path or "")
    if path is not None:
        values, changed, unrecorded = resumed_values(saved_args(path), values, getattr(args, "given", set()),
                                                     options_type.resumable(), path)
        say(f"{prog}: resuming {path} with its options" + (f"; changed: {', '.join(changed)}" if changed else ""))
        if unrecorded:
            say(f"{prog}: not recorded in {path}, so as given or by default: "
                + ", ".join(f"--{n} {values[n]}" for n in unrecorded))
    flat = argparse.Namespace(**values)
    built = {name: build_options(group, flat, prog) for name, group in groups.items()}
    try:
        return options_type(**built)
    except OptionError as e:
        raise CliError(f"{prog}: error: argument --{e.name}: must be {e.requirement}") from None
