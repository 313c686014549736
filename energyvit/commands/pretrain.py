"""`energyvit pretrain`: pretrain an energy ViT (or the MAE baseline) on the embedded digits or
your own images. Every flag is a field of an option group of energyvit.pretrain.PretrainOptions.

With --resume (a checkpoint, or auto), the run keeps the options its checkpoint recorded:
energyvit.resume says which flags may change and refuses the others."""
from __future__ import annotations

import argparse

from energyvit import pretrain
from energyvit.checkpoint import load_pretrain_checkpoint
from energyvit.commands.args import add_config, add_options, run_options
from energyvit.pretrain import GROUP_TYPES, PretrainOptions

HELP = "pretrain an energy ViT (default: embedded digits)"
PROG = "energyvit pretrain"


def add_args(p: argparse.ArgumentParser) -> None:
    add_config(p)
    for group in GROUP_TYPES.values():
        add_options(p, group)


def options_from(args: argparse.Namespace, say=print) -> PretrainOptions:
    """The run's options: the flags, or, resuming, the checkpoint's with the resumable flags given."""
    return run_options(args, GROUP_TYPES, PretrainOptions, PROG, args.output_dir,
                       lambda path: load_pretrain_checkpoint(path, mmap=True)["args"], say)


def run(args: argparse.Namespace) -> dict | None:
    return pretrain.run(options_from(args))
