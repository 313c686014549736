"""Rewrite the flag tables of docs/cli.md from the option dataclasses and the command parsers.

Usage: python docs/make_cli_tables.py [--check]. With --check, exit 1 (printing the first
difference) when docs/cli.md is out of date instead of writing it; tests/test_layout.py runs that.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from energyvit.cli import build_parser

DOC = Path(__file__).with_name("cli.md")
BEGIN, END = "<!-- flags: begin (docs/make_cli_tables.py) -->", "<!-- flags: end -->"


def _default(action: argparse.Action) -> str:
    if isinstance(action, argparse.BooleanOptionalAction) or action.const is True:
        return "on" if action.default else "off"
    if action.default is None or action.default == "":
        return "none"
    return f"`{action.default}`"


def tables() -> str:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name, parser in sub.choices.items():
        out += [f"### `energyvit {name}`", "", "| flag | default | meaning |", "| --- | --- | --- |"]
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = " ".join(f"`{s}`" for s in action.option_strings[:1]) or f"`{action.dest}` (positional)"
            text = (action.help or "").replace("|", "/")
            if action.choices is not None and not isinstance(action.choices, range):
                text += ("; " if text else "") + "one of " + ", ".join(f"`{c}`" for c in action.choices)
            out.append(f"| {flag} | {'' if not action.option_strings else _default(action)} | {text} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def render(doc: str) -> str:
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{tables()}\n{END}{tail}"


def main() -> int:
    check = "--check" in sys.argv[1:]
    doc = DOC.read_text()
    new = render(doc)
    if check:
        if new != doc:
            diff = list(difflib.unified_diff(doc.splitlines(), new.splitlines(), lineterm="", n=0))
            print(f"{DOC} is out of date: run python docs/make_cli_tables.py\n" + "\n".join(diff[:8]))
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
