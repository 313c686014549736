"""The `energyvit` command line: one subcommand per module of energyvit.commands. Bad flags,
values, files and data end in one line (exit status 2); a bug in the project still shows its
traceback."""
from __future__ import annotations

import argparse
import sys

from energyvit.commands import bench, export, finetune, pretrain, probe, restore, score, shapes
from energyvit.commands.args import CliError, OneLineParser, config_argv, given_dests
from energyvit.training import TrainingDiverged

COMMANDS = {"pretrain": pretrain, "export": export, "restore": restore, "probe": probe, "finetune": finetune,
            "score": score, "bench": bench, "shapes": shapes}


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="energyvit", description="Energy-inspired self-supervised pretraining of vision "
                           "transformers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, command in COMMANDS.items():
        command.add_args(sub.add_parser(name, help=command.HELP, description=command.__doc__))
    return parser


def one_line(e: BaseException) -> str:
    """The message of `e` on one line. An error raised in a DataLoader worker arrives wrapped, its
    original message on the last line after the worker's traceback: keep that."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if "Original Traceback" in str(e) and lines:
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    """The parsed command line, with the flags of its --config file placed before it (so the
    command line wins) and `given`: the flags set explicitly by either."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    sub_argv = argv[argv.index(args.command) + 1:]
    if getattr(args, "config", None):
        sub_argv = config_argv(args.config, sub) + sub_argv
        args = parser.parse_args([args.command, *sub_argv])
    args.given = given_dests(sub, sub_argv)
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(list(sys.argv[1:] if argv is None else argv))
        COMMANDS[args.command].run(args)
        return 0
    except CliError as e:
        print(e, file=sys.stderr)
        return 2
    except (ValueError, OSError, ImportError) as e:  # bad input: values, files, data, missing packages
        print(f"energyvit: error: {one_line(e)}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"energyvit: training stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("energyvit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
