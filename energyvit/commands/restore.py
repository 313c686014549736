"""`energyvit restore`: corrupt one image file and restore it with a pretrained energy model.

The image is read with Pillow, center-cropped to a square, resized to the model's size and
converted to its channels (L or RGB). Unless `--corrupted` says the file is already degraded, the
task's corruption is applied here (synthetic), with `--seed`. Restoration is the model's K
gradient steps in inference mode. Written: the restored image at the model's size, and a strip,
zoomed for viewing, of corrupted | x_1 ... | restored (| clean reference).

PSNR (whole image, pixels in [0, 1], after clamping to [0, 1] as written) is printed against
`--clean` when given, otherwise against the input itself when the corruption is synthetic (the
input is then the clean image); a `--corrupted` input without `--clean` has no reference.

A model pretrained with `--encoder_input visible` restores inpainting with its split: the hidden
patches are the task's, or those a `--mask` touches; its encoder reads the others once.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from energyvit.checkpoint import load_model
from energyvit.commands.args import add, add_options, build_options, positive_int
from energyvit.data.files import TOO_LARGE, read_image
from energyvit.losses import psnr
from energyvit.restore import restore
from energyvit.tasks import TASK_ALIASES, TASK_NAMES, Corrupted, TaskOptions, build_task, parse_task_weights

HELP = "corrupt an image file and restore it with a pretrained model"
PROG = "energyvit restore"
# every pretext task; masked image modeling is called inpaint here
TASKS = tuple({v: k for k, v in TASK_ALIASES.items()}.get(name, name) for name in TASK_NAMES)


MAX_FRAME_SIDE = 2048  # --zoom: each frame of the strip at most this many pixels on a side


def _open(path: str | Path, what: str) -> Image.Image:
    """The decoded image; Pillow's size guard (Image.MAX_IMAGE_PIXELS) refuses larger ones."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        image = read_image(path)
    except TOO_LARGE as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f" ({int(pixels.group(1)) / 1e6:.0f} megapixels)" if pixels else ""
        raise ValueError(f"{what} {path} is larger{size} than the {Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels "
                         f"allowed (a guard against decompression bombs); pass --max_image_pixels "
                         f"{pixels.group(1) if pixels else 'N'} to allow it") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what} {path} could not be read as an image: {e}") from None
    return image


def _center_square(image: Image.Image) -> Image.Image:
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s))


def _to_tensor(image: Image.Image) -> Tensor:
    """PIL image (L or RGB) -> (1, C, H, W) float in [0, 1]."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    chans = len(image.getbands())
    return data.view(image.size[1], image.size[0], chans).permute(2, 0, 1).unsqueeze(0).float() / 255.0


def _to_image(x: Tensor) -> Image.Image:
    """(C, H, W) in [0, 1] -> PIL image, L for one channel, RGB for three."""
    data = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    mode = "L" if data.shape[2] == 1 else "RGB"
    return Image.frombytes(mode, (data.shape[1], data.shape[0]), data.numpy().tobytes())


def load_image(path: str | Path, size: int, chans: int, what: str = "image") -> tuple[Tensor, tuple[int, int]]:
    """(1, chans, size, size) in [0, 1] and the file's (width, height)."""
    image = _open(path, what)
    original = image.size
    image = _center_square(image.convert("L" if chans == 1 else "RGB"))
    # LANCZOS filters when shrinking (no aliasing) and is sharp when enlarging
    return _to_tensor(image.resize((size, size), Image.Resampling.LANCZOS)), original


def load_mask(path: str | Path, size: int, image_size: tuple[int, int]) -> Tensor:
    """(1, 1, size, size) in {0, 1}, 1 where the mask file is white (> 50% gray): pixels to fill.
    The mask must have the input image's size (cropped and resized like it) or the model's."""
    mask = _open(path, "mask")
    if mask.size not in (image_size, (size, size)):
        raise ValueError(f"mask {path} is {mask.size[0]}x{mask.size[1]}, but the image is "
                         f"{image_size[0]}x{image_size[1]} and the model takes {size}x{size}; use one of those sizes")
    # NEAREST keeps the mask binary when it is resized
    mask = _center_square(mask.convert("L")).resize((size, size), Image.Resampling.NEAREST)
    m = (_to_tensor(mask) > 0.5).float()
    if not m.any():
        raise ValueError(f"mask {path} has no white (masked) pixels at {size}x{size}")
    return m


def corrupt_image(x: Tensor, task: str, patch_size: int, options: TaskOptions, seed: int,
                  mask: Tensor | None) -> Corrupted:
    """The synthetic corruption of the clean image x by `task`; inpainting with a given mask fills
    that mask instead of random patches (with the learned fill: its fill_mask, for the model)."""
    generator = torch.Generator().manual_seed(seed)
    if task == "inpaint" and mask is not None:
        if options.mask_fill == "learned":
            return Corrupted(x.masked_fill(mask > 0, float("nan")), mask, mask, fill_mask=mask)
        fill = torch.rand(x.shape, generator=generator) if options.mask_fill == "noise" else \
            torch.full_like(x, options.mask_fill)
        return Corrupted(x * (1 - mask) + fill * mask, mask, mask)
    return build_task(task, patch_size, options)(x, generator)


def inpainting_split(model, task: str, c: Corrupted) -> Tensor | None:
    """The hidden patches (1, H) a model with encoder_input "visible" splits on when inpainting:
    the task's, or every patch the update mask (--mask) touches; None for other models and tasks."""
    if model.cfg.encoder_input != "visible" or task != "inpaint":
        return None
    if c.hidden is not None:
        return c.hidden
    p = model.cfg.patch_size
    touched = torch.nn.functional.max_pool2d(c.update_mask, p).flatten(1)[0] > 0
    if touched.all():
        raise ValueError(f"the mask touches all {touched.numel()} patches: a model pretrained with --encoder_input "
                         "visible needs at least one patch left visible")
    return touched.nonzero().flatten()[None]


def image_psnr(a: Tensor, b: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1]."""
    return psnr((a - b).pow(2).mean().item())


def make_strip(frames: list[Tensor], zoom: int) -> Image.Image:
    """Frames (C, H, W) side by side, each enlarged `zoom` times (NEAREST: pixels stay visible),
    separated by gray gaps."""
    tiles = [_to_image(f).resize((f.shape[2] * zoom, f.shape[1] * zoom), Image.Resampling.NEAREST) for f in frames]
    gap = max(2, zoom // 2)
    w, h = tiles[0].size
    gray = 128 if tiles[0].mode == "L" else (128, 128, 128)
    strip = Image.new(tiles[0].mode, (len(tiles) * w + (len(tiles) - 1) * gap, h), color=gray)
    for i, tile in enumerate(tiles):
        strip.paste(tile, (i * (w + gap), 0))
    return strip


def restore_file(args: argparse.Namespace) -> dict:
    """Run the whole command; returns the numbers it prints (psnr is None without a reference)."""
    # every task flag checked before any work (the fill's default needs the checkpoint)
    build_options(TaskOptions, args, PROG, mask_fill=0.5 if args.mask_fill is None else args.mask_fill)
    for flag, name in (("--output", args.output), ("--strip", args.strip)):
        if name is not None and Path(name).suffix.lower() not in Image.registered_extensions():
            raise ValueError(f"{flag} {name}: needs an image file extension such as .png (the format follows it)")
    Image.MAX_IMAGE_PIXELS = args.max_image_pixels
    model, meta = load_model(args.checkpoint, need_energy=True)
    cfg = model.cfg
    # By default the hidden patches get the fill the energy was trained on: another one is a
    # corruption it never saw. Files that do not record it predate --mask_fill: noise.
    fill = args.mask_fill if args.mask_fill is not None else json.loads(meta.get("mask_fill", '"noise"'))
    task_options = build_options(TaskOptions, args, PROG, mask_fill=fill)
    if fill == "learned" and model.mask_fill_patch is None:
        raise ValueError(f"--mask_fill learned: {args.checkpoint} has no learned fill patch (it was not pretrained "
                         "with --mask_fill learned); give a pixel value or noise")
    trained = parse_task_weights(meta["tasks"]) if "tasks" in meta else None
    if trained is not None and TASK_ALIASES.get(args.task, args.task) not in trained:
        print(f"{PROG}: warning: {args.checkpoint} was trained on {', '.join(trained)} only, not {args.task}: "
              "expect a poor restoration", file=sys.stderr)
    zoom = args.zoom or max(1, 128 // cfg.img_size)
    if cfg.img_size * zoom > MAX_FRAME_SIDE:
        raise ValueError(f"--zoom {zoom} makes {cfg.img_size * zoom}-pixel frames; at most {MAX_FRAME_SIDE} "
                         f"(--zoom {max(1, MAX_FRAME_SIDE // cfg.img_size)} for this {cfg.img_size}-pixel model)")
    if args.task == "colorize" and cfg.in_chans != 3:
        raise ValueError(f"colorize needs a 3-channel (RGB) model; {args.checkpoint} has {cfg.in_chans} channel(s)")
    if args.mask and args.task != "inpaint":
        raise ValueError(f"--mask is for --task inpaint, not {args.task}")
    if args.corrupted and args.task == "inpaint" and not args.mask:
        raise ValueError("--corrupted --task inpaint needs --mask to say which pixels to fill")
    x, original_size = load_image(args.image, cfg.img_size, cfg.in_chans)
    mask = load_mask(args.mask, cfg.img_size, original_size) if args.mask else None
    clean = load_image(args.clean, cfg.img_size, cfg.in_chans, "clean reference")[0] if args.clean else None
    reference = clean if clean is not None else (None if args.corrupted else x)

    c = (Corrupted(x, torch.ones_like(x[:, :1]), mask) if args.corrupted
         else corrupt_image(x, args.task, cfg.patch_size, task_options, args.seed, mask))
    if c.fill_mask is not None:
        with torch.no_grad():
            c.image = model.fill_hidden(c.image, c.fill_mask)
    r = restore(model, c.image, c.update_mask, steps=args.steps, hidden=inpainting_split(model, args.task, c))
    restored = r.restored.clamp(0, 1)

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _to_image(restored[0]).save(output)
    strip_path = Path(args.strip) if args.strip else output.with_name(f"{output.stem}-strip.png")
    frames = [s[0] for s in r.steps] + ([reference[0]] if reference is not None else [])
    make_strip(frames, zoom).save(strip_path)

    result = {
        "task": args.task, "steps": len(r.steps) - 1, "energies": r.energies[:, 0].tolist(),
        "psnr_corrupted": None if reference is None else image_psnr(c.image.clamp(0, 1), reference),
        "psnr_restored": None if reference is None else image_psnr(restored, reference),
        "reference": "clean" if clean is not None else (None if reference is None else "input"),
        "output": str(output), "strip": str(strip_path),
    }
    energies = " -> ".join(f"{e:.3f}" for e in result["energies"])
    print(f"{args.task}: {cfg.img_size}x{cfg.img_size}, {result['steps']} steps, energy {energies}")
    if reference is not None:
        print(f"PSNR vs {'--clean' if clean is not None else 'the input (synthetic corruption)'}: "
              f"corrupted {result['psnr_corrupted']:.2f} dB, restored {result['psnr_restored']:.2f} dB")
    frames_text = "corrupted | steps | restored" + (" | reference" if reference is not None else "")
    print(f"wrote {output} and {strip_path} ({frames_text})")
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint-last.pth of `energyvit pretrain` or an `export --full` file")
    p.add_argument("image", help="image file (any Pillow format); center-cropped, resized to the model's size")
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--output", "-o", required=True, help="restored image (.png)")
    add(p, "--strip", default=None, help="strip image (default: OUTPUT's name + '-strip.png')")
    add(p, "--mask", default=None, help="inpaint: mask image, white = pixels to fill (default: random patches)")
    add(p, "--clean", default=None, help="clean reference image for PSNR")
    add(p, "--corrupted", action="store_true",
        help="the image is already corrupted: restore it as it is (inpaint then needs --mask)")
    add(p, "--steps", type=positive_int, default=None, help="gradient steps (default: the model's K)")
    add_options(p, TaskOptions, only=("mask_ratio", "mask_fill", "sort_fraction", "sr_factor", "noise_sigma"),
                defaults={"mask_ratio": 0.5, "mask_fill": None},
                helps={"mask_fill": "inpaint: fill of the hidden patches, a pixel value, 'noise' or 'learned' (the "
                                    "checkpoint's learned patch; default: the fill the checkpoint was trained on; "
                                    "noise for files that do not say)"})
    add(p, "--zoom", type=positive_int, default=None,
        help=f"strip enlargement (default: about 128 px per frame; frames of at most {MAX_FRAME_SIDE} px)")
    add(p, "--max_image_pixels", type=positive_int, default=Image.MAX_IMAGE_PIXELS,
        help="larger input images are refused (Pillow's guard against decompression bombs)")
    add(p, "--seed", type=int, default=0, help="seed of the synthetic corruption")


def run(args: argparse.Namespace) -> dict:
    return restore_file(args)
