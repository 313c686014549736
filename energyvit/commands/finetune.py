"""`energyvit finetune`: fine-tune a pretrained encoder end to end as a classifier of the embedded
digits or of any labeled dataset `energyvit pretrain --data_path` reads (MAE's protocol, the job
in energyvit.finetune), or the same architecture from random init as a baseline. Every flag is a
field of an option group of energyvit.finetune.FinetuneOptions.

With --resume (a checkpoint, or auto), the run keeps the options its checkpoint recorded:
energyvit.resume says which flags may change and refuses the others."""
from __future__ import annotations

import argparse
from dataclasses import fields

from energyvit import finetune
from energyvit.checkpoint import load_finetune_checkpoint
from energyvit.commands.args import CliError, add_config, add_options, run_options
from energyvit.finetune import DATA_DEFAULTS, GROUP_TYPES, PROG, FinetuneOptions, FinetuneRunOptions
from energyvit.resume import resolve_resume

HELP = "fine-tune a pretrained encoder end to end as a classifier"


def add_args(p: argparse.ArgumentParser) -> None:
    pretrained = next(f for f in fields(FinetuneRunOptions) if f.name == "checkpoint")
    p.add_argument("checkpoint", nargs="?", default="", help=pretrained.metadata["help"])
    add_config(p)
    for group in GROUP_TYPES.values():  # a one-class set has nothing to classify: no --one_class here
        add_options(p, group, only=tuple(f.name for f in fields(group) if f.name not in ("checkpoint", "one_class")),
                    defaults=DATA_DEFAULTS)


def options_from(args: argparse.Namespace, say=print) -> FinetuneOptions:
    """The run's options: the flags, or, resuming, the checkpoint's with the resumable flags given."""
    out = FinetuneRunOptions(checkpoint=args.checkpoint, output_dir=args.output_dir).out
    if not args.checkpoint and resolve_resume(args.resume, out) is None:
        raise CliError(f"{PROG}: error: the pretrained checkpoint is required (unless --resume continues a run)")
    return run_options(args, GROUP_TYPES, FinetuneOptions, PROG, out,
                       lambda path: load_finetune_checkpoint(path, mmap=True)["args"], say)


def run(args: argparse.Namespace) -> dict | None:
    return finetune.run(options_from(args))
