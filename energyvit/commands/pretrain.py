"""`energyvit pretrain`: pretrain an energy ViT (or the MAE baseline) on the embedded digits or
your own images. Every flag is a field of an option group of energyvit.pretrain.PretrainOptions.

With --resume (a checkpoint, or auto), the run keeps the options its checkpoint recorded:
energyvit.resume says which flags may change and refuses the others."""
from __future__ import annotations

import argparse
from dataclasses import fields

from energyvit import pretrain
from energyvit.checkpoint import load_pretrain_checkpoint
from energyvit.commands.args import CliError, add_config, add_options, build_options
from energyvit.options import OptionError
from energyvit.pretrain import GROUP_TYPES, PretrainOptions
from energyvit.resume import AUTO, resolve_resume, resumed_values

HELP = "pretrain an energy ViT (default: embedded digits)"
PROG = "energyvit pretrain"


def add_args(p: argparse.ArgumentParser) -> None:
    add_config(p)
    for group in GROUP_TYPES.values():
        add_options(p, group)


def options_from(args: argparse.Namespace, say=print) -> PretrainOptions:
    """The run's options: the flags, or, resuming, the checkpoint's with the resumable flags given."""
    values = {f.name: getattr(args, f.name) for group in GROUP_TYPES.values() for f in fields(group)}
    path = resolve_resume(args.resume, args.output_dir)
    if args.resume == AUTO:
        say(f"{PROG}: --resume auto: " + (f"continuing from {path}" if path is not None
                                          else f"no checkpoint in {args.output_dir}, a new run"))
        values["resume"] = str(path or "")
    if path is not None:
        saved = load_pretrain_checkpoint(path, mmap=True)["args"]
        values, changed, unrecorded = resumed_values(saved, values, getattr(args, "given", set()),
                                                     PretrainOptions.resumable(), path)
        say(f"{PROG}: resuming {path} with its options" + (f"; changed: {', '.join(changed)}" if changed else ""))
        if unrecorded:
            say(f"{PROG}: not recorded in {path}, so as given or by default: "
                + ", ".join(f"--{n} {values[n]}" for n in unrecorded))
    flat = argparse.Namespace(**values)
    groups = {name: build_options(group, flat, PROG) for name, group in GROUP_TYPES.items()}
    try:
        return PretrainOptions(**groups)
    except OptionError as e:
        raise CliError(f"{PROG}: error: argument --{e.name}: must be {e.requirement}") from None


def run(args: argparse.Namespace) -> dict | None:
    return pretrain.run(options_from(args))
