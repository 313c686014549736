"""`energyvit shapes DIR`: write the procedural labeled scenes of energyvit.data.shapes (ten
shape classes among clutter, occlusion and texture) as an ImageFolder tree that `pretrain`,
`probe` and `finetune` read with --data_path. A benchmark that needs no download."""
from __future__ import annotations

import argparse
import sys

from energyvit.commands.args import CliError, add
from energyvit.data import shapes

HELP = "write the procedural shapes dataset (labeled scenes with clutter and occlusion)"
PROG = "energyvit shapes"
HELPS = {
    "train_per_class": "training images per class", "val_per_class": "validation images per class",
    "size": "image side in pixels", "seed": "the whole dataset is a function of it",
    "min_scale": "smallest object diameter, as a fraction of the image side",
    "max_scale": "largest object diameter, as a fraction of the image side",
    "max_aspect": "largest stretch of the object along one axis",
    "max_rotation": "largest turn of the object either way, in degrees",
    "clutter": "distractors per image: between clutter // 2 and clutter",
    "front_fraction": "share of the distractors drawn over the object",
    "min_visible": "fraction of the object that occluders leave visible, at least",
    "texture_contrast": "0: flat colors; 1: each texture's two colors independent",
    "object_contrast": "c: the object's color channels lie in [c, 1], the background's in [0, 1 - c]",
}


def _flag_type(name: str):
    kind = shapes.LIMITS[name][0]

    def parse(text: str):
        try:
            value = kind(text)
            shapes.check_value(name, value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{shapes.limit_text(name)}, got {text}") from None
        return value

    return parse


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("output_dir", help="folder to write (it must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    for name, default in shapes.DEFAULTS.items():
        add(p, f"--{name}", type=_flag_type(name), default=default, help=HELPS[name])


def run(args: argparse.Namespace) -> dict:
    params = {name: getattr(args, name) for name in shapes.DEFAULTS}
    if params["min_scale"] > params["max_scale"]:
        raise CliError(f"{PROG}: error: argument --min_scale: must not exceed --max_scale, got {params['min_scale']} "
                       f"> {params['max_scale']}")
    try:
        summary = shapes.generate(args.output_dir, overwrite=args.overwrite, **params)
    except FileExistsError as e:
        raise CliError(f"{PROG}: error: {str(e).replace('(overwrite', '(pass --overwrite')}") from None
    print(f"wrote {summary['images']} images ({len(shapes.CLASSES)} classes; {summary['train_per_class']} train and "
          f"{summary['val_per_class']} val per class; {summary['size']}x{summary['size']}) to {args.output_dir} "
          f"in {summary['seconds']:.1f} s", file=sys.stderr)
    return summary
