"""`energyvit pretrain`: pretrain an energy ViT (or the MAE baseline) on the embedded digits or
your own images. Every flag is a field of an option group of energyvit.pretrain.PretrainOptions."""
from __future__ import annotations

import argparse

from energyvit import pretrain
from energyvit.commands.args import CliError, add_options, build_options
from energyvit.data.splits import DataOptions
from energyvit.methods.mae import MAEOptions
from energyvit.model import ModelOptions
from energyvit.objective import EnergyOptions
from energyvit.options import OptionError
from energyvit.pretrain import PretrainOptions, RunOptions
from energyvit.tasks import TaskOptions
from energyvit.training import TrainOptions

HELP = "pretrain an energy ViT (default: embedded digits)"
PROG = "energyvit pretrain"
GROUPS = {"data": DataOptions, "model": ModelOptions, "tasks": TaskOptions, "energy": EnergyOptions,
          "mae": MAEOptions, "train": TrainOptions, "run": RunOptions}


def add_args(p: argparse.ArgumentParser) -> None:
    for group in GROUPS.values():
        add_options(p, group)


def options_from(args: argparse.Namespace) -> PretrainOptions:
    groups = {name: build_options(group, args, PROG) for name, group in GROUPS.items()}
    try:
        return PretrainOptions(**groups)
    except OptionError as e:
        raise CliError(f"{PROG}: error: argument --{e.name}: must be {e.requirement}") from None


def run(args: argparse.Namespace) -> dict | None:
    return pretrain.run(options_from(args))
