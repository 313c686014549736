"""CUDA graphs for the static-shape pretraining step (`energyvit pretrain --cuda_graphs`, the
`*cuda-graphs` modes of `energyvit bench`).

Small models are launch-bound on a GPU: one eager K=1 step of ViT-Ti runs 3,691 CUDA kernels on an
H200 (docs/benchmarks.md), each launched from the host. A CUDA graph replays a captured sequence
of kernels with one launch. After `warmup_steps` ordinary
steps (so that Triton's autotuner and torch.compile have run: neither may run inside a capture),
two graphs are captured:

- graph A, `GraphedLossStep` (the energy method's `step_fn`): the K restoration steps with
  create_graph, the loss, and the backward of loss / accum_iter, which adds into static gradient
  tensors that are the parameters' `.grad` from then on (a parameter the backward never reaches
  keeps None, as in the ordinary step). The eager step, or a compiled one
  (`energyvit.compiled`), is captured as it is. Before each replay the step's inputs
  are copied into static tensors: the clean and corrupted images, the update mask (all ones for a
  task without one: `delta * 1` is exact), the loss region, the Langevin noise, the learned
  fill's mask (`objective.fill_mask`), the per-image loss weights (ones where the task gives
  none) and, for sparse restoration, the indices of the patches that enter (their number is
  fixed by the task's options). The corruption itself (task choice, masks, noise) still runs
  eagerly from the step's seed, exactly as in the ordinary step, so one graph serves every task
  of a mixture.
- graph B, `GraphedAdamW`: the AdamW update (`capturable=True`: the step count lives on the
  device; the learning rate is read from a device tensor that is filled, before each replay,
  with the value the training loop set).

Between the two the training loop runs eagerly, as in the ordinary step: under torchrun the
gradient all-reduce (`distributed.AllReduceGradients`: no collective inside a capture, and no
DDP, whose hooks never see a replay's gradients), then clipping and the non-finite check, so a
non-finite step is still refused before the optimizer runs.

Gradient accumulation. The loss that `GraphedLossStep` returns is a copy of the replayed loss
whose backward adds nothing: the replay has already added d(loss / accum_iter)/d theta into the
static gradients, exactly what the training loop's `(loss / accum_iter).backward()` adds in the
ordinary step (the same division, captured with accum_iter as a constant). Before each replay
the static gradients are made to hold what p.grad held: zeros at the start of an optimizer step
(the loop's `zero_grad(set_to_none=True)` left None), the sum of the step's earlier micro-batches
otherwise (already the static tensors, or an ordinary step's tensors after a warm-up or fallback
call). The step is built with the loop's accum_iter; the first replayed backward checks that the
loss is backpropagated with weight 1 / accum_iter (one host sync, once) and raises if not.

Fallbacks, each with one warning: the ordinary step for every call where CUDA graphs cannot run
(no CUDA device, Langevin noise with the compiled step, whose noise is drawn inside it) or after
a capture error; the ordinary step for a single call whose inputs differ in shape, dtype or
device from the captured ones (the graph stays for later calls). The optimizer falls back by
itself: any step whose gradients are not the graph's static tensors runs eagerly (capturable
AdamW is exact eagerly too).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from energyvit.model import EnergyViT
from energyvit.objective import EnergyOptions, fill_mask, filled, restored_loss, task_loss
from energyvit.restore import bind_keep, descend, draw_noise
from energyvit.tasks import Corrupted

WARMUP_STEPS = 3  # ordinary steps before the capture: autotuning and compilation happen in the first

_WARNED: set[str] = set()

# A step_fn as energyvit.methods.energy.EnergyMethod calls it: (clean, corrupted, generator) -> loss
StepFn = Callable[[Tensor, Corrupted, "torch.Generator | None"], Tensor]


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def cuda_graph_support(device: torch.device, compiled: bool = False, langevin_std: float = 0.0) -> tuple[bool, str]:
    """(supported, reason): whether the training step can be replayed from CUDA graphs here (in one
    process or under torchrun, with any accum_iter)."""
    if device.type != "cuda":
        return False, f"CUDA graphs need a CUDA device (training runs on {device})"
    if compiled and langevin_std > 0:
        return False, "the compiled step draws its Langevin noise inside itself, which a graph would freeze"
    return True, ""


def cuda_graphs_usable(device: torch.device, compiled: bool = False, langevin_std: float = 0.0,
                       warn: bool = True) -> bool:
    """cuda_graph_support's answer, with one warning when it is no (warn: this process says it;
    under torchrun only rank 0 does, every rank decides the same)."""
    ok, reason = cuda_graph_support(device, compiled, langevin_std)
    if not ok and warn:
        _warn_once("support", f"energyvit CUDA graphs: {reason}; training runs the ordinary step")
    return ok


def _reset_rng_after_failed_capture(device: torch.device) -> None:
    """A capture that fails part-way leaves the device's default generator in capture mode (torch
    2.11: every later random op then raises "Offset increment outside graph capture encountered
    unexpectedly"); a clone of its state (same seed and offset, not capturing) replaces it."""
    gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    gen.graphsafe_set_state(gen.clone_state())


class _GradientsReady(torch.autograd.Function):
    """The replayed loss, attached to the parameters so that the training loop's backward runs;
    the gradients are in p.grad already (added by the replay), so that backward adds nothing.
    check(grad_out), if given, sees the weight the loss is backpropagated with."""

    @staticmethod
    def forward(ctx, loss, check, *params):
        ctx.n, ctx.check = len(params), check
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.check is not None:
            ctx.check(grad_out)
        return (None,) * (2 + ctx.n)


class GraphedLossStep:
    """step_fn(clean, corrupted, generator=None) -> loss for EnergyMethod, replayed from a CUDA graph.

    The first `warmup_steps` calls (micro-batches) run the ordinary step (`inner`: a compiled
    step_fn, or None for the eager `objective.task_loss`); the next call captures graph A and
    replays it, and hands the optimizer (a GraphedAdamW, if given) the static gradient tensors so
    that it captures graph B. The caller backpropagates the returned loss / accum_iter, as the
    training loop does (see the module docstring). `mode` is "warm-up", "graph" once captured, or
    "off" after a capture error.
    """

    def __init__(self, model: EnergyViT, opts: EnergyOptions = EnergyOptions(), inner: StepFn | None = None,
                 warmup_steps: int = WARMUP_STEPS, optimizer: GraphedAdamW | None = None, accum_iter: int = 1) -> None:
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1 (autotuning and compilation cannot run in a capture), "
                             f"got {warmup_steps}")
        if accum_iter < 1:
            raise ValueError(f"accum_iter must be >= 1, got {accum_iter}")
        self.model, self.opts, self.inner = model, opts, inner
        self.warmup_steps, self.optimizer, self.accum_iter = warmup_steps, optimizer, accum_iter
        self.steps = model.cfg.restore_steps
        self.calls, self.mode = 0, "warm-up"
        self.graph: torch.cuda.CUDAGraph | None = None
        self._stream: torch.cuda.Stream | None = None
        self.static_inputs: tuple[Tensor, ...] = ()
        self.static_loss: Tensor | None = None
        self.static_grads: list[Tensor | None] = []
        self._weight_checked = False

    def _params(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _ordinary(self, clean: Tensor, corrupted: Corrupted, generator) -> Tensor:
        if self.inner is not None:
            return self.inner(clean, corrupted, generator)
        return task_loss(self.model, clean, corrupted, self.opts, generator)

    def _inputs(self, clean: Tensor, corrupted: Corrupted, generator) -> tuple[Tensor, ...]:
        """The step's tensors: clean, image, update mask, loss region, the noise (drawn here from
        `generator` in the order the ordinary step draws it; an empty tensor without noise), the
        learned fill's mask (an empty tensor without one), the per-image loss weights (ones where
        the task has none) and the patches that enter (an empty tensor for all of them)."""
        image = corrupted.image
        mask = corrupted.update_mask if corrupted.update_mask is not None else image.new_ones(
            image.shape[0], 1, *image.shape[2:])
        self.model.check_keep(corrupted.keep, image.shape[0])
        noise = draw_noise(image, self.steps, self.opts.langevin_std, generator)
        keep = corrupted.keep if corrupted.keep is not None else image.new_empty(0, dtype=torch.int64)
        fill = fill_mask(self.model, corrupted)
        weight = corrupted.loss_weight if corrupted.loss_weight is not None else image.new_ones(image.shape[0])
        return (clean, image, mask, corrupted.loss_mask, noise if noise is not None else image.new_empty(0),
                fill if fill is not None else image.new_empty(0), weight, keep)

    def _loss(self, clean: Tensor, image: Tensor, mask: Tensor, region: Tensor, noise: Tensor, fill: Tensor,
              weight: Tensor, keep: Tensor) -> Tensor:
        """The ordinary step on these inputs (their noise already drawn): what is captured."""
        keep = keep if keep.numel() else None
        fill = fill if fill.numel() else None
        if self.inner is not None:  # compiled: no Langevin noise here (cuda_graph_support refuses it)
            return self.inner(clean, Corrupted(image, region, mask, keep, fill, weight), None)
        start = filled(self.model, image.detach().requires_grad_(True), fill)
        restored, _, _ = descend(bind_keep(self.model, keep), start,
                                 self.model.step_sizes[: self.steps], mask, noise if noise.numel() else None,
                                 self.opts.langevin_std, create_graph=True)
        return restored_loss(self.model, clean, start, restored, region, keep, self.opts, weight=weight)

    def _forward_backward(self) -> None:
        """What graph A holds: the loss on the static inputs into static_loss, and the backward of
        loss / accum_iter added into p.grad. Autocast as the caller set it but without its weight
        cache (a cached cast made outside a capture would be freed under the graph); the backward
        outside autocast, as the training loop runs it."""
        device = self.static_inputs[0].device.type
        with torch.autocast(device, dtype=torch.get_autocast_dtype(device), enabled=torch.is_autocast_enabled(device),
                            cache_enabled=False):
            loss = self._loss(*self.static_inputs)
        with torch.autocast(device, enabled=False):
            (loss / self.accum_iter).backward()  # the loop's own scaling, so the sums are the ordinary step's
        if self.static_loss is None:  # the run before the capture allocates it
            self.static_loss = loss.detach().clone()
        else:
            self.static_loss.copy_(loss.detach())

    def _capture(self, inputs: tuple[Tensor, ...]) -> None:
        """Graph A, over static inputs and static gradients (the replays add into them). The call
        may come in the middle of an optimizer step: p.grad is left as it was."""
        params = self._params()
        carried = [p.grad for p in params]
        self.static_inputs = tuple(t.detach().clone() for t in inputs)
        try:
            self.graph = self._record(params)
        finally:
            for p, g in zip(params, carried):
                p.grad = g
        if self.optimizer is not None:
            self.optimizer.use_static_grads(params, self.static_grads, self.graph.pool(), self._stream)

    def _record(self, params: list[Tensor]) -> torch.cuda.CUDAGraph:
        """_forward_backward captured as a CUDA graph whose backward adds into the static gradients."""
        if not all(t.is_cuda for t in (*self.static_inputs, *params)):
            raise RuntimeError("CUDA graphs need the model and the batch on a CUDA device")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._first_run(params)
        torch.cuda.current_stream().wait_stream(stream)
        for p, g in zip(params, self.static_grads):
            p.grad = g  # a defined .grad: the captured backward adds into it in place
        graph = torch.cuda.CUDAGraph()
        try:  # thread_local: only this thread is checked (a DataLoader's pin-memory thread may allocate meanwhile)
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                self._forward_backward()
        except Exception:
            _reset_rng_after_failed_capture(params[0].device)
            raise
        self._stream = stream
        return graph

    def _first_run(self, params: list[Tensor]) -> None:
        """One step before the capture, on the capture stream, its gradients dropped: its lazy
        set-up (the static loss; an autotuner's or a compiler's state) stays out of the graph, and
        it shows which parameters the backward reaches. Those get a static gradient (zeros); the
        others keep None, as in the ordinary step (AdamW skips them)."""
        for p in params:
            p.grad = None
        self._forward_backward()
        self.static_grads = [None if p.grad is None else torch.zeros_like(p) for p in params]

    def _use_static_grads(self, params: list[Tensor]) -> None:
        """Make each p.grad its static tensor, holding what p.grad held: zeros where it was None (an
        optimizer step's first micro-batch), else the sum so far (copied in unless it is the static
        tensor already: an ordinary step's gradients after a warm-up or fallback call)."""
        pairs = [(p, g) for p, g in zip(params, self.static_grads) if g is not None]
        unset = [g for p, g in pairs if p.grad is None]
        if unset:
            torch._foreach_zero_(unset)
        for p, g in pairs:
            if p.grad is not None and p.grad is not g:
                g.copy_(p.grad)
            p.grad = g

    def _check_weight(self, grad_out: Tensor) -> None:
        """The first replayed loss's backward: its weight must be the 1 / accum_iter the replay used."""
        self._weight_checked = True
        weight = grad_out.item()
        if not math.isclose(weight, 1 / self.accum_iter, rel_tol=1e-2):
            raise RuntimeError(f"energyvit CUDA graphs: the graphed step was built for accum_iter {self.accum_iter} "
                               f"(its replay adds the gradients of loss / {self.accum_iter}), but its loss was "
                               f"backpropagated with weight {weight:.4g}; build it with the training loop's accum_iter")

    def _fits(self, inputs: tuple[Tensor, ...]) -> bool:
        return all(t.shape == s.shape and t.dtype == s.dtype and t.device == s.device
                   for t, s in zip(inputs, self.static_inputs))

    def __call__(self, clean: Tensor, corrupted: Corrupted, generator: torch.Generator | None = None) -> Tensor:
        self.calls += 1
        if self.mode == "off" or self.calls <= self.warmup_steps:
            return self._ordinary(clean, corrupted, generator)
        inputs = self._inputs(clean, corrupted, generator)
        if self.graph is None:
            try:
                self._capture(inputs)
            except Exception as e:  # noqa: BLE001  (any capture failure: the ordinary step is always right)
                self._give_up(e)
                return self._loss(*inputs)
            self.mode = "graph"
        elif not self._fits(inputs):
            _warn_once("shape", "energyvit CUDA graphs: a step's inputs differ in shape, dtype or device from the "
                       "captured ones; such steps run without the graph")
            return self._loss(*inputs)  # its backward adds into p.grad, static or not
        params = self._params()
        self._use_static_grads(params)
        for static, t in zip(self.static_inputs, inputs):
            static.copy_(t)
        self.graph.replay()
        return _GradientsReady.apply(self.static_loss, None if self._weight_checked else self._check_weight, *params)

    def _give_up(self, e: BaseException) -> None:
        """After a failed capture (p.grad as before it: _capture restores them)."""
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _warn_once("capture", f"energyvit CUDA graphs: capturing the training step failed ({type(e).__name__}: "
                   f"{first}); training continues without graphs")
        self.mode, self.graph, self.static_inputs, self.static_loss, self.static_grads = "off", None, (), None, []
        if self.optimizer is not None:
            self.optimizer.use_static_grads([], [], None, None)


class GraphedAdamW(torch.optim.AdamW):
    """AdamW with capturable=True whose step is replayed from a CUDA graph once the gradients are
    the static tensors of a GraphedLossStep.

    Until `use_static_grads` arms it, and for any step whose parameters hold other gradient tensors,
    step() is the ordinary (capturable, eager) AdamW step. The first armed step captures the update
    with the learning rates as device tensors and replays it; later ones fill those tensors with the
    values in param_groups (the loop's schedule sets floats there) and replay. state_dict() and
    load_state_dict() are AdamW's; a loaded state is made capturable (its step counts on the device).
    """

    def __init__(self, params, **kwargs) -> None:
        kwargs.update(capturable=True, foreach=True)
        super().__init__(params, **kwargs)
        self._disarm()

    def _disarm(self) -> None:
        self._params: list[Tensor] = []
        self._grads: list[Tensor | None] = []
        self._graph: torch.cuda.CUDAGraph | None = None
        self._pool = self._stream = None
        self._lr: list[Tensor] = []

    def use_static_grads(self, params: list[Tensor], grads: list[Tensor | None], pool, stream) -> None:
        """Arm (or, with no params, disarm) the graph: steps whose p.grad are exactly `grads` replay it."""
        self._disarm()
        self._params, self._grads, self._pool, self._stream = list(params), list(grads), pool, stream

    def _grads_are_static(self) -> bool:
        """Armed, every p.grad is its static tensor, and the state exists (AdamW creates it in its
        first step: created inside a capture, each replay would reset it)."""
        return bool(self._params) and all(p.grad is g and (g is None or self.state.get(p)) for p, g in
                                          zip(self._params, self._grads))

    def step(self, closure=None):
        if closure is not None or not self._grads_are_static():
            return super().step(closure)
        if self._graph is None:
            try:
                self._capture()
            except Exception as e:  # noqa: BLE001  (the eager step is always right)
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                _warn_once("capture-optimizer", f"energyvit CUDA graphs: capturing the optimizer step failed "
                           f"({type(e).__name__}: {first}); it runs without a graph")
                self._disarm()
                return super().step()
        for t, group in zip(self._lr, self.param_groups):
            t.fill_(float(group["lr"]))
        self._graph.replay()
        return None

    def _capture(self) -> None:
        floats = [group["lr"] for group in self.param_groups]
        device = self._params[0].device
        self._lr = [torch.tensor(float(lr), dtype=torch.float32, device=device) for lr in floats]
        graph = torch.cuda.CUDAGraph()
        try:
            for group, t in zip(self.param_groups, self._lr):
                group["lr"] = t
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
                super().step()
        except Exception:
            _reset_rng_after_failed_capture(device)
            raise
        finally:
            for group, lr in zip(self.param_groups, floats):
                group["lr"] = lr  # the loop, the logs and the checkpoints see floats
        self._graph = graph

    def state_dict(self) -> dict:
        """AdamW's state dict as a plain AdamW would save it (capturable=False), so that a run resumed
        without --cuda_graphs, or on the CPU, loads it as usual."""
        state = super().state_dict()
        for group in state["param_groups"]:
            group["capturable"] = False
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a checkpoint of a plain AdamW says capturable=False
            group["capturable"], group["foreach"] = True, True
            for p in group["params"]:
                state = self.state.get(p, {})
                if "step" in state:
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def graphed_training(model: EnergyViT, opts: EnergyOptions, inner: StepFn | None, optimizer: GraphedAdamW,
                     warmup_steps: int = WARMUP_STEPS, accum_iter: int = 1) -> GraphedLossStep:
    """The step_fn whose captured backward feeds `optimizer`'s captured update, for a training loop
    of accum_iter micro-batches per optimizer step."""
    return GraphedLossStep(model, opts, inner, warmup_steps, optimizer, accum_iter)
