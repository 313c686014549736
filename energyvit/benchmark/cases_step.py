"""The step suite's cases: one training step per mode, energy (the model `pretrain` builds) or MAE,
on seeded random images, called once and ready to time; and the optimizer suite's AdamW step."""
from __future__ import annotations

import contextlib
import time
import types
from dataclasses import dataclass, replace

import torch

import energyvit
from energyvit.benchmark.cases_attention import attention_fn
from energyvit.benchmark.compile_only import cache_counts, cache_note, compile_only_backend
from energyvit.benchmark.environment import Unavailable
from energyvit.benchmark.flops import energy_step_flops, mae_step_flops
from energyvit.benchmark.presets import DTYPES, GRAPH_WARMUP, MAE_MODES, STEP_MODES
from energyvit.benchmark.timing import make_sync
from energyvit.compiled import compiled_train_step
from energyvit.cuda_graphs import GraphedAdamW, GraphedLossStep
from energyvit.methods.mae import MAEBaseline
from energyvit.model import EnergyViT, ModelOptions, model_config
from energyvit.objective import EnergyOptions, task_loss
from energyvit.training import param_groups


@dataclass
class StepCase:
    fn: object
    model: object
    flops: float
    images: int
    stepper: object = None
    first_call_s: float = 0.0
    note: str = ""
    compiled: bool = False  # the step runs Inductor-compiled code (not fallen back to eager)


def _images(cfg, batch: int, device: torch.device):
    """Seeded random images and their mim corruption (half the patches), on `device`."""
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    corrupted = energyvit.corrupt(clean, "mim", patch_size=cfg.patch_size, generator=g, mask_ratio=0.5)
    return clean.to(device), corrupted.to(device)


def step_case(mode: str, model_name: str, img_size, restore_steps: int, batch: int, device: torch.device,
              amp: str | None, kernel_profile: bool = False, compile_only: bool = False,
              inductor: dict | None = None, ln_gelu: str | None = None) -> StepCase:
    """The training step of `mode` on random images (seeded; mim corruption), called once (a
    cuda-graphs mode: until its first replay). Energy modes build the model as `pretrain` does
    with its defaults (energy head included; ModelOptions), K = restore_steps; MAE modes (MAE_MODES)
    ignore K. kernel_profile: compiled code records each of its CPU kernels for the profiler
    (torch._inductor.config.cpp.enable_kernel_profile). compile_only (a compiled mode): compile the
    step, then raise CompiledOnly instead of running it. inductor: options for Inductor in the
    compiled modes (torch.compile's options). ln_gelu: the LayerNorm/GELU backend ("aten" or "fused"),
    in place of the one pretrain would pick for the mode (fused in fused eager and graphed modes, aten
    when compiled: ModelOptions.backends)."""
    if mode not in STEP_MODES:
        raise ValueError(f"unknown step mode {mode!r}; choose from {', '.join(STEP_MODES)}")
    if "cuda-graphs" in mode and device.type != "cuda":
        raise Unavailable(f"CUDA graphs need a CUDA device (this run is on {device.type})")
    patches = {**(inductor or {}), **({"cpp.enable_kernel_profile": True} if kernel_profile else {})}
    compile_how = ({"backend": compile_only_backend(patches)} if compile_only
                   else {"options": patches} if patches else {})
    if mode in MAE_MODES:
        return mae_case(mode, model_name, img_size, batch, device, amp, compile_how)
    parts = set(mode.split("+"))
    backend = "fused" if "fused" in parts else "math"
    if backend == "fused":
        attention_fn("fused", device, 1.0)  # raises Unavailable with the reason
    stepper = graphed = None
    cache_before = cache_counts()
    torch.manual_seed(0)
    cfg = ModelOptions(model=model_name, input_size=img_size, restore_steps=restore_steps,
                       fused=backend == "fused").config(in_chans=3, compiled="compiled" in parts)
    if ln_gelu is not None:
        cfg = replace(cfg, ln_gelu_backend=ln_gelu)
    model = EnergyViT(cfg).to(device)
    model.train()
    clean, corrupted = _images(cfg, batch, device)
    opts = EnergyOptions()
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = (lambda: torch.autocast(device.type, dtype=DTYPES[amp])) if amp else contextlib.nullcontext
    if "compiled" in parts:
        # our own gradient check against the eager step replaces the built-in one (whose
        # tolerance is for fp32, too tight under bf16 autocast); see grad_rel_err_vs_eager
        stepper = compiled_train_step(model, opts, verify_first_step=False, **compile_how)
        loss_fn = lambda: stepper(clean, corrupted)  # noqa: E731
    else:
        loss_fn = lambda: task_loss(model, clean, corrupted, opts)  # noqa: E731
    if "cuda-graphs" in parts:
        graphed = GraphedLossStep(model, opts, stepper, warmup_steps=GRAPH_WARMUP)
        loss_fn = lambda: graphed(clean, corrupted)  # noqa: E731

    def fn():
        for p in params:
            p.grad = None
        with autocast():
            loss = loss_fn()
        loss.backward()  # a replayed step's backward adds nothing: the graph wrote p.grad
        return loss.detach()

    sync = make_sync(device)
    sync()
    t = time.perf_counter()
    for _ in range(GRAPH_WARMUP + 1 if graphed is not None else 1):
        fn()
    sync()
    case = StepCase(fn, model, energy_step_flops(cfg, restore_steps, batch), batch, stepper,
                    time.perf_counter() - t)
    notes = [f"energy head {cfg.energy_head_depth} x {cfg.head_dim} (pretrain's default), in time and FLOPs"]
    if stepper is not None:
        case.compiled = stepper.mode == "compiled"
        if not case.compiled:
            notes.append(f"compiled step fell back to eager (mode={stepper.mode})")
        notes.append(cache_note(cache_before))
    if graphed is not None:
        if graphed.mode != "graph":
            notes.append(f"CUDA graph capture failed: ordinary step (mode={graphed.mode})")
        else:
            notes.append(f"first_call_s: {GRAPH_WARMUP} warm-up steps + capture + first replay")
    case.note = "; ".join(filter(None, notes))
    return case


class GraphedStep:
    """loss_fn() and its backward, captured into one CUDA graph after `warmup` ordinary steps and
    then replayed (the whole-network capture of torch's CUDA graphs notes: warm-up on a side
    stream, gradients set to None before the capture so that the captured backward allocates
    them in the graph's pool; every replay overwrites them). Calling it replays and returns the
    loss; the parameters' .grad are the graph's gradient tensors. loss_fn must run its autocast
    without the weight cache (a cast cached outside the capture would be freed under the graph)."""

    def __init__(self, loss_fn, params: list, warmup: int) -> None:
        self.params = params
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._zero()
                loss_fn().backward()
        torch.cuda.current_stream().wait_stream(side)
        self._zero()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = loss_fn()
            self.loss.backward()
        self.grads = [p.grad for p in params]

    def _zero(self) -> None:
        for p in self.params:
            p.grad = None

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        for p, g in zip(self.params, self.grads):
            p.grad = g
        return self.loss.detach()


def mae_case(mode: str, model_name: str, img_size, batch: int, device: torch.device, amp: str | None,
             compile_how: dict | None = None) -> StepCase:
    """An MAE step (loss + backward, no optimizer) of the MAE `pretrain --method mae` trains (no
    energy head; MAE's default decoder), under masks drawn once (seeded), so that every MAE mode
    computes the same loss and its gradients compare with the eager step's. mae-math: math
    attention, eager (the reference before issue 21); the other modes SDPA in encoder and decoder
    (its default backend: flash where available), compiled (torch.compile of the loss; AOTAutograd
    compiles its backward) and/or replayed from a CUDA graph (GraphedStep)."""
    parts = set(mode.split("+"))
    torch.manual_seed(0)
    mae = MAEBaseline(model_config(model_name, img_size=img_size),
                      attn_backend="math" if mode == "mae-math" else "sdpa").to(device)
    mae.train()
    cfg = mae.encoder.cfg
    clean, _ = _images(cfg, batch, device)
    ids_shuffle, ids_restore = mae.random_masking(batch, device, torch.Generator().manual_seed(3))
    params = [p for p in mae.parameters() if p.requires_grad]
    loss = mae.masked_loss
    stepper, cache_before = None, cache_counts()
    if "compiled" in parts:
        # a code object of its own: Dynamo's cache (and its recompile limit) is per code object
        f = MAEBaseline.masked_loss
        own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
        stepper = torch.compile(types.MethodType(own, mae), fullgraph=True, dynamic=False, **(compile_how or {}))
        loss = stepper
    # no autocast weight cache: a CUDA graph capture must not reuse casts made outside it
    autocast = ((lambda: torch.autocast(device.type, dtype=DTYPES[amp], cache_enabled=False)) if amp
                else contextlib.nullcontext)

    def loss_fn():
        with autocast():
            return loss(clean, ids_shuffle, ids_restore)

    sync = make_sync(device)
    sync()
    t = time.perf_counter()  # first_call_s: compiling, or the graph's warm-up steps and capture, and one call
    if "cuda-graphs" in parts:
        graphed = GraphedStep(loss_fn, params, GRAPH_WARMUP)

        def fn():
            return graphed()
    else:
        def fn():
            for p in params:
                p.grad = None
            out = loss_fn()
            out.backward()
            return out.detach()

    fn()
    sync()
    attn = "math attention" if mode == "mae-math" else "SDPA attention"
    note = (f"MAE: encoder on {mae.num_visible} of {cfg.num_patches} patches + decoder "
            f"{mae.decoder_cfg.embed_dim} x {mae.decoder_cfg.depth}, {attn}, loss + backward; masks fixed")
    case = StepCase(fn, mae, mae_step_flops(cfg, mae.decoder_cfg, mae.num_visible, batch), batch, stepper,
                    time.perf_counter() - t, compiled="compiled" in parts)
    if "cuda-graphs" in parts:
        case.note = "; ".join([note, f"first_call_s: {GRAPH_WARMUP} warm-up steps + capture + first replay"])
    else:
        case.note = "; ".join(filter(None, [note, cache_note(cache_before) if stepper is not None else ""]))
    return case


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64."""
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def flat_grads(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().double().cpu()
                      for p in model.parameters() if p.requires_grad])


def optimizer_case(mode: str, model_name: str, img_size, device: torch.device, steps: int = 2):
    """(fn, model): one AdamW step of `model_name`'s parameters with fixed random gradients,
    `steps` already taken; mode eager (torch.optim.AdamW, as pretraining builds it) or
    cuda-graphs (GraphedAdamW: the first step eager, then captured and replayed)."""
    if mode == "cuda-graphs" and device.type != "cuda":
        raise Unavailable(f"CUDA graphs need a CUDA device (this run is on {device.type})")
    torch.manual_seed(0)
    model = energyvit.create_model(model_name, img_size=img_size).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(p.shape, generator=g).to(device) for p in params]
    for p, gr in zip(params, grads):
        p.grad = gr
    cls = GraphedAdamW if mode == "cuda-graphs" else torch.optim.AdamW
    opt = cls(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    if isinstance(opt, GraphedAdamW):
        opt.use_static_grads(params, grads, None, None)
    for _ in range(steps):
        opt.step()
    return opt.step, model

