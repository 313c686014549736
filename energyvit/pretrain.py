"""The pretraining job: data, model, optimizer, epochs, checkpoints, logs, final evaluation.

Runs as one process or under torchrun (one process per device, DistributedDataParallel). Only
rank 0 writes files and prints.
"""
from __future__ import annotations

import resource
import signal
import time
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from energyvit.checkpoint import load_checkpoint, save_checkpoint, save_json
from energyvit.distributed import DistInfo, all_ranks_true, barrier, init_distributed, shutdown, wrap_ddp
from energyvit.engine import EpochPlan, LossOptions, StepLoss, TrainingDiverged, cosine_lr, train_one_epoch
from energyvit.methods import EnergyMethod, MAEMethod
from energyvit.model import EnergyViT, config_from_dict, config_to_dict, model_config
from energyvit.pretrain_data import PretrainData, load_pretrain_data, probe_accuracies
from energyvit.sampling import EpochSampler
from energyvit.tasks import build_mixture

CHECKPOINT_NAME = "checkpoint-last.pth"
EPOCH_EVAL_IMAGES = 128  # held-out images behind each epoch's restoration metrics and pictures


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, tokens and step sizes (1-d parameters), as MAE."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or p.shape[0] == 1 else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_model(args: Namespace, pixel_mean, pixel_std, in_chans: int) -> EnergyViT:
    cfg = model_config(
        args.model, img_size=args.input_size, in_chans=in_chans, energy=args.energy,
        restore_steps=args.restore_steps, step_size_init=args.step_size_init,
        attn_backend="fused" if args.fused else "math", pixel_mean=pixel_mean, pixel_std=pixel_std,
    )
    return EnergyViT(cfg)


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default, full fp32 on the CPU unless asked."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, KiB on Linux


class StopRequest:
    """SIGINT/SIGTERM ask the run to stop after the current optimizer step and save a checkpoint
    there; a second SIGINT interrupts at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nenergyvit pretrain: {signal.Signals(signum).name} received; stopping after this step "
              "(again to stop at once)", flush=True)

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run(args: Namespace) -> dict | None:
    dist_info, device = init_distributed(args.device)
    try:
        return _run(args, dist_info, device)
    finally:
        shutdown(dist_info)


@dataclass
class Training:
    """Everything the epoch loop needs, built by setup()."""
    method: EnergyMethod | MAEMethod
    data: PretrainData
    optimizer: torch.optim.Optimizer
    lr: float
    steps_per_epoch: int
    epoch: int  # where training stands: the epoch to run next,
    step_in_epoch: int  # the optimizer steps of it already done,
    global_step: int  # and the optimizer steps done in all
    step_loss: StepLoss
    ddp: torch.nn.Module | None
    restore_fn: Callable | None  # compiled inference restoration, or None for eager
    autocast_dtype: torch.dtype | None
    model_name: str

    @property
    def encoder(self) -> EnergyViT:
        return self.method.encoder

    def checkpoint(self, args: Namespace, epoch: int, step_in_epoch: int, global_step: int) -> dict:
        """The checkpoint of the position (epoch, steps of it done, steps done in all)."""
        return {"model": self.encoder.state_dict(), "model_config": config_to_dict(self.encoder.cfg),
                "optimizer": self.optimizer.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                "steps_per_epoch": self.steps_per_epoch, "global_step": global_step, "args": vars(args),
                "method": self.method.name, "data": self.data.description, **self.method.checkpoint_extra()}


def setup(args: Namespace, dist_info: DistInfo, device: torch.device) -> Training:
    """Data, method, optimizer and the position to start from (a resumed run: the checkpoint's,
    with its architecture); DDP and compilation when asked."""
    resume_state = load_checkpoint(args.resume) if args.resume else None
    model_name = resume_state["args"]["model"] if resume_state is not None else args.model
    arch = (config_from_dict(resume_state["model_config"]) if resume_state is not None
            else model_config(args.model, img_size=args.input_size))
    data = load_pretrain_data(args, arch.img_size, arch.in_chans if resume_state is not None else None)
    mixture = build_mixture(
        args.tasks, patch_size=arch.patch_size, in_chans=data.in_chans,
        mask_ratio=args.mask_ratio, mask_fill=args.mask_fill, sort_fraction=args.sort_fraction,
        sr_factor=args.sr_factor, noise_sigma=args.noise_sigma,
    )
    opts = LossOptions(region=args.loss_region, langevin_std=args.langevin_std,
                       norm_pix_patch=arch.patch_size if args.norm_pix_loss else None)
    model = EnergyViT(arch) if resume_state is not None else build_model(args, *data.pixel_stats(), data.in_chans)
    method_name = resume_state.get("method", "energy") if resume_state is not None else args.method
    if method_name != args.method:
        raise ValueError(f"{args.resume} was pretrained with --method {method_name}, not {args.method}")
    method = (EnergyMethod(model, mixture, opts) if args.method == "energy"
              else MAEMethod(model, args.mae_mask_ratio, args.norm_pix_loss))
    method.module.to(device)
    per_step = args.batch_size * args.accum_iter
    lr = args.lr if args.lr is not None else args.blr * per_step * dist_info.world_size / 256
    optimizer = torch.optim.AdamW(param_groups(method.module, args.weight_decay), lr=lr, betas=(0.9, 0.95))
    steps_per_epoch = EpochSampler(data.num_train, per_step, args.seed, 0, 0, dist_info.world_size).steps
    epoch, step_in_epoch, global_step = 0, 0, 0
    if resume_state is not None:
        method.encoder.load_state_dict(resume_state["model"])
        method.load_extra(resume_state)
        optimizer.load_state_dict(resume_state["optimizer"])
        epoch, step_in_epoch, global_step = (resume_state[k] for k in ("epoch", "step_in_epoch", "global_step"))
        if resume_state["steps_per_epoch"] != steps_per_epoch and step_in_epoch not in (0, resume_state["steps_per_epoch"]):
            raise ValueError(f"{args.resume} stopped mid-epoch at {resume_state['steps_per_epoch']} steps per epoch; "
                             f"this run has {steps_per_epoch} (change of data, batch size, accum_iter or processes)")
        if step_in_epoch >= resume_state["steps_per_epoch"]:
            epoch, step_in_epoch = epoch + 1, 0

    ddp = None
    if dist_info.enabled:
        if args.compile:
            raise ValueError("--compile runs in a single process for now; drop it under torchrun")
        ddp = wrap_ddp(method.module, device)
    step_fn = restore_fn = None
    if args.compile:
        if args.method != "energy":
            raise ValueError("--compile applies to the energy method only")
        from energyvit.compiled import compiled_restore, compiled_train_step

        step_fn, restore_fn = compiled_train_step(method.encoder, opts), compiled_restore(method.encoder)
    return Training(method, data, optimizer, lr, steps_per_epoch, epoch, step_in_epoch, global_step,
                    method.step_loss(ddp, step_fn), ddp, restore_fn, amp_dtype(args.precision, device), model_name)


def _run(args: Namespace, dist_info: DistInfo, device: torch.device) -> dict | None:
    torch.manual_seed(args.seed)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    out = Path(args.output_dir)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    t = setup(args, dist_info, device)
    model = t.encoder
    n_params = sum(p.numel() for p in t.method.module.parameters())
    what = (f"tasks {args.tasks}, K={model.cfg.restore_steps}" if args.method == "energy"
            else f"MAE baseline, mask ratio {args.mae_mask_ratio}")
    if dist_info.is_main:
        print(f"energyvit pretrain: {t.model_name} ({n_params / 1e6:.2f}M params, attention {model.cfg.attn_backend}), "
              f"{t.data.description} at {model.cfg.img_size}px, {what}, "
              f"batch {args.batch_size} x {args.accum_iter} accum x {dist_info.world_size} processes, lr {t.lr:.2e}, "
              f"{'bf16 autocast' if t.autocast_dtype else 'fp32'} on {device}{', compiled' if args.compile else ''}",
              flush=True)
    train(t, args, dist_info, device, out)
    summary = None
    if dist_info.is_main:
        summary = final_evaluation(t.method, t.data, args, t.model_name, t.restore_fn)
        save_json(out / "summary.json", summary)
        print_summary(summary)
    barrier(dist_info)
    return summary


def train(t: Training, args: Namespace, dist_info: DistInfo, device: torch.device, out: Path) -> None:
    """The epochs from t's position to args.epochs: checkpoints, logs and pictures on rank 0.

    Raises KeyboardInterrupt after saving when stopped by a signal, and TrainingDiverged (naming
    the last good checkpoint) on a non-finite loss."""
    from energyvit.metrics import MetricsLogger
    from energyvit.progress import Progress

    main = dist_info.is_main
    say = print if main else (lambda *a, **k: None)
    ckpt_path = out / CHECKPOINT_NAME
    total, warmup = args.epochs * t.steps_per_epoch, args.warmup_epochs * t.steps_per_epoch
    logger = MetricsLogger(out, args.tensorboard, purge_step=t.global_step or None) if main else None
    if logger is not None and logger.tensorboard_note:
        say(f"energyvit pretrain: {logger.tensorboard_note}")
    progress = Progress(total, first_step=t.global_step, desc="pretrain") if main else None
    epoch = t.epoch
    last_save = time.monotonic()

    def on_step(global_step: int, step_in_epoch: int, info: dict) -> None:
        nonlocal last_save
        if progress is not None:
            progress.update(global_step, info["images"], loss=info["loss"])
        minutes = args.checkpoint_minutes
        if main and minutes and time.monotonic() - last_save > 60 * minutes and step_in_epoch < t.steps_per_epoch:
            save_checkpoint(ckpt_path, t.checkpoint(args, epoch, step_in_epoch, global_step))
            last_save = time.monotonic()

    try:
        with StopRequest() as stop:
            stop_everywhere = lambda: not all_ranks_true(not stop.requested, dist_info, device)  # noqa: E731
            step_in_epoch, global_step = t.step_in_epoch, t.global_step
            while epoch < args.epochs:
                t0 = time.perf_counter()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                sampler = EpochSampler(t.data.num_train, args.batch_size * args.accum_iter, args.seed, epoch,
                                       dist_info.rank, dist_info.world_size, start_step=step_in_epoch)
                loader = DataLoader(t.data.train, batch_size=args.batch_size, sampler=sampler,
                                    num_workers=t.data.num_workers, pin_memory=device.type == "cuda", drop_last=True)
                plan = EpochPlan(epoch, t.steps_per_epoch, step_in_epoch, global_step, args.accum_iter,
                                 args.clip_grad, t.autocast_dtype, args.seed)
                stats = train_one_epoch(t.method.module, t.step_loss, loader, t.optimizer, plan,
                                        lambda s: cosine_lr(t.lr, s, total, warmup), t.method.task_names, dist_info,
                                        t.ddp, should_stop=stop_everywhere, on_step=on_step)
                global_step += stats["steps"]
                step_in_epoch += stats["steps"]
                if stats["stopped"] and step_in_epoch < t.steps_per_epoch:
                    if main:
                        save_checkpoint(ckpt_path, t.checkpoint(args, epoch, step_in_epoch, global_step))
                    say(f"energyvit pretrain: stopped at epoch {epoch} step {step_in_epoch}/{t.steps_per_epoch}; "
                        f"continue with --resume {ckpt_path}", flush=True)
                    raise KeyboardInterrupt
                if main:
                    record = epoch_record(t.method, t.data, stats, epoch, global_step, t.optimizer,
                                          time.perf_counter() - t0, device, out, args.grid_rows, logger, t.restore_fn)
                    step_sizes = f"  a_k {record['step_sizes']}" if "step_sizes" in record else ""
                    say(f"epoch {epoch + 1}/{args.epochs}  loss {stats['loss']:.4f}  "
                        f"{record['images_per_s']:.0f} img/s{step_sizes}", flush=True)
                    state = t.checkpoint(args, epoch, t.steps_per_epoch, global_step)
                    save_checkpoint(ckpt_path, state)
                    if args.save_every and (epoch + 1) % args.save_every == 0:
                        save_checkpoint(out / f"checkpoint-{epoch + 1:04d}.pth", state)
                    last_save = time.monotonic()
                barrier(dist_info)
                epoch, step_in_epoch = epoch + 1, 0
                if stop_everywhere():  # asked after the epoch's last step
                    say(f"energyvit pretrain: stopped after epoch {epoch}; continue with --resume {ckpt_path}",
                        flush=True)
                    raise KeyboardInterrupt
    except TrainingDiverged as e:
        raise TrainingDiverged(f"{e}; stopped without applying it. Last good checkpoint: "
                               f"{ckpt_path if ckpt_path.exists() else 'none yet'}") from None
    finally:
        if progress is not None:
            progress.close()
        if logger is not None:
            logger.close()


def epoch_record(method, data: PretrainData, stats: dict, epoch: int, global_step: int, optimizer, seconds: float,
                 device: torch.device, out: Path, grid_rows: int, logger, restore_fn) -> dict:
    """One JSON-lines record of an epoch (and its PNG grids): training losses, held-out restoration
    PSNR (and energies) per task on a fixed subset, step sizes, gradient norm, lr, throughput, memory."""
    from energyvit.visualize import save_restoration_grid

    t0 = time.perf_counter()
    tasks, samples = method.evaluate(data.held_out.images[:EPOCH_EVAL_IMAGES], seed=1, keep_samples=grid_rows,
                                     restore_fn=restore_fn)
    eval_seconds = time.perf_counter() - t0
    for name, r in tasks.items():
        if f"loss_{name}" in stats:
            r["train_loss"] = stats[f"loss_{name}"]
    record = {"epoch": epoch, "step": global_step, "loss": stats["loss"], "tasks": tasks, **method.record(),
              "grad_norm": stats["grad_norm"], "lr": optimizer.param_groups[0]["lr"],
              "images_per_s": stats["images"] / seconds, "epoch_s": seconds, "eval_s": eval_seconds,
              "peak_memory_mib": peak_memory_mib(device), "skipped_files": stats["skipped_files"]}
    logger.log(record, step=global_step)
    for name, (corrupted, steps, clean) in samples.items():
        path = out / "pictures" / f"epoch{epoch + 1:04d}-{name}.png"
        grid = save_restoration_grid(path, corrupted, steps, clean, max_rows=grid_rows)
        logger.add_image(f"restoration/{name}", grid, global_step)
    return record


def final_evaluation(method, data: PretrainData, args: Namespace, model_name: str, restore_fn) -> dict:
    restoration, _ = method.evaluate(data.held_out.images, seed=args.seed + 1, restore_fn=restore_fn)
    probes = probe_accuracies(method.encoder, data, args.probe_pool or data.default_probe_pool, seed=args.seed + 2,
                              probe_images=args.probe_images)
    return {**probes, "tasks": restoration, "model": model_name, "epochs": args.epochs, "seed": args.seed,
            "method": method.name, "data": data.description, "model_config": config_to_dict(method.encoder.cfg)}


def print_summary(summary: dict) -> None:
    print("\nheld-out restoration (MSE over each task's region, pixel units):")
    print(f"  {'task':<10}{'corrupted':>12}{'restored':>12}")
    for name, r in summary["tasks"].items():
        print(f"  {name:<10}{r['mse_corrupted']:>12.5f}{r['mse_restored']:>12.5f}")
    if summary["probe_acc"] is None:
        print(f"linear probe: skipped ({summary['probe_note']})")
        return
    print(f"held-out linear probe accuracy (frozen features, {summary['probe_pool']} pooling):")
    print(f"  pretrained   {summary['probe_acc']:.4f}")
    print(f"  random init  {summary['probe_acc_random_init']:.4f}")
    print(f"  raw pixels   {summary['probe_acc_raw_pixels']:.4f}")
