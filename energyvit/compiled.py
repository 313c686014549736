"""torch.compile of the training step and of inference restoration, with exact second derivatives.

Training backpropagates a loss through K restoration steps x <- x - a_k dE/dx, so it needs the
second derivatives of E. ``torch.compile(model)`` followed by ``autograd.grad(..., create_graph=True)``
fails ("aot_autograd does not currently support double backward"). What works is compiling the
*whole* step: with ``torch._dynamo.config.trace_autograd_ops`` set, Dynamo traces both
``torch.autograd.grad`` calls -- the inner one (dE/dx, create_graph=True) and the outer one
(d loss / d parameters) -- into one graph, and AOTAutograd/Inductor compile a single graph that
already contains every first- and second-order term. See docs/compile.md.

- ``compiled_train_step(model, opts, generator)`` returns ``step_fn(clean, corrupted, generator=None)
  -> loss`` for the energy method's micro-batch loss. One compiled region (fullgraph=True: a graph
  break is an error, never a silent split) runs the unrolled restoration (``restore.descend``, the
  same loop as eager training), the loss and the parameter gradients, and returns the detached loss and the gradients. The loss is then re-attached to
  the parameters by a small autograd node whose backward hands out exactly those gradients
  (times the incoming gradient), so the caller's ``loss.backward()`` fills ``p.grad`` as the
  eager step does; clipping, accumulation and the optimizer are unchanged. (Returning a
  differentiable loss and letting the caller's backward differentiate the compiled graph also
  gives exact gradients, but compiled about 8x slower in our measurement.)
- Langevin noise is drawn eagerly from the caller's generator before the compiled call, in the
  order ``restore`` draws it, so a seeded run uses the same noise as the eager one (Dynamo
  cannot trace a ``torch.Generator``).
- A task without an update mask (None) gets an all-ones mask, and the loss region is always a
  tensor (all ones for ``region="all"``): ``delta * 1`` is exact, the masked mean equals the mean
  up to rounding, and every task of a mixture runs in the same graph.
- Sparse restoration (a task's ``Corrupted.keep``: the patches that enter, e.g. mim with
  ``--restore_fraction`` < 1) is one more static input, (batch, n) indices: n is fixed by the
  task's options, so one graph serves every step; padding rows copy the first row's indices.
- A learned fill (``--mask_fill learned``) is put into the hidden patches inside the compiled
  region (``objective.fill_mask``: an all-zero mask for a task that hides nothing), so the fill
  patch gets its gradient from the same graph; the per-image loss weights are always a tensor
  (ones where the task gives none: ``err * 1`` is exact), so every task of a mixture shares a graph.
- A model with encoder_input "visible" splits on the mim task's hidden patches (``Corrupted.hidden``,
  (batch, H) indices, one more static input, padded as ``keep``) as ``objective.task_loss`` does:
  the encoder runs once on the visible patches inside the compiled region
  (``restore.VisibleEncoderEnergy``), each step the energy head alone.
- ``compiled_restore(model)`` compiles inference restoration (``restore.descend`` with first-order
  dE/dx only) and returns the same ``Restoration`` as ``restore.restore``.
- The images enter the compiled region already requiring grad (made so outside it):
  ``requires_grad_`` inside the region is refused by Dynamo on torch 2.11.

Batch-size changes. Dynamo's dynamic shapes do not help here: on torch 2.13 the graph with the
traced autograd.grad stayed specialized to its batch size even with ``dynamic=True`` (and with
automatic dynamic shapes), so every new size recompiled (tens of seconds on CPU each) and the 9th
would hit Dynamo's recompile limit, a hard error under fullgraph. So graphs are compiled static
(``dynamic=False``), and a batch *smaller* than the largest one compiled so
far is padded to that size with copies of its first image that carry zero loss weight, and the
outputs of the padding rows are dropped. This is exact because E is a per-image function (no
batch statistics anywhere in the model) and the loss is a masked sum divided by the mask's sum:
the padding rows contribute exactly zero to the loss and to every gradient; only the summation
order of some reductions changes (rounding-level differences). A *larger* batch compiles one new
graph for that size. At most ``max_graphs`` (default 4) sizes are compiled; a call beyond that
runs eagerly (exact, slower) with one warning. ``pad_batches=False`` turns padding off (then each
new size recompiles, still capped by ``max_graphs``).

Versions and fallback. Needs ``torch._dynamo.config.trace_autograd_ops`` (added during the torch
2.11 cycle; verified here on 2.13). Without it, or when compilation fails, the step runs eagerly
with one warning. Because early versions of that feature had bugs that dropped or mis-traced
gradients, the first compiled step is by default checked against the same step run eagerly; a
mismatch also falls back to eager with a warning. Nothing here special-cases the attention
backend: any op with autograd formulas to second order (aten, or the ``energyvit::attn_*``
custom ops) is traced the same way.
"""
from __future__ import annotations

import types
import warnings

import torch
from torch import Tensor

from energyvit.losses import restoration_loss
from energyvit.model import EnergyViT
from energyvit.objective import EnergyOptions, energy_contrast, entering_patches, fill_mask, task_loss
from energyvit.restore import Restoration, VisibleEncoderEnergy, bind_keep, check_restore_inputs, \
    check_second_order, check_split, descend, draw_noise, restore
from energyvit.tasks import Corrupted

_WARNED: set[str] = set()

# Relative tolerance (norm of the gradient vector) of the first-step check, per dtype. A dropped
# second-order term changes the gradients by O(1) relative, far above these.
_VERIFY_RTOL = {torch.float64: 1e-9, torch.float32: 1e-3}
_VERIFY_RTOL_DEFAULT = 3e-2  # half precisions

# Errors that mean "this torch cannot compile it": fall back to eager instead of failing.
_COMPILE_ERRORS = tuple(
    cls for cls in (getattr(torch._dynamo.exc, "TorchDynamoException", None),
                    getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", None))
    if cls is not None
)


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def compile_support() -> tuple[bool, str]:
    """(supported, reason): whether this torch can trace autograd.grad inside torch.compile."""
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        return False, (f"torch {torch.__version__} has no torch._dynamo.config.trace_autograd_ops, "
                       "needed to compile a step that calls autograd.grad (torch >= 2.11; verified on 2.13)")
    return True, ""


def _trace_autograd():
    """Context in which Dynamo traces torch.autograd.grad (scoped: no global config change)."""
    return torch._dynamo.config.patch(trace_autograd_ops=True)


def _count_graphs(fn) -> int:
    """Compiled variants (cache entries) Dynamo holds for `fn`'s code; -1 if it cannot tell."""
    try:
        return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__))
    except Exception:  # a private helper: absent or changed in other torch versions
        return -1


def _own_code(method):
    """`method` over a private copy of its code object. Dynamo keeps compiled graphs (and counts
    recompiles against its limit) per code object; a copy per instance keeps two step functions
    (other options, another model) from sharing, or exhausting, one cache."""
    f = method.__func__
    own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(own, method.__self__)


def _full_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    return x.new_ones(x.shape[0], 1, *x.shape[2:]) if mask is None else mask


def _pad(t: Tensor | None, n: int, dim: int = 0, zeros: bool = False) -> Tensor | None:
    """`t` grown to n rows along `dim` with copies of its first row (or zeros)."""
    if t is None or t.shape[dim] == n:
        return t
    first = t.narrow(dim, 0, 1)
    fill = torch.zeros_like(first) if zeros else first
    return torch.cat([t, fill.expand(*(n - t.shape[dim] if d == dim else -1 for d in range(t.ndim)))], dim=dim)


def _plain(*tensors):
    """The tensors, each its own storage and not a view (cloned where needed; masks and images are
    small). Dynamo guards on aliasing between inputs and on the base of view inputs, so e.g. the
    `mim` task (whose loss and update masks are one tensor) would otherwise get a graph of its own."""
    seen, out = set(), []
    for t in tensors:
        if isinstance(t, Tensor):
            if t._base is not None or t.untyped_storage().data_ptr() in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        out.append(t)
    return tuple(out)


def _trainable(model: EnergyViT) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


class _AttachGrads(torch.autograd.Function):
    """A detached loss -> the same value, whose backward gives each parameter its given gradient.

    First order only (once_differentiable): differentiating the returned loss twice raises.
    """

    @staticmethod
    def forward(ctx, loss, n, *params_and_grads):
        ctx.grads = params_and_grads[n:]
        return loss.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        # one foreach op for all parameters, not one multiply each (a kernel launch each on a GPU)
        given = [g for g in ctx.grads if g is not None]
        scaled = iter(torch._foreach_mul(given, grad_out) if given else [])
        grads = [None if g is None else next(scaled) for g in ctx.grads]
        return (None, None, *grads, *([None] * len(grads)))


class _BatchSizes:
    """Which batch size a call runs at: pad up to the largest compiled size, compile a larger one
    (at most `max_graphs` sizes), or None: run this call eagerly."""

    def __init__(self, pad: bool, max_graphs: int) -> None:
        self.pad, self.max_graphs, self.compiled = pad, max_graphs, set()

    def target(self, batch: int) -> int | None:
        if batch in self.compiled:
            return batch
        if self.pad and self.compiled and batch < max(self.compiled):
            return max(self.compiled)
        return batch if len(self.compiled) < self.max_graphs else None


class CompiledTrainStep:
    """step_fn(clean, corrupted) -> loss whose parameter gradients come from one compiled graph.

    Use as ``EnergyMethod(...).step_loss(step_fn=CompiledTrainStep(model, opts))``; the caller
    runs ``loss.backward()`` as usual. ``mode`` is "compiled", or "eager" after a fallback;
    ``compiled_graphs()`` counts the graphs compiled so far.
    """

    def __init__(self, model: EnergyViT, opts: EnergyOptions = EnergyOptions(), generator: torch.Generator | None = None,
                 verify_first_step: bool = True, pad_batches: bool = True, max_graphs: int = 4,
                 **compile_kwargs) -> None:
        self.model, self.opts, self.generator = model, opts, generator
        self.verify_first_step = verify_first_step
        self.steps = model.cfg.restore_steps
        self.sizes = _BatchSizes(pad_batches, max_graphs)
        ok, reason = compile_support()
        self.mode = "compiled" if ok else "eager"
        self.verified = False
        if not ok:
            _warn_once("support", f"energyvit compile: {reason}; training runs eagerly")
        compile_kwargs.setdefault("fullgraph", True)
        compile_kwargs.setdefault("dynamic", False)  # see "Batch-size changes" above
        self._traced = _own_code(self._loss_and_grads)
        self._compiled = torch.compile(self._traced, **compile_kwargs)

    def compiled_graphs(self) -> int:
        return _count_graphs(self._traced)

    def _split(self, corrupted: Corrupted) -> Tensor | None:
        """The hidden patches the step splits on (task_loss's rule), else None."""
        return corrupted.hidden if self.model.cfg.encoder_input == "visible" else None

    def _loss_and_grads(self, clean: Tensor, image: Tensor, update_mask: Tensor, region: Tensor,
                        noise: Tensor | None, keep: Tensor | None, fill: Tensor | None, weight: Tensor,
                        hidden: Tensor | None):
        """The compiled function: unrolled restoration, loss and d loss / d params in one graph."""
        energy_fn = bind_keep(self.model, keep)
        if fill is not None:  # the learned fill, in the graph: its patch gets a gradient like the others
            image = self.model.fill_hidden(image, fill)
        if hidden is not None:
            energy_fn = VisibleEncoderEnergy(self.model, image, hidden, grad=True)
            update_mask = energy_fn.restrict(update_mask)
        restored, _, _ = descend(energy_fn, image, self.model.step_sizes[: self.steps], update_mask, noise,
                                 self.opts.langevin_std, create_graph=True)
        norm_pix_patch = self.model.cfg.patch_size if self.opts.norm_pix_loss else None
        loss = restoration_loss(restored, clean, region, norm_pix_patch, weight)
        if self.opts.contrast_weight:
            negative = image if self.opts.contrast_negative == "corrupted" else restored
            real = (region.flatten(1).amax(dim=1) > 0).to(region.dtype)  # padding rows have an all-zero region
            loss = loss + self.opts.contrast_weight * energy_contrast(energy_fn, clean, negative, self.opts,
                                                                      entering_patches(self.model, keep), real)
        grads = torch.autograd.grad(loss, _trainable(self.model), allow_unused=True)
        return loss.detach(), grads

    def _args(self, clean: Tensor, corrupted: Corrupted, noise: Tensor | None, n: int) -> tuple:
        """Inputs of _loss_and_grads at batch size n (>= the real batch; padding rows weigh 0)."""
        image = corrupted.image
        update_mask = _full_mask(image, corrupted.update_mask)
        region = corrupted.loss_mask if self.opts.loss_region == "corrupted" else torch.ones_like(update_mask)
        weight = corrupted.loss_weight if corrupted.loss_weight is not None else image.new_ones(image.shape[0])
        clean, image, update_mask, region, noise, keep, fill, weight, hidden = _plain(
            _pad(clean, n), _pad(image, n), _pad(update_mask, n), _pad(region, n, zeros=True),
            _pad(noise, n, dim=1, zeros=True), _pad(corrupted.keep, n), _pad(fill_mask(self.model, corrupted), n),
            _pad(weight, n, zeros=True), _pad(self._split(corrupted), n))
        return clean, image.detach().requires_grad_(True), update_mask, region, noise, keep, fill, weight, hidden

    def _attach(self, loss: Tensor, grads) -> Tensor:
        params = _trainable(self.model)
        return _AttachGrads.apply(loss, len(params), *params, *grads)

    def _eager_call(self, clean, corrupted, noise) -> Tensor:
        """This call eagerly, on the noise already drawn (the generator has moved on)."""
        return self._attach(*self._loss_and_grads(*self._args(clean, corrupted, noise, clean.shape[0])))

    def _fallback(self, why: str, clean, corrupted, noise) -> Tensor:
        _warn_once("fallback", f"energyvit compile: {why}; training continues eagerly")
        self.mode = "eager"
        return self._eager_call(clean, corrupted, noise)

    def __call__(self, clean: Tensor, corrupted: Corrupted, generator: torch.Generator | None = None) -> Tensor:
        """generator, if given, replaces the constructor's for this call (a per-step seeded one)."""
        generator = generator if generator is not None else self.generator
        if self.mode == "eager":
            return task_loss(self.model, clean, corrupted, self.opts, generator)
        image = corrupted.image
        self.model.check_input(image)  # user errors raise here, outside the compiled region
        self.model.check_keep(corrupted.keep, image.shape[0])
        if self._split(corrupted) is not None:
            check_split(self.model, corrupted.hidden, image.shape[0])
        if clean.shape != image.shape:
            raise ValueError(f"clean {tuple(clean.shape)} and corrupted {tuple(image.shape)} differ in shape")
        batch = image.shape[0]
        noise = draw_noise(image, self.steps, self.opts.langevin_std, generator)
        n = self.sizes.target(batch)
        if n is None:
            _warn_once("sizes", f"energyvit compile: batch size {batch} is beyond the {self.sizes.max_graphs} "
                       "compiled sizes; such batches run eagerly")
            return self._eager_call(clean, corrupted, noise)
        args = self._args(clean, corrupted, noise, n)
        try:
            with _trace_autograd():
                loss, grads = self._compiled(*args)
        except _COMPILE_ERRORS as e:
            return self._fallback(f"compiling the training step failed ({type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})", clean, corrupted, noise)
        self.sizes.compiled.add(n)
        if not self.verified and self.verify_first_step:
            mismatch = self._check_against_eager(args, loss, grads)
            if mismatch:
                return self._fallback(f"compiled gradients differ from eager ({mismatch})", clean, corrupted, noise)
        self.verified = True
        return self._attach(loss, grads)

    def _check_against_eager(self, args, loss: Tensor, grads) -> str:
        """'' if the compiled loss and gradients match the same step run eagerly, else why not."""
        ref_loss, ref_grads = self._loss_and_grads(*args)
        if [g is None for g in grads] != [g is None for g in ref_grads]:
            return "a different set of parameters received gradients"
        rtol = _VERIFY_RTOL.get(loss.dtype, _VERIFY_RTOL_DEFAULT)
        flat = torch.cat([g.flatten().double() for g in grads if g is not None])
        ref = torch.cat([g.flatten().double() for g in ref_grads if g is not None])
        err = ((flat - ref).norm() / ref.norm().clamp_min(1e-300)).item()
        loss_err = abs(loss.item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-300)
        if not (err <= rtol and loss_err <= rtol):  # also catches NaN
            return f"relative error {err:.2e} in the gradients, {loss_err:.2e} in the loss; tolerance {rtol:.0e}"
        return ""


def compiled_train_step(model: EnergyViT, opts: EnergyOptions = EnergyOptions(), generator: torch.Generator | None = None,
                        **kwargs) -> CompiledTrainStep:
    """A compiled ``step_fn(clean, corrupted, generator=None) -> loss`` for ``methods.EnergyMethod.step_loss``.

    generator: the training generator; as in the eager step it is used only for Langevin noise.
    kwargs: verify_first_step (True), pad_batches (True), max_graphs (4), and torch.compile's
    arguments (fullgraph=True by default).
    """
    check_second_order(model)
    return CompiledTrainStep(model, opts, generator, **kwargs)


class CompiledRestore:
    """Inference restoration, as ``restore(model, corrupted, update_mask, steps, noise_std=..., generator=...)``
    with create_graph=False, in one compiled graph. Batch sizes are handled as in CompiledTrainStep."""

    def __init__(self, model: EnergyViT, pad_batches: bool = True, max_graphs: int = 4, **compile_kwargs) -> None:
        self.model = model
        self.sizes = _BatchSizes(pad_batches, max_graphs)
        ok, reason = compile_support()
        self.mode = "compiled" if ok else "eager"
        if not ok:
            _warn_once("support-restore", f"energyvit compiled restore: {reason}; restoring eagerly")
        compile_kwargs.setdefault("fullgraph", True)
        compile_kwargs.setdefault("dynamic", False)
        self._traced = _own_code(self._restore)
        self._compiled = torch.compile(self._traced, **compile_kwargs)

    def compiled_graphs(self) -> int:
        return _count_graphs(self._traced)

    def _restore(self, x: Tensor, update_mask: Tensor, noise: Tensor | None, noise_std: float, steps: int):
        """The compiled function: inference restoration; x requires grad (see the module docstring)."""
        _, trajectory, energies = descend(self.model, x, self.model.step_sizes[:steps].detach(), update_mask, noise,
                                          noise_std, create_graph=False)
        return torch.stack(trajectory), torch.stack(energies)

    def __call__(self, corrupted: Tensor, update_mask: Tensor | None = None, steps: int | None = None,
                 noise_std: float = 0.0, generator: torch.Generator | None = None) -> Restoration:
        if self.mode == "eager":
            return restore(self.model, corrupted, update_mask, steps, False, noise_std, generator)
        K = check_restore_inputs(self.model, corrupted, update_mask, steps)
        batch = corrupted.shape[0]
        noise = draw_noise(corrupted, K, noise_std, generator)
        mask = _full_mask(corrupted, update_mask)
        mask = mask.expand(batch, *mask.shape[1:])  # a mask may broadcast over the batch
        n = self.sizes.target(batch)
        x, std = corrupted.detach(), float(noise_std)
        if n is None:
            _warn_once("sizes-restore", f"energyvit compiled restore: batch size {batch} is beyond the "
                       f"{self.sizes.max_graphs} compiled sizes; such batches restore eagerly")
            trajectory, energies = self._restore(x.requires_grad_(True), mask, noise, std, K)
        else:
            xp, maskp, noisep = _plain(_pad(x, n), _pad(mask, n), _pad(noise, n, dim=1, zeros=True))
            try:
                with _trace_autograd():
                    trajectory, energies = self._compiled(xp.requires_grad_(True), maskp, noisep, std, K)
                self.sizes.compiled.add(n)
            except _COMPILE_ERRORS as e:
                _warn_once("fallback-restore", f"energyvit compiled restore failed ({type(e).__name__}); restoring eagerly")
                self.mode = "eager"
                trajectory, energies = self._restore(x.requires_grad_(True), mask, noise, std, K)
            trajectory, energies = trajectory[:, :batch], energies[:, :batch]
        return Restoration(restored=trajectory[-1], steps=list(trajectory.unbind(0)), energies=energies)


def compiled_restore(model: EnergyViT, **kwargs) -> CompiledRestore:
    """A compiled ``restore_fn(corrupted, update_mask=None, steps=None, noise_std=0.0, generator=None)``
    returning ``restore.restore``'s ``Restoration`` in inference mode (no parameter graph).
    kwargs: pad_batches (True), max_graphs (4), and torch.compile's arguments (fullgraph=True)."""
    return CompiledRestore(model, **kwargs)
