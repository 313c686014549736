"""RandAugment (Cubuk et al. 2019) with Pillow, as timm configures it by a spec string such as
MAE's fine-tuning default "rand-m9-mstd0.5-inc1".

Each image gets `num_ops` operations chosen uniformly (with replacement) from 15, each applied
with probability 0.5 at a magnitude m in [0, 10] drawn as N(magnitude, magnitude_std) clipped to
[0, 10]. With f = m / 10:

- AutoContrast, Equalize, Invert: no magnitude;
- Rotate by 30 f degrees, ShearX / ShearY by 0.3 f, TranslateX / TranslateY by 0.45 f of the
  image's side: each with a random sign, bicubic, the uncovered area filled with the mean color;
- the "increasing" set (inc1), where a larger m is always a stronger change: Posterize to
  4 - int(4 f) bits, Solarize above 256 - int(256 f), SolarizeAdd int(110 f) below 128, and
  Color / Contrast / Brightness / Sharpness by a factor 1 +- 0.9 f;
- without inc1, timm's original levels: Posterize to int(4 f) bits, Solarize above int(256 f),
  and the four enhancements by a factor 1.8 f + 0.1.

Every draw comes from the torch.Generator passed in (the sample's own, seeded by its key), so an
image's augmentation is the same in any DataLoader worker and after a resume.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from PIL import Image, ImageEnhance, ImageOps

DEFAULT_SPEC = "rand-m9-mstd0.5-inc1"  # MAE's and DeiT's fine-tuning RandAugment (timm's spec)
MAX_MAGNITUDE = 10.0
OP_PROB = 0.5  # each chosen operation is applied with this probability (timm's RandAugment)
FILL = {"RGB": (124, 116, 104), "L": 128}  # ImageNet's mean color (timm's img_mean), mid-gray for gray images
_BICUBIC = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class RandAugmentSpec:
    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.0
    increasing: bool = False


def parse_spec(text: str) -> RandAugmentSpec:
    """The RandAugment of a timm-style spec: "rand" then '-'-separated parts m<magnitude>
    (0..10), n<operations>, mstd<std of the magnitude>, inc<0 or 1>; e.g. rand-m9-mstd0.5-inc1.
    ValueError naming the part that is wrong."""
    parts = text.split("-")
    if parts[0] != "rand":
        raise ValueError(f"a RandAugment spec starts with 'rand' (e.g. {DEFAULT_SPEC}), got {text!r}")
    values: dict = {}
    for part in parts[1:]:
        m = re.fullmatch(r"(mstd|inc|m|n)(\d+(?:\.\d*)?)", part)
        if m is None:
            raise ValueError(f"unknown part {part!r} in the RandAugment spec {text!r} (parts: m<magnitude>, "
                             "n<operations>, mstd<std>, inc<0|1>)")
        key, number = m.groups()
        values[key] = float(number)
    num_ops, magnitude, inc = values.get("n", 2), values.get("m", 9.0), values.get("inc", 0)
    if num_ops < 1 or num_ops != int(num_ops):
        raise ValueError(f"n (operations per image) must be a whole number >= 1 in the RandAugment spec {text!r}")
    if magnitude > MAX_MAGNITUDE:
        raise ValueError(f"m (magnitude) must be in [0, 10] in the RandAugment spec {text!r}")
    if inc not in (0, 1):
        raise ValueError(f"inc must be 0 or 1 in the RandAugment spec {text!r}")
    return RandAugmentSpec(int(num_ops), magnitude, values.get("mstd", 0.0), bool(inc))


def _lut(img: Image.Image, table: list[int]) -> Image.Image:
    """One 256-entry lookup table applied to every channel."""
    return img.point(table * len(img.getbands()))


def _affine(img: Image.Image, matrix: tuple, fill) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=_BICUBIC, fillcolor=fill)


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    return img if bits >= 8 else _lut(img, [i & ~(2 ** (8 - bits) - 1) & 255 for i in range(256)])


def _solarize(img: Image.Image, threshold: int) -> Image.Image:
    return _lut(img, [255 - i if i >= threshold else i for i in range(256)])


def _solarize_add(img: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    return _lut(img, [min(255, i + add) if i < threshold else i for i in range(256)])


# name -> (operation(img, argument, fill), argument of (f = magnitude / 10, sign) or None)
_GEOMETRY = {
    "Rotate": (lambda img, deg, fill: img.rotate(deg, resample=_BICUBIC, fillcolor=fill), lambda f, s: s * 30 * f),
    "ShearX": (lambda img, k, fill: _affine(img, (1, k, 0, 0, 1, 0), fill), lambda f, s: s * 0.3 * f),
    "ShearY": (lambda img, k, fill: _affine(img, (1, 0, 0, k, 1, 0), fill), lambda f, s: s * 0.3 * f),
    "TranslateXRel": (lambda img, t, fill: _affine(img, (1, 0, t * img.width, 0, 1, 0), fill),
                      lambda f, s: s * 0.45 * f),
    "TranslateYRel": (lambda img, t, fill: _affine(img, (1, 0, 0, 0, 1, t * img.height), fill),
                      lambda f, s: s * 0.45 * f),
}
_ENHANCE = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast, "Brightness": ImageEnhance.Brightness,
            "Sharpness": ImageEnhance.Sharpness}


def operations(increasing: bool) -> dict:
    """The 15 operations of timm's RandAugment, name -> (op(img, arg, fill), level(f, sign) or None)."""
    ops = {"AutoContrast": (lambda img, _, fill: ImageOps.autocontrast(img), None),
           "Equalize": (lambda img, _, fill: ImageOps.equalize(img), None),
           "Invert": (lambda img, _, fill: ImageOps.invert(img), None),
           "Rotate": _GEOMETRY["Rotate"]}
    if increasing:
        ops["Posterize"] = (lambda img, bits, fill: _posterize(img, bits), lambda f, s: 4 - int(4 * f))
        ops["Solarize"] = (lambda img, t, fill: _solarize(img, t), lambda f, s: 256 - int(256 * f))
    else:
        ops["Posterize"] = (lambda img, bits, fill: _posterize(img, bits), lambda f, s: int(4 * f))
        ops["Solarize"] = (lambda img, t, fill: _solarize(img, t), lambda f, s: int(256 * f))
    ops["SolarizeAdd"] = (lambda img, add, fill: _solarize_add(img, add), lambda f, s: int(110 * f))
    for name, cls in _ENHANCE.items():
        level = (lambda f, s: 1.0 + s * 0.9 * f) if increasing else (lambda f, s: 1.8 * f + 0.1)
        ops[name] = (lambda img, factor, fill, cls=cls: cls(img).enhance(factor), level)
    for name in ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        ops[name] = _GEOMETRY[name]
    return ops


class RandAugment:
    """RandAugment of a PIL image ("L" or "RGB") by `spec`, drawing from the generator it is given."""

    def __init__(self, spec: RandAugmentSpec) -> None:
        self.spec = spec
        self.ops = list(operations(spec.increasing).items())

    def __call__(self, img: Image.Image, generator: torch.Generator) -> Image.Image:
        fill = FILL.get(img.mode, 128)
        for _ in range(self.spec.num_ops):  # four draws per operation, whether it is applied or not
            index = int(torch.randint(len(self.ops), (1,), generator=generator))
            apply, sign_draw = torch.rand(2, generator=generator).tolist()
            noise = float(torch.randn(1, generator=generator))
            if apply >= OP_PROB:
                continue
            magnitude = min(MAX_MAGNITUDE, max(0.0, self.spec.magnitude + self.spec.magnitude_std * noise))
            op, level = self.ops[index][1]
            arg = level(magnitude / MAX_MAGNITUDE, -1.0 if sign_draw < 0.5 else 1.0) if level is not None else None
            img = op(img, arg, fill)
        return img

    def __repr__(self) -> str:
        return f"RandAugment({self.spec})"
