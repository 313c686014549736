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
from energyvit.commands.args import CliError, add_config, add_options, build_options
from energyvit.finetune import DATA_DEFAULTS, GROUP_TYPES, PROG, FinetuneOptions, FinetuneRunOptions
from energyvit.options import OptionError
from energyvit.resume import AUTO, resolve_resume, resumed_values

HELP = "fine-tune a pretrained encoder end to end as a classifier"


def add_args(p: argparse.ArgumentParser) -> None:
    pretrained = next(f for f in fields(FinetuneRunOptions) if f.name == "checkpoint")
    p.add_argument("checkpoint", nargs="?", default="", help=pretrained.metadata["help"])
    add_config(p)
    for group in GROUP_TYPES.values():
        add_options(p, group, only=tuple(f.name for f in fields(group) if f.name != "checkpoint"),
                    defaults=DATA_DEFAULTS)


def options_from(args: argparse.Namespace, say=print) -> FinetuneOptions:
    """The run's options: the flags, or, resuming, the checkpoint's with the resumable flags given."""
    values = {f.name: getattr(args, f.name) for group in GROUP_TYPES.values() for f in fields(group)}
    path = resolve_resume(args.resume, FinetuneRunOptions(checkpoint=args.checkpoint, output_dir=args.output_dir).out)
    if args.resume == AUTO:
        say(f"{PROG}: --resume auto: " + (f"continuing from {path}" if path is not None
                                          else "no checkpoint-last.pth in the output folder, a new run"))
        values["resume"] = str(path or "")
    if path is not None:
        saved = load_finetune_checkpoint(path, mmap=True)["args"]
        values, changed, unrecorded = resumed_values(saved, values, getattr(args, "given", set()),
                                                     FinetuneOptions.resumable(), path)
        say(f"{PROG}: resuming {path} with its options" + (f"; changed: {', '.join(changed)}" if changed else ""))
        if unrecorded:
            say(f"{PROG}: not recorded in {path}, so as given or by default: "
                + ", ".join(f"--{n} {values[n]}" for n in unrecorded))
    elif not args.checkpoint:
        raise CliError(f"{PROG}: error: the pretrained checkpoint is required (unless --resume continues a run)")
    flat = argparse.Namespace(**values)
    groups = {name: build_options(group, flat, PROG) for name, group in GROUP_TYPES.items()}
    try:
        return FinetuneOptions(**groups)
    except OptionError as e:
        raise CliError(f"{PROG}: error: argument --{e.name}: must be {e.requirement}") from None


def run(args: argparse.Namespace) -> dict | None:
    return finetune.run(options_from(args))
