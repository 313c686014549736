"""The pretraining job: data, model, optimizer, epochs, checkpoints, logs, final evaluation.

Runs as one process or under torchrun (one process per device: DistributedDataParallel, or for
the compiled and the CUDA-graphed step, whose gradients DDP's hooks never see, an explicit
all-reduce after each step's backward). Only rank 0 writes files and prints.
`run(PretrainOptions(...))` is the whole job; the `energyvit pretrain` command builds the options
from its flags.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from energyvit.checkpoint import load_pretrain_checkpoint, load_weights, save_checkpoint, save_json
from energyvit.cuda_graphs import GraphedAdamW, cuda_graphs_usable, graphed_training
from energyvit.data.splits import DataOptions, DataSplits, load_splits
from energyvit.distributed import AllReduceGradients, DDPGradients, DistInfo, GradientSync, LocalGradients, \
    broadcast_parameters, init_distributed, run_on_main, shutdown, wrap_ddp
from energyvit.epochs import EpochEnd, Steps, run_epochs
from energyvit.evaluation.features import POOLINGS
from energyvit.evaluation.probes import probe_accuracies
from energyvit.metrics import require_wandb
from energyvit.methods import METHODS
from energyvit.methods.base import PretrainingMethod
from energyvit.methods.energy import EnergyMethod
from energyvit.methods.mae import MAEMethod, MAEOptions
from energyvit.model import MODEL_ARCHS, EnergyViT, ModelOptions, config_from_dict, config_to_dict, model_config
from energyvit.objective import EnergyOptions
from energyvit.options import OptionError, check_fields, device, non_negative, option, positive, resumable_fields
from energyvit.resume import LAST_CHECKPOINT, conflicts, resolve_resume
from energyvit.runtime import peak_memory_mib
from energyvit.sampling import EpochSampler
from energyvit.tasks import TaskOptions, build_mixture
from energyvit.training import LossTrend, StepLoss, TrainOptions, amp_dtype, param_groups
from energyvit.visualize import save_restoration_grid

PROG = "energyvit pretrain"
EPOCH_EVAL_IMAGES = 128  # held-out images behind each epoch's restoration metrics and pictures


@dataclass(frozen=True)
class RunOptions:
    """What a pretraining run is and where it writes."""

    method: str = option("energy", "energy: this project's method; mae: the MAE baseline on the same encoder",
                         choices=METHODS)
    compile: bool = option(False, "torch.compile the whole training step (exact second-order gradients; eager "
                           "fallback with a warning; under torchrun the gradients are all-reduced after the step)",
                           resumable=True)
    cuda_graphs: bool = option(False, "replay the energy step and the AdamW step from CUDA graphs after 3 warm-up "
                               "steps, also under torchrun and with --accum_iter (without CUDA, or with --compile and "
                               "--langevin_std: the ordinary step, with a warning)", resumable=True)
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda if available, else cpu)", parse=str,
                                rule=device, resumable=True)
    output_dir: str = option("./output_dir", "where checkpoints, logs, pictures and summary.json go", metavar="DIR",
                             resumable=True)
    resume: str = option("", "checkpoint to continue from, with its options (only those said to change at "
                         "--resume may); auto: OUTPUT_DIR/checkpoint-last.pth if it exists, else a new run",
                         metavar="CHECKPOINT", resumable=True)
    save_every: int = option(0, "also keep checkpoint-NNNN.pth every this many epochs (0: off)", rule=non_negative,
                             resumable=True)
    checkpoint_minutes: float = option(30.0, "mid-epoch checkpoint-last.pth at most this many minutes apart "
                                       "(0: only at epoch ends)", rule=non_negative, resumable=True)
    grid_rows: int = option(8, "images per PNG restoration grid each epoch (0: none)", rule=non_negative,
                            resumable=True)
    tensorboard: bool = option(True, "TensorBoard event files when tensorboard is installed", resumable=True)
    probe_pool: str | None = option(None, "features of the final linear probe (default: tokens on the digits, mean "
                                    "otherwise)", parse=str, choices=POOLINGS, resumable=True)
    probe_images: int = option(10000, "training images the final probe fits on", rule=positive, resumable=True)
    num_threads: int = option(0, "torch CPU threads (0: torch's default)", rule=non_negative, resumable=True)
    wandb: bool = option(False, "also log to Weights & Biases (needs the wandb package; one W&B run per output "
                         "folder, continued on resume)", resumable=True)
    wandb_project: str = option("energyvit", "the W&B project of --wandb", resumable=True)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class PretrainOptions:
    """Every option of a pretraining run, one group per concern."""

    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    tasks: TaskOptions = field(default_factory=TaskOptions)
    energy: EnergyOptions = field(default_factory=EnergyOptions)
    mae: MAEOptions = field(default_factory=MAEOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    run: RunOptions = field(default_factory=RunOptions)

    def __post_init__(self) -> None:
        if self.run.compile and self.run.method != "energy":
            raise OptionError("compile", True, f"left off with --method {self.run.method} (it compiles the energy step)")
        if self.mae.mae_attention == "sdpa" and self.model.fused:
            raise OptionError("mae_attention", "sdpa", "math with --fused (--fused runs the encoder's attention)")
        if self.run.cuda_graphs and self.run.method != "energy":
            raise OptionError("cuda_graphs", True, f"left off with --method {self.run.method} (it captures the energy "
                              "step)")
        truncated = self.energy.second_order_blocks
        if truncated is not None:
            depth = MODEL_ARCHS[self.model.model]["depth"]
            if truncated > depth:
                raise OptionError("second_order_blocks", truncated, f"at most {self.model.model}'s depth {depth}")
            if self.run.method != "energy" or self.run.compile or self.run.cuda_graphs:
                used = f"--method {self.run.method}" if self.run.method != "energy" else \
                    "--compile" if self.run.compile else "--cuda_graphs"
                raise OptionError("second_order_blocks", truncated, f"left off with {used} (the truncated path runs "
                                  "in the eager energy step only)")
        if self.tasks.restore_fraction < 1 and self.run.method != "energy":
            raise OptionError("restore_fraction", self.tasks.restore_fraction, f"1 with --method {self.run.method} "
                              "(it sparsifies the energy method's restoration; MAE's masking is --mae_mask_ratio)")

    def flat(self) -> dict:
        """Every option by its flag name, as checkpoints keep them ("args")."""
        return {k: v for group in asdict(self).values() for k, v in group.items()}

    @classmethod
    def from_flat(cls, values: dict) -> PretrainOptions:
        """The options of a flat {flag name: value} dict, such as a checkpoint's "args" (names
        that no group has are ignored; missing ones take their defaults). To resume a run from
        Python: `PretrainOptions.from_flat({**checkpoint["args"], "epochs": 400})`."""
        return cls(**{name: group(**{f.name: values[f.name] for f in fields(group) if f.name in values})
                      for name, group in GROUP_TYPES.items()})

    @staticmethod
    def resumable() -> frozenset[str]:
        """The options that may change when a run resumes (energyvit.resume)."""
        return resumable_fields(*GROUP_TYPES.values())


GROUP_TYPES = {"data": DataOptions, "model": ModelOptions, "tasks": TaskOptions, "energy": EnergyOptions,
               "mae": MAEOptions, "train": TrainOptions, "run": RunOptions}


def run(options: PretrainOptions) -> dict | None:
    dist_info, device = init_distributed(options.run.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        return _run(options, dist_info, device)
    finally:
        shutdown(dist_info)


@dataclass
class Training:
    """Everything the epoch loop needs, built by setup()."""
    options: PretrainOptions
    method: PretrainingMethod
    data: DataSplits
    optimizer: torch.optim.Optimizer
    lr: float
    steps_per_epoch: int
    epoch: int  # where training stands: the epoch to run next,
    step_in_epoch: int  # the optimizer steps of it already done,
    global_step: int  # and the optimizer steps done in all
    step_loss: StepLoss
    grad_sync: GradientSync  # how ranks share gradients: DDP's hooks, an explicit all-reduce, or nothing
    autocast_dtype: torch.dtype | None
    model_name: str
    health: LossTrend = field(default_factory=LossTrend)

    @property
    def encoder(self) -> EnergyViT:
        return self.method.encoder

    def checkpoint(self, epoch: int, step_in_epoch: int, global_step: int) -> dict:
        """The checkpoint of the position (epoch, steps of it done, steps done in all)."""
        return {"model": self.encoder.state_dict(), "model_config": config_to_dict(self.encoder.cfg),
                "optimizer": self.optimizer.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                "steps_per_epoch": self.steps_per_epoch, "global_step": global_step, "args": self.options.flat(),
                "method": self.method.name, "data": self.data.description, **self.method.checkpoint_extra()}

    def end_epoch(self, end: EpochEnd) -> None:
        """Rank 0: the epoch's checkpoint first (nothing below can lose it), then the warnings, the
        log record with held-out restoration metrics and pictures, and the epoch line."""
        run = end.run
        if not run.main:
            return
        state = self.checkpoint(end.epoch, self.steps_per_epoch, end.global_step)
        save_checkpoint(run.out / LAST_CHECKPOINT, state)
        save_every, epoch = self.options.run.save_every, end.epoch
        if save_every and (epoch + 1) % save_every == 0:
            save_checkpoint(run.out / f"checkpoint-{epoch + 1:04d}.pth", state)
        warnings = self.health.check(end.stats["loss"]) + self.method.warnings()
        for w in warnings:
            run.say(f"{PROG}: warning: epoch {epoch + 1}: {w}", file=sys.stderr, flush=True)
        try:
            epoch_record(self, end, warnings)
        except Exception as e:  # noqa: BLE001  (the epoch is saved; its log or pictures are not)
            run.say(f"{PROG}: warning: epoch {epoch + 1}'s log or pictures could not be written "
                    f"({type(e).__name__}: {e}); its checkpoint was", file=sys.stderr, flush=True)
        step_sizes = self.method.record().get("step_sizes")
        run.say(f"epoch {epoch + 1}/{self.options.train.epochs}  loss {end.stats['loss']:.4f}  "
                f"{end.stats['images'] / end.seconds:.0f} img/s{f'  a_k {step_sizes}' if step_sizes else ''}", flush=True)


def build_method(options: PretrainOptions, model: EnergyViT, data: DataSplits) -> PretrainingMethod:
    if options.run.method == "energy":
        mixture = build_mixture(options.tasks, model.cfg.patch_size, data.in_chans)
        full = None
        if options.tasks.restore_fraction < 1:  # held-out restoration of every hidden patch, every patch
            # entering: one measure for every --restore_fraction (the hidden patches are the same under a seed)
            full = build_mixture(replace(options.tasks, restore_fraction=1.0), model.cfg.patch_size, data.in_chans)
        return EnergyMethod(model, mixture, options.energy, compiled=options.run.compile, eval_mixture=full)
    return MAEMethod(model, options.mae)


def setup(options: PretrainOptions, dist_info: DistInfo, device: torch.device) -> Training:
    """Data, method, optimizer and the position to start from (a resumed run: the checkpoint's,
    with its architecture); under torchrun, DDP or (compiled or graphed step) the explicit all-reduce."""
    run_opts, train_opts = options.run, options.train
    resume_path = resolve_resume(run_opts.resume, run_opts.output_dir)
    resume_state = load_pretrain_checkpoint(resume_path) if resume_path is not None else None
    if resume_state is not None:
        changed = conflicts(resume_state["args"], options.flat(), PretrainOptions.resumable())
        if changed:
            raise ValueError(f"{', '.join(changed)}: a resumed run keeps the options of {resume_path} (build them "
                             "with PretrainOptions.from_flat(checkpoint['args']))")
        model_name = resume_state["args"]["model"]
        try:  # the backends are how it runs, not what it is: --fused decides
            arch = replace(config_from_dict(resume_state["model_config"]), **options.model.backends(options.run.compile))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{resume_path} has an unusable model config: {e}") from None
    else:
        model_name, arch = options.model.model, model_config(options.model.model, img_size=options.model.input_size)
    data = load_splits(options.data, arch.img_size, arch.in_chans if resume_state is not None else None)
    if resume_state is None:
        arch = options.model.config(data.in_chans, *data.pixel_stats(), compiled=options.run.compile)
        if run_opts.method == "mae":  # MAE never reads the energy: no blocks for it to carry untrained
            arch = replace(arch, energy_head_depth=0, energy_head_dim=0)
    model = EnergyViT(arch)
    trained_as = resume_state.get("method", "energy") if resume_state is not None else run_opts.method
    if trained_as != run_opts.method:  # the checkpoint's own record, also where its "args" lack the method
        raise ValueError(f"{resume_path} was pretrained with --method {trained_as}, not {run_opts.method}")
    method = build_method(options, model, data)
    method.module.to(device)
    lr = train_opts.lr_for(dist_info.world_size)
    graphed = run_opts.cuda_graphs and cuda_graphs_usable(device, run_opts.compile, options.energy.langevin_std,
                                                          warn=dist_info.is_main)
    optimizer_cls = GraphedAdamW if graphed else torch.optim.AdamW
    optimizer = optimizer_cls(param_groups(method.module, train_opts.weight_decay), lr=lr, betas=(0.9, 0.95))
    if graphed:  # --cuda_graphs: the energy step's backward and the AdamW update replayed from CUDA graphs
        method.step_fn = graphed_training(method.encoder, options.energy, method.step_fn, optimizer,
                                          accum_iter=train_opts.accum_iter)
    per_step = train_opts.batch_size * train_opts.accum_iter
    steps_per_epoch = EpochSampler(data.num_train, per_step, train_opts.seed, 0, 0, dist_info.world_size).steps
    epoch, step_in_epoch, global_step = 0, 0, 0
    if resume_state is not None:
        load_weights(method.encoder, resume_state["model"], resume_path)
        method.load_extra(resume_state)
        try:
            optimizer.load_state_dict(resume_state["optimizer"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{resume_path}: its optimizer state does not fit this run ({e})") from None
        epoch, step_in_epoch, global_step = (resume_state[k] for k in ("epoch", "step_in_epoch", "global_step"))
        if resume_state["steps_per_epoch"] != steps_per_epoch and step_in_epoch not in (0, resume_state["steps_per_epoch"]):
            raise ValueError(f"{resume_path} stopped mid-epoch at {resume_state['steps_per_epoch']} steps per "
                             f"epoch; this run has {steps_per_epoch} (change of data, batch size, accum_iter or "
                             "processes)")
        if step_in_epoch >= resume_state["steps_per_epoch"]:
            epoch, step_in_epoch = epoch + 1, 0

    ddp, grad_sync = None, LocalGradients()
    if dist_info.enabled and (run_opts.compile or graphed):  # gradients made outside DDP's autograd hooks
        broadcast_parameters(method.module)  # one starting point on every rank, as DDP makes it
        grad_sync = AllReduceGradients(method.module)
    elif dist_info.enabled:
        ddp = wrap_ddp(method.module, device)
        grad_sync = DDPGradients(ddp)
    return Training(options, method, data, optimizer, lr, steps_per_epoch, epoch, step_in_epoch, global_step,
                    method.step_loss(ddp), grad_sync, amp_dtype(train_opts.precision, device), model_name)


def _run(options: PretrainOptions, dist_info: DistInfo, device: torch.device) -> dict | None:
    if options.run.wandb and dist_info.is_main:
        require_wandb()
    torch.manual_seed(options.train.seed)
    if options.run.num_threads:
        torch.set_num_threads(options.run.num_threads)
    out = Path(options.run.output_dir)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    t = setup(options, dist_info, device)
    model, train_opts = t.encoder, options.train
    n_params = sum(p.numel() for p in t.method.module.parameters())
    sparse = f", restore fraction {options.tasks.restore_fraction:g}" if options.tasks.restore_fraction < 1 else ""
    what = (f"tasks {options.tasks.tasks}{sparse}, K={model.cfg.restore_steps}" if options.run.method == "energy"
            else f"MAE baseline, mask ratio {options.mae.mae_mask_ratio}")
    if dist_info.is_main:
        print(f"{PROG}: {t.model_name} ({n_params / 1e6:.2f}M params, attention {model.cfg.attn_backend}), "
              f"{t.data.description} at {model.cfg.img_size}px, {what}, batch {train_opts.batch_size} x "
              f"{train_opts.accum_iter} accum x {dist_info.world_size} processes, lr {t.lr:.2e}, "
              f"{'bf16 autocast' if t.autocast_dtype else 'fp32'} on {device}{', compiled' if options.run.compile else ''}"
              f"{', CUDA graphs' if isinstance(t.optimizer, GraphedAdamW) else ''}"
              f"{', gradients all-reduced after each step' if isinstance(t.grad_sync, AllReduceGradients) else ''}",
              flush=True)
    steps = Steps(t.method.module, t.step_loss, t.method.task_names, t.grad_sync, t.data.train, t.data.num_train,
                  t.data.num_workers)
    run_epochs(t, steps, dist_info, device, out, PROG)
    # rank 0 alone evaluates; the others wait for it without a timeout an evaluation could outlast
    return run_on_main(dist_info, lambda: write_summary(t, out))


def write_summary(t: Training, out: Path) -> dict:
    summary = final_evaluation(t)
    save_json(out / "summary.json", summary)
    print_summary(summary)
    return summary


def epoch_record(t: Training, end: EpochEnd, warnings: list[str]) -> dict:
    """One JSON-lines record of an epoch (and its PNG grids): training losses, held-out restoration
    PSNR (and energies) per task on a fixed subset, step sizes, gradient norm, lr, throughput, memory."""
    grid_rows, stats = t.options.run.grid_rows, end.stats
    t0 = time.perf_counter()
    tasks, samples = t.method.evaluate(t.data.held_out.images[:EPOCH_EVAL_IMAGES], seed=1, keep_samples=grid_rows)
    eval_seconds = time.perf_counter() - t0
    for name, r in tasks.items():
        if f"loss_{name}" in stats:
            r["train_loss"] = stats[f"loss_{name}"]
    record = {"epoch": end.epoch, "step": end.global_step, "loss": stats["loss"], "tasks": tasks, **t.method.record(),
              "grad_norm": stats["grad_norm"], "lr": t.optimizer.param_groups[0]["lr"],
              "images_per_s": stats["images"] / end.seconds, "epoch_s": end.seconds, "eval_s": eval_seconds,
              "peak_memory_mib": peak_memory_mib(t.encoder.pixel_mean.device), "skipped_files": stats["skipped_files"]}
    if warnings:
        record["warnings"] = warnings
    end.run.logger.log(record, step=end.global_step)
    for name, (corrupted, steps, clean) in samples.items():
        path = end.run.out / "pictures" / f"epoch{end.epoch + 1:04d}-{name}.png"
        grid = save_restoration_grid(path, corrupted, steps, clean, max_rows=grid_rows)
        end.run.logger.add_image(f"restoration/{name}", grid, end.global_step)
    return record


def final_evaluation(t: Training) -> dict:
    options, method, data = t.options, t.method, t.data
    seed = options.train.seed
    restoration, _ = method.evaluate(data.held_out.images, seed=seed + 1)
    probes = probe_accuracies(method.encoder, data, options.run.probe_pool or data.default_probe_pool, seed=seed + 2,
                              probe_images=options.run.probe_images)
    return {**probes, "tasks": restoration, "model": t.model_name, "epochs": options.train.epochs, "seed": seed,
            "method": method.name, "data": data.description, "model_config": config_to_dict(method.encoder.cfg)}


def print_summary(summary: dict) -> None:
    print("\nheld-out restoration (MSE over each task's region, pixel units):")
    print(f"  {'task':<10} {'corrupted':>11} {'restored':>11}")
    for name, r in summary["tasks"].items():  # a space between columns however wide a number gets
        print(f"  {name:<10} {r['mse_corrupted']:>11.5f} {r['mse_restored']:>11.5f}")
    if summary["probe_acc"] is None:
        print(f"linear probe: skipped ({summary['probe_note']})")
        return
    print(f"held-out linear probe accuracy (frozen features, {summary['probe_pool']} pooling):")
    print(f"  pretrained   {summary['probe_acc']:.4f}")
    print(f"  random init  {summary['probe_acc_random_init']:.4f}")
    print(f"  raw pixels   {summary['probe_acc_raw_pixels']:.4f}")
