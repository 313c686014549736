"""The `energyvit` command. Flags follow MAE's names (--batch_size), with timm-style
hyphenated aliases (--batch-size). Bad flags or values end in one clear line, not a traceback."""
from __future__ import annotations

import argparse
import sys

import torch

from energyvit.engine import LOSS_REGIONS
from energyvit.methods import METHODS
from energyvit.model import ENERGY_READOUTS, MODEL_ARCHS
from energyvit.probe import POOLING


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage block first
        raise CliError(f"{self.prog}: error: {message}")


def add(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add --snake_case with its --kebab-case alias."""
    names = [name] + ([name.replace("_", "-")] if "_" in name else [])
    parser.add_argument(*names, **kwargs)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def mask_fill(text: str) -> str | float:
    if text == "noise":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'noise' or a number, got {text!r}") from None


def device(text: str) -> str:
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} requested but CUDA is not available on this machine")
    return text


def add_pretrain_args(p: argparse.ArgumentParser) -> None:
    add(p, "--data_path", default=None,
        help="image data: ImageFolder tree (with train/ and val/ or class folders), flat folder, CIFAR-10/100 "
             "python batches or MNIST-style idx files (default: the embedded digits)")
    add(p, "--method", choices=METHODS, default="energy",
        help="energy: this project's method; mae: the MAE baseline on the same encoder, for comparisons")
    add(p, "--mae_mask_ratio", type=fraction, default=0.75, help="mae: fraction of patches hidden")
    add(p, "--model", default="vit_nano_patch4", choices=list(MODEL_ARCHS), help="architecture name")
    add(p, "--input_size", type=positive_int, default=None, help="image size (default: the model's)")
    add(p, "--batch_size", type=positive_int, default=64, help="images per process per micro-batch")
    add(p, "--accum_iter", type=positive_int, default=1,
        help="micro-batches per optimizer step (effective batch = batch_size x accum_iter x processes)")
    add(p, "--epochs", type=positive_int, default=200)
    add(p, "--warmup_epochs", type=int, default=2)
    add(p, "--blr", type=float, default=4e-3, help="base lr: lr = blr * effective batch / 256")
    add(p, "--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    add(p, "--weight_decay", type=float, default=0.05)
    add(p, "--clip_grad", type=float, default=None, help="gradient norm clip (off by default)")
    add(p, "--shift", type=int, default=0, help="augmentation: random translation up to this many pixels")
    add(p, "--tasks", default="mim",
        help="task mixture name:weight,... from mim, sort, sr, denoise, colorize")
    add(p, "--mask_ratio", type=fraction, default=0.75, help="mim: fraction of patches masked")
    add(p, "--mask_fill", type=mask_fill, default="noise", help="mim: 'noise' (uniform) or a constant")
    add(p, "--sort_fraction", type=fraction, default=0.25, help="sort: fraction of patches shuffled")
    add(p, "--sr_factor", type=int, choices=(2, 4), default=2, help="sr: downsampling factor")
    add(p, "--noise_sigma", type=float, default=0.2, help="denoise: Gaussian sigma in pixel units")
    add(p, "--energy", choices=ENERGY_READOUTS, default="norm", help="energy readout")
    add(p, "--restore_steps", type=int, choices=range(1, 9), default=1, metavar="K", help="gradient steps (1..8)")
    add(p, "--step_size_init", type=float, default=1.0, help="initial step size a_k")
    add(p, "--langevin_std", type=float, default=0.0, help="Langevin noise scale in training restoration")
    add(p, "--loss_region", choices=LOSS_REGIONS, default="corrupted")
    add(p, "--norm_pix_loss", action="store_true", help="per-patch normalized targets (MAE)")
    add(p, "--probe_pool", choices=POOLING, default=None,
        help="features of the final linear probe (default: tokens on the digits, mean otherwise; see README)")
    add(p, "--probe_images", type=positive_int, default=10000, help="training images the final probe fits on")
    add(p, "--eval_images", type=positive_int, default=512, help="held-out images of the final evaluation")
    add(p, "--fused", action="store_true", help="fused Triton attention (needs triton)")
    add(p, "--compile", action="store_true",
        help="torch.compile the whole training step (exact second-order gradients; eager fallback with a warning)")
    add(p, "--precision", choices=("auto", "bf16", "fp32"), default="auto",
        help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    add(p, "--num_workers", type=int, default=None,
        help="DataLoader workers (default: 0 for the embedded digits, else min(8, CPUs))")
    add(p, "--save_every", type=int, default=0, help="also keep checkpoint-NNNN.pth every this many epochs (0: off)")
    add(p, "--checkpoint_minutes", type=float, default=30.0,
        help="mid-epoch checkpoint-last.pth at most this many minutes apart (0: only at epoch ends)")
    add(p, "--grid_rows", type=int, default=8, help="images per PNG restoration grid each epoch (0: none)")
    add(p, "--tensorboard", action=argparse.BooleanOptionalAction, default=True,
        help="TensorBoard event files when tensorboard is installed")
    add(p, "--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    add(p, "--output_dir", default="./output_dir")
    add(p, "--resume", default="", help="checkpoint to continue from")
    add(p, "--seed", type=int, default=0)
    add(p, "--num_threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="energyvit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    pretrain = sub.add_parser("pretrain", help="pretrain an energy ViT (default: embedded digits)")
    add_pretrain_args(pretrain)
    for name, (module, text) in tool_commands().items():
        module.add_args(sub.add_parser(name, help=text))
    return parser


def tool_commands() -> dict:
    """The evaluation, export and restoration commands: name -> (module with add_args/run, help)."""
    # imported here, not at the top: these modules use this one's argument helpers
    from energyvit import bench, evaluate, export, finetune, restore_image

    return {
        "export": (export, "write a pretrained encoder as timm-loadable .safetensors"),
        "restore": (restore_image, "corrupt an image file and restore it with a pretrained model"),
        "probe": (evaluate, "linear probe and weighted kNN of frozen features on the digits"),
        "finetune": (finetune, "fine-tune a pretrained encoder end to end as a digit classifier"),
        "bench": (bench, "benchmark attention backends and the training step"),
    }


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "pretrain":
            from energyvit.pretrain import run

            run(args)
        elif args.command in tool_commands():
            tool_commands()[args.command][0].run(args)
        return 0
    except CliError as e:
        print(e, file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"energyvit: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from energyvit.engine import TrainingDiverged

        if not isinstance(e, TrainingDiverged):
            raise
        print(f"energyvit: training stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("energyvit: interrupted; resume with --resume OUTPUT_DIR/checkpoint-last.pth", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
