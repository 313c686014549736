"""Pretext tasks: corruptions of clean images in pixel space ([0, 1] per channel).

Each task maps a clean batch (B, C, H, W) to a `Corrupted`: the corrupted image, the region the
loss covers, the region restoration may change and, for sparse restoration (mim with
restore_fraction < 1), the patches that enter the network; for mim with a learned fill, where
the model's fill patch goes; for denoise with inverse-variance weighting, each image's loss
weight. Masks are float {0, 1} of shape (B, 1, H, W). All randomness comes from the `generator`
argument, so a seed reproduces a corruption.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from energyvit.options import OptionError, check_fields, half_open_unit, open_unit, option

# Rec. 601 luma weights, the usual RGB -> grayscale conversion.
LUMA_RGB = (0.299, 0.587, 0.114)


@dataclass
class Corrupted:
    image: Tensor
    loss_mask: Tensor  # 1 where the restoration loss is computed
    update_mask: Tensor | None  # 1 where restoration may change pixels; None: everywhere
    # (B, n) indices of the patches that enter the energy, in patch order, the same n for every
    # image; None: every patch (EnergyViT.forward's `keep`)
    keep: Tensor | None = None
    # 1 where the model's learned fill patch goes (mim with mask_fill 'learned'; `image` holds NaN
    # there until EnergyViT.fill_hidden fills it, so a path that forgets it fails loudly); None: no
    # learned fill
    fill_mask: Tensor | None = None
    # (B,) weight of each image's restoration loss (denoise's inverse-variance weighting); None: 1
    loss_weight: Tensor | None = None
    # (B, h) indices of the hidden patches, in patch order (mim with every patch entering): the
    # split of a model whose encoder reads only the visible ones (EnergyViT.split_energy)
    hidden: Tensor | None = None

    def to(self, device: torch.device | str) -> Corrupted:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Corrupted(move(self.image), move(self.loss_mask), move(self.update_mask), move(self.keep),
                         move(self.fill_mask), move(self.loss_weight), move(self.hidden))


def _check_images(x: Tensor, patch_size: int | None = None) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (batch, channels, height, width), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected floating-point images, got dtype {x.dtype}")
    if patch_size is not None and (x.shape[2] % patch_size or x.shape[3] % patch_size):
        raise ValueError(f"image size {tuple(x.shape[2:])} is not a multiple of patch_size {patch_size}")


def _full_mask(x: Tensor) -> Tensor:
    return x.new_ones(x.shape[0], 1, *x.shape[2:])


def _patch_mask_to_pixels(patch_mask: Tensor, grid_h: int, grid_w: int, patch_size: int) -> Tensor:
    """(B, L) patch mask -> (B, 1, H, W) pixel mask."""
    m = patch_mask.view(-1, 1, grid_h, grid_w)
    return m.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def _random_patch_order(batch: int, num_patches: int, generator, device) -> Tensor:
    """A random permutation (B, num_patches) of the patch indices of each image."""
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    return noise.argsort(dim=1)


def _random_patch_choice(batch: int, num_patches: int, num_chosen: int, generator, device) -> Tensor:
    """Indices (B, num_chosen) of distinct random patches per image."""
    return _random_patch_order(batch, num_patches, generator, device)[:, :num_chosen]


def mim_patch_counts(num_patches: int, mask_ratio: float, restore_fraction: float = 1.0) -> tuple[int, int]:
    """(hidden, restored): how many of `num_patches` patches mim hides in each image, and how many
    of those enter the network and are restored (restore_fraction of them, at least 1). The
    patches entering the network are the num_patches - hidden visible ones plus the restored."""
    hidden = max(1, round(mask_ratio * num_patches))
    return hidden, hidden if restore_fraction >= 1 else max(1, round(restore_fraction * hidden))


class MaskedImageModeling:
    """Hide a random `mask_ratio` of patches, filled with a constant, uniform noise or ('learned')
    the model's learned fill patch: that one is put in where the model is at hand
    (EnergyViT.fill_hidden on `Corrupted.fill_mask`); it draws nothing, so a seed hides the same
    patches as with a constant fill.

    restore_fraction < 1 (sparse restoration): only that fraction of each image's hidden patches
    enters the network, with every visible patch (`Corrupted.keep`); the others are dropped from
    the token sequence, as MAE drops hidden patches, and stay as they are. The update and loss
    masks cover the restored hidden patches only. Which hidden patches are restored is the start
    of the same random order that chose the hidden ones: no further draw from the generator, so
    the hidden patches (and any later draw) are those of restore_fraction = 1 under the same seed.
    """

    name = "mim"

    def __init__(self, patch_size: int, mask_ratio: float = 0.75, fill: str | float = 0.5,
                 restore_fraction: float = 1.0) -> None:
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if not (fill in ("noise", "learned") or isinstance(fill, (int, float))):
            raise ValueError(f"mask fill must be 'noise', 'learned' or a number, got {fill!r}")
        if not 0 < restore_fraction <= 1:  # also refuses NaN
            raise ValueError(f"restore_fraction must be in (0, 1], got {restore_fraction}")
        self.patch_size, self.mask_ratio, self.fill = patch_size, mask_ratio, fill
        self.restore_fraction = restore_fraction

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Corrupted:
        _check_images(x, self.patch_size)
        B, _, H, W = x.shape
        gh, gw = H // self.patch_size, W // self.patch_size
        num_masked, num_restored = mim_patch_counts(gh * gw, self.mask_ratio, self.restore_fraction)
        order = _random_patch_order(B, gh * gw, generator, x.device)
        chosen = order[:, :num_masked]
        patch_mask = torch.zeros(B, gh * gw, device=x.device, dtype=x.dtype).scatter_(1, chosen, 1.0)
        mask = _patch_mask_to_pixels(patch_mask, gh, gw, self.patch_size)
        fill_mask = None
        if self.fill == "learned":
            image, fill_mask = x.masked_fill(mask > 0, math.nan), mask
        else:
            if self.fill == "noise":
                fill = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            else:
                fill = torch.full_like(x, float(self.fill))
            image = x * (1 - mask) + fill * mask
        if num_restored == num_masked:
            return Corrupted(image, mask, mask, fill_mask=fill_mask, hidden=chosen.sort(dim=1).values)
        # the first num_restored hidden patches of the order are restored; the rest are dropped
        restored = torch.zeros_like(patch_mask).scatter_(1, order[:, :num_restored], 1.0)
        region = _patch_mask_to_pixels(restored, gh, gw, self.patch_size)
        keep = torch.cat([order[:, :num_restored], order[:, num_masked:]], dim=1).sort(dim=1).values
        return Corrupted(image, region, region, keep, fill_mask)


class PatchSort:
    """Shuffle a random `fraction` of patches among their own positions; every chosen patch moves."""

    name = "sort"

    def __init__(self, patch_size: int, fraction: float = 0.25) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"sort fraction must be in (0, 1], got {fraction}")
        self.patch_size, self.fraction = patch_size, fraction

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Corrupted:
        _check_images(x, self.patch_size)
        B, C, H, W = x.shape
        p, gh, gw = self.patch_size, H // self.patch_size, W // self.patch_size
        L = gh * gw
        num_moved = max(2, round(self.fraction * L)) if L >= 2 else 0
        # (B, L, C*p*p) patches
        patches = x.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, L, C * p * p)
        chosen = _random_patch_choice(B, L, num_moved, generator, x.device)
        # A cyclic shift of a randomly ordered set moves every member (no fixed points).
        source = chosen.roll(1, dims=1)
        moved = patches.clone()
        moved.scatter_(1, chosen[..., None].expand(-1, -1, patches.shape[2]),
                       patches.gather(1, source[..., None].expand(-1, -1, patches.shape[2])))
        image = moved.reshape(B, gh, gw, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
        patch_mask = torch.zeros(B, L, device=x.device, dtype=x.dtype).scatter_(1, chosen, 1.0)
        mask = _patch_mask_to_pixels(patch_mask, gh, gw, p)
        return Corrupted(image, mask, mask)


class SuperResolution:
    """Average-pool down by `factor`, then bilinear back up: restoration adds the lost detail."""

    name = "sr"

    def __init__(self, factor: int = 2) -> None:
        if factor not in (2, 4):
            raise ValueError(f"super-resolution factor must be 2 or 4, got {factor}")
        self.factor = factor

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Corrupted:
        _check_images(x, self.factor)
        low = F.avg_pool2d(x, self.factor)
        up = F.interpolate(low, size=x.shape[2:], mode="bilinear", align_corners=False)
        return Corrupted(up, _full_mask(x), None)


class Denoise:
    """Add Gaussian noise of standard deviation `sigma` (pixel units).

    sigma a range (lo, hi): each image's sigma is drawn log-uniformly in [lo, hi] (the geometric
    spread of noise levels of denoising score matching, NCSN), after the noise itself and from the
    same generator, so a seed gives the noise of a single sigma, scaled per image. inverse_variance:
    each image's loss weight is 1 / sigma^2 over its mean on the range (the weights average 1).
    """

    name = "denoise"

    def __init__(self, sigma: float | tuple[float, float] = 0.2, inverse_variance: bool = False) -> None:
        if isinstance(sigma, tuple):
            if len(sigma) != 2 or not 0 < sigma[0] < sigma[1]:
                raise ValueError(f"a noise sigma range (lo, hi) needs 0 < lo < hi, got {sigma}")
        elif not sigma > 0:
            raise ValueError(f"noise sigma must be > 0, got {sigma}")
        elif inverse_variance:
            raise ValueError("inverse-variance loss weights need a range of noise levels, not one sigma")
        self.sigma, self.inverse_variance = sigma, inverse_variance

    def draw_sigmas(self, batch: int, generator: torch.Generator | None, device=None, dtype=None) -> Tensor:
        """(batch,) noise levels, log-uniform in the range: lo * (hi / lo) ** U(0, 1)."""
        lo, hi = self.sigma
        return lo * (hi / lo) ** torch.rand(batch, generator=generator, device=device, dtype=dtype)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Corrupted:
        _check_images(x)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if not isinstance(self.sigma, tuple):
            return Corrupted(x + self.sigma * noise, _full_mask(x), None)
        sigma = self.draw_sigmas(x.shape[0], generator, x.device, x.dtype)
        weight = None
        if self.inverse_variance:
            lo, hi = self.sigma  # E[1 / sigma^2] over the log-uniform range: (lo^-2 - hi^-2) / (2 ln(hi / lo))
            weight = sigma.pow(-2) * (2 * math.log(hi / lo) / (lo ** -2 - hi ** -2))
        return Corrupted(x + sigma.view(-1, 1, 1, 1) * noise, _full_mask(x), None, loss_weight=weight)


class Colorize:
    """Replace RGB by its luma in every channel: restoration brings the color back."""

    name = "colorize"

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Corrupted:
        _check_images(x)
        if x.shape[1] != 3:
            raise ValueError(f"colorization needs 3-channel RGB images, got {x.shape[1]} channel(s)")
        w = torch.tensor(LUMA_RGB, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        gray = (x * w).sum(dim=1, keepdim=True).expand_as(x)
        return Corrupted(gray.contiguous(), _full_mask(x), None)


def _mask_fill(text: str) -> str | float:
    """--mask_fill: 'noise', 'learned' or a number."""
    if text in ("noise", "learned"):
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"must be 'noise', 'learned' or a number, got {text!r}") from None


def _fill_rule(value) -> str | None:
    return None if value in ("noise", "learned") or (isinstance(value, (int, float)) and 0 <= value <= 1) else \
        "'noise', 'learned' or a pixel value in [0, 1]"


SIGMA_REQUIREMENT = "> 0, or a range LO:HI with 0 < LO < HI"


def noise_levels(value: float | str) -> float | tuple[float, float]:
    """--noise_sigma's value as Denoise takes it: one sigma, or (LO, HI) of the text 'LO:HI';
    ValueError for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(value) and value > 0:
            return float(value)
    elif isinstance(value, str) and value.count(":") == 1:
        try:
            lo, hi = (float(v) for v in value.split(":"))
        except ValueError:
            pass
        else:
            if math.isfinite(hi) and 0 < lo < hi:
                return lo, hi
    raise ValueError(f"must be {SIGMA_REQUIREMENT}, got {value!r}")


def _noise_sigma(text: str) -> float | str:
    """--noise_sigma: a number, or the text of a range LO:HI (the rule checks it)."""
    try:
        return float(text)
    except ValueError:
        return text.strip()


def _sigma_rule(value) -> str | None:
    try:
        noise_levels(value)
    except ValueError:
        return SIGMA_REQUIREMENT
    return None


@dataclass(frozen=True)
class TaskOptions:
    """The pretext tasks of a run: which ones (a weighted mixture) and each task's option."""

    tasks: str = option("mim", "task mixture name:weight,... from mim (alias inpaint), sort, sr, denoise, colorize; "
                        "one task is sampled per batch by weight", metavar="SPEC")
    mask_ratio: float = option(0.75, "mim: fraction of patches hidden", rule=open_unit)
    mask_fill: str | float = option(0.5, "mim: fill hidden patches with a constant pixel value, uniform noise "
                                    "('noise') or a learnable pixel patch ('learned': a model parameter, mid-gray at "
                                    "init, trained through the restoration, not clamped; the energy method only)",
                                    parse=_mask_fill, rule=_fill_rule)
    sort_fraction: float = option(0.25, "sort: fraction of patches shuffled among themselves", rule=half_open_unit)
    sr_factor: int = option(2, "sr: average-pool down by this factor, bilinear back up", choices=(2, 4))
    noise_sigma: float | str = option(0.2, "denoise: Gaussian sigma in pixel units, or a range LO:HI: each image's "
                                      "sigma drawn log-uniformly in it (denoising score matching over noise levels, "
                                      "as NCSN; at K = 1, -a_1 dE/dx then approximates sigma^2 times the score at the "
                                      "image's level, one learned a_1 serving every level: docs/results.md)",
                                      parse=_noise_sigma, rule=_sigma_rule, metavar="SIGMA|LO:HI")
    noise_loss_weight: str = option("none", "denoise with a sigma range: weight each image's loss by 1 (none) or by "
                                    "1/sigma^2 normalized to mean 1 over the range (inverse_variance: NCSN's "
                                    "lambda(sigma) = sigma^2, every level counts alike)",
                                    choices=("none", "inverse_variance"))
    restore_fraction: float = option(1.0, "mim: sparse restoration, the fraction of each image's hidden patches that "
                                     "enter the network with the visible ones and are restored (and scored); the "
                                     "others are dropped from the token sequence, as MAE drops hidden patches "
                                     "(1: every patch enters; below 1 needs --tasks mim alone)",
                                     rule=half_open_unit)

    def __post_init__(self) -> None:
        check_fields(self)
        weights = self.weights()  # refuse a malformed mixture now, not at the first batch
        if self.restore_fraction < 1 and set(weights) != {"mim"}:
            raise OptionError("restore_fraction", self.restore_fraction,
                              f"1 with --tasks {self.tasks} (below 1 it needs --tasks mim alone: only mim hides "
                              "patches to drop)")
        if self.mask_fill == "learned" and "mim" not in weights:
            raise OptionError("mask_fill", self.mask_fill, f"a constant or 'noise' with --tasks {self.tasks} (learned "
                              "fills mim's hidden patches: it needs mim among the tasks)")
        if self.noise_loss_weight != "none" and not isinstance(noise_levels(self.noise_sigma), tuple):
            raise OptionError("noise_loss_weight", self.noise_loss_weight,
                              f"none with one --noise_sigma {self.noise_sigma} (it weights a range LO:HI of levels)")

    def weights(self) -> dict[str, float]:
        """'mim:0.5,denoise:0.25,sr' -> {'mim': 0.5, 'denoise': 0.25, 'sr': 1.0}."""
        return parse_task_weights(self.tasks)


# name -> the task built from the options and the patch size. A new task is a class above, its
# option as a TaskOptions field and one entry here; the flags follow from TaskOptions.
TASKS: dict[str, Callable[[TaskOptions, int], Callable]] = {
    "mim": lambda o, patch: MaskedImageModeling(patch, o.mask_ratio, o.mask_fill, o.restore_fraction),
    "sort": lambda o, patch: PatchSort(patch, o.sort_fraction),
    "sr": lambda o, patch: SuperResolution(o.sr_factor),
    "denoise": lambda o, patch: Denoise(noise_levels(o.noise_sigma), o.noise_loss_weight == "inverse_variance"),
    "colorize": lambda o, patch: Colorize(),
}
TASK_NAMES = tuple(TASKS)
TASK_ALIASES = {"inpaint": "mim"}


def build_task(name: str, patch_size: int, options: TaskOptions | None = None, **overrides):
    """A task by name (`inpaint` is mim) with the given options, or TaskOptions(**overrides)."""
    key = TASK_ALIASES.get(name, name)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASK_NAMES)}")
    options = options if options is not None else TaskOptions(**overrides)
    if key != "mim" and options.restore_fraction < 1:
        raise ValueError(f"restore_fraction {options.restore_fraction} is for the mim task only, not {name}")
    return TASKS[key](options, patch_size)


def parse_task_weights(spec: str) -> dict[str, float]:
    """'mim:0.5,denoise:0.25,sr:0.25' -> {'mim': 0.5, ...}; a bare name has weight 1."""
    weights: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, w = item.partition(":")
        name = TASK_ALIASES.get(name.strip(), name.strip())
        if name not in TASK_NAMES:
            raise OptionError("tasks", spec, f"a mixture of {', '.join(TASK_NAMES)} (unknown task {name!r})")
        if name in weights:
            raise OptionError("tasks", spec, f"a mixture naming each task once ({name!r} appears twice)")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise OptionError("tasks", spec, f"a mixture with numeric weights ({w!r} for {name!r})") from None
        if not (math.isfinite(weight) and weight > 0):
            raise OptionError("tasks", spec, f"a mixture with finite weights > 0 ({w!r} for {name!r})")
        weights[name] = weight
    if not weights:
        raise OptionError("tasks", spec, "a mixture such as 'mim:0.5,denoise:0.25,sr:0.25'")
    return weights


class TaskMixture:
    """Samples one task per batch with probability proportional to its weight."""

    def __init__(self, tasks: dict, weights: dict[str, float]) -> None:
        self.tasks = tasks
        self.names = list(weights)
        self.probs = torch.tensor([weights[n] for n in self.names], dtype=torch.float64)
        self.probs /= self.probs.sum()

    def sample(self, generator: torch.Generator | None = None) -> str:
        return self.names[int(torch.multinomial(self.probs, 1, generator=generator))]

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[str, Corrupted]:
        name = self.sample(generator)
        return name, self.tasks[name](x, generator)


def build_mixture(options: TaskOptions | str, patch_size: int, in_chans: int) -> TaskMixture:
    """The task mixture of `options` (or of a spec like 'mim:0.5,denoise:0.25,sr:0.25' with
    default task options) for images of `in_chans` channels."""
    if isinstance(options, str):
        options = TaskOptions(tasks=options)
    weights = options.weights()
    if "colorize" in weights and in_chans != 3:
        raise OptionError("tasks", options.tasks, f"without colorize for {in_chans}-channel data (it needs RGB)")
    return TaskMixture({n: build_task(n, patch_size, options) for n in weights}, weights)
