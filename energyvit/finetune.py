"""The fine-tuning job: a pretrained encoder trained end to end as a classifier (MAE's protocol).

A linear head on the pooled final tokens (energyvit.evaluation.finetuning.Classifier), every
encoder weight trained by AdamW with layer-wise lr decay on a cosine schedule with warmup,
stochastic depth, label smoothing, and on request timm's batch augmentations (mixup, cutmix,
random erasing) and RandAugment of image files. After every epoch the classifier is scored on
every held-out image (top-1 and top-5); the last epoch's score is the result (no selection on
held-out data).

Runs as one process or under torchrun (one process per device, DistributedDataParallel; each
global step's images are sliced over the ranks, the held-out images shared by ShardSampler).
Only rank 0 writes files and prints. `checkpoint-last.pth` is written after every epoch, every
--checkpoint_minutes within one and when stopped by SIGINT/SIGTERM; --resume continues exactly
(every random draw is a function of the seed and the position in training). `run(FinetuneOptions
(...))` is the whole job; the `energyvit finetune` command builds the options from its flags.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from energyvit.checkpoint import load_finetune_checkpoint, load_model, load_weights, save_checkpoint, save_json
from energyvit.data.finetune_transform import FinetuneTransform, with_transform
from energyvit.data.mixup import Mixup, soft_target_cross_entropy
from energyvit.data.randaugment import DEFAULT_SPEC, RandAugment, parse_spec
from energyvit.data.random_erasing import random_erase
from energyvit.data.splits import DataOptions, DataSplits, load_splits
from energyvit.distributed import DDPGradients, DistInfo, LocalGradients, barrier, init_distributed, shutdown, wrap_ddp
from energyvit.epochs import EpochEnd, RunContext, Steps, run_epochs
from energyvit.evaluation.finetuning import HEAD_POOLINGS, Classifier, add_drop_path, layer_id
from energyvit.evaluation.streaming import classify_split
from energyvit.metrics import require_wandb
from energyvit.model import EnergyViT, config_from_dict, config_to_dict
from energyvit.options import below_one, check_fields, device, half_open_unit, in_range, non_negative, option, \
    positive, resumable_fields
from energyvit.resume import LAST_CHECKPOINT, conflicts, resolve_resume
from energyvit.runtime import peak_memory_mib
from energyvit.sampling import EpochSampler, derive_seed
from energyvit.training import StepLoss, TrainOptions, amp_dtype, param_groups

PROG = "energyvit finetune"
FINETUNED = "checkpoint-finetuned.pth"  # the trained classifier, written at the end
LOSS_NAME = "classification"


def randaugment_rule(value: str) -> str | None:
    if value == "none":
        return None
    try:
        parse_spec(value)
    except ValueError as e:
        return f"'none' or a RandAugment spec such as {DEFAULT_SPEC} ({e})"
    return None


@dataclass(frozen=True)
class ClassifierOptions:
    """The classifier made of the encoder."""

    pool: str = option("mean", "head input: mean of the final patch tokens (MAE's global pool), or the class token",
                       choices=HEAD_POOLINGS)
    drop_path: float = option(0.1, "stochastic depth rate of the last block (rising linearly from 0 at the first)",
                              rule=below_one)
    random_init: bool = option(False, "baseline: the checkpoint's architecture at random init (seeded), not its "
                               "weights")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class FinetuneTrainOptions(TrainOptions):
    """Optimization of a fine-tuning run: AdamW with layer-wise lr decay, cosine schedule."""

    epochs: int = option(15, "training epochs", rule=positive, resumable=True)
    blr: float = option(2e-2, "base lr: lr = blr * effective batch / 256", rule=positive)
    seed: int = option(0, "seed of the head (and --random_init) weights, data order, augmentation, mixup, random "
                       "erasing and drop path")
    min_lr: float = option(1e-6, "lr at the end of the cosine schedule", rule=non_negative)
    layer_decay: float = option(0.75, "layer-wise lr decay: block i of L trains at lr * decay^(L - i), the "
                                "embeddings at decay^(L + 1), the final norm and the head at lr", rule=half_open_unit)


@dataclass(frozen=True)
class AugmentOptions:
    """What the training images and their targets go through (timm's, as MAE's fine-tuning)."""

    aa: str | None = option(None, f"RandAugment of training image files, a timm spec ({DEFAULT_SPEC}, MAE's: 2 of 15 "
                            "operations per image, each with probability 0.5, at magnitude 9 +- 0.5 of 10, the "
                            "increasing set) or none (default: that spec for image files; the embedded digits take "
                            "none: their augmentation is --shift)", parse=str, rule=randaugment_rule, metavar="SPEC")
    reprob: float = option(0.0, "random erasing: probability per training image of one box of noise (MAE: 0.25)",
                           rule=in_range(0, 1))
    mixup: float = option(0.0, "mixup alpha: lam ~ Beta(alpha, alpha) (0: off; MAE: 0.8)", rule=non_negative)
    cutmix: float = option(0.0, "cutmix alpha (0: off; MAE: 1.0)", rule=non_negative)
    mixup_prob: float = option(1.0, "probability of mixing a batch when --mixup or --cutmix is on", rule=in_range(0, 1))
    mixup_switch_prob: float = option(0.5, "probability of cutmix rather than mixup when both are on",
                                      rule=in_range(0, 1))
    smoothing: float = option(0.1, "label smoothing", rule=below_one)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class FinetuneRunOptions:
    """What a fine-tuning run starts from and where it writes."""

    checkpoint: str = option("", "the pretrained encoder: checkpoint-last.pth of `energyvit pretrain` or an `export` "
                             "file (a resumed run has it in its checkpoint)", metavar="CHECKPOINT")
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda if available, else cpu)", parse=str,
                                rule=device, resumable=True)
    output_dir: str | None = option(None, "where checkpoints, log.jsonl and summary.json go (default: 'finetune' "
                                    "beside the checkpoint)", parse=str, metavar="DIR", resumable=True)
    resume: str = option("", "checkpoint-last.pth of a fine-tuning run to continue, with its options (only those "
                         "said to change at --resume may); auto: OUTPUT_DIR/checkpoint-last.pth if it exists, else "
                         "a new run", metavar="CHECKPOINT", resumable=True)
    checkpoint_minutes: float = option(30.0, "mid-epoch checkpoint-last.pth at most this many minutes apart "
                                       "(0: only at epoch ends)", rule=non_negative, resumable=True)
    tensorboard: bool = option(True, "TensorBoard event files when tensorboard is installed", resumable=True)
    num_threads: int = option(0, "torch CPU threads (0: torch's default)", rule=non_negative, resumable=True)
    wandb: bool = option(False, "also log to Weights & Biases (needs the wandb package; one W&B run per output "
                         "folder, continued on resume)", resumable=True)
    wandb_project: str = option("energyvit", "the W&B project of --wandb", resumable=True)

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def out(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path(self.checkpoint).parent / "finetune"


GROUP_TYPES = {"data": DataOptions, "classifier": ClassifierOptions, "train": FinetuneTrainOptions,
               "augment": AugmentOptions, "run": FinetuneRunOptions}
DATA_DEFAULTS = {"shift": 1}  # the digits are translated by up to a pixel when fine-tuning (pretraining: 0)


@dataclass(frozen=True)
class FinetuneOptions:
    """Every option of a fine-tuning run, one group per concern."""

    data: DataOptions = field(default_factory=lambda: DataOptions(**DATA_DEFAULTS))
    classifier: ClassifierOptions = field(default_factory=ClassifierOptions)
    train: FinetuneTrainOptions = field(default_factory=FinetuneTrainOptions)
    augment: AugmentOptions = field(default_factory=AugmentOptions)
    run: FinetuneRunOptions = field(default_factory=FinetuneRunOptions)

    def flat(self) -> dict:
        """Every option by its flag name, as checkpoints keep them ("args")."""
        return {k: v for group in asdict(self).values() for k, v in group.items()}

    @classmethod
    def from_flat(cls, values: dict) -> FinetuneOptions:
        """The options of a flat {flag name: value} dict, such as a checkpoint's "args" (names no
        group has are ignored; missing ones take their defaults). To resume a run from Python:
        `FinetuneOptions.from_flat({**checkpoint["args"], "resume": path, "epochs": 30})`."""
        values = {**cls().flat(), **values}
        return cls(**{name: group(**{f.name: values[f.name] for f in fields(group)})
                      for name, group in GROUP_TYPES.items()})

    @staticmethod
    def resumable() -> frozenset[str]:
        """The options that may change when a run resumes (energyvit.resume)."""
        return resumable_fields(*GROUP_TYPES.values())


def run(options: FinetuneOptions) -> dict | None:
    dist_info, dev = init_distributed(options.run.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        return _run(options, dist_info, dev)
    finally:
        shutdown(dist_info)


@dataclass
class Finetuning:
    """Everything the epoch loop needs, built by setup()."""
    options: FinetuneOptions
    model: Classifier
    data: DataSplits
    train_images: Dataset  # data.train, or its image files through the fine-tuning view
    augmentation: str  # of the training images, in words
    optimizer: torch.optim.Optimizer
    lr: float
    steps_per_epoch: int
    epoch: int  # where training stands: the epoch to run next,
    step_in_epoch: int  # the optimizer steps of it already done,
    global_step: int  # and the optimizer steps done in all
    history: list[dict]  # one record per finished epoch; the last without held-out scores until evaluated
    ddp: torch.nn.Module | None
    autocast_dtype: torch.dtype | None
    mixup: Mixup
    generator: torch.Generator  # on the device: random erasing's noise and drop path, re-seeded per micro-batch
    pretrained: str  # what the encoder started from

    def checkpoint(self, epoch: int, step_in_epoch: int, global_step: int) -> dict:
        """The checkpoint of the position (epoch, steps of it done, steps done in all)."""
        return {"model": self.model.state_dict(), "model_config": config_to_dict(self.model.encoder.cfg),
                "optimizer": self.optimizer.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                "steps_per_epoch": self.steps_per_epoch, "global_step": global_step, "args": self.options.flat(),
                "num_classes": self.model.head.out_features, "pool": self.model.pool, "pretrained": self.pretrained,
                "history": self.history, "data": self.data.description}

    def end_epoch(self, end: EpochEnd) -> None:
        """The epoch's checkpoint first (its record without held-out scores: a run stopped
        before them computes them when resumed), then the evaluation; the checkpoint again with
        the scores when the run stops here or this was the last epoch."""
        run, stats = end.run, end.stats
        self.history.append({"epoch": end.epoch, "step": end.global_step, "loss": stats["loss"],
                             "grad_norm": stats["grad_norm"], "lr": self.optimizer.param_groups[-1]["lr"],
                             "images_per_s": stats["images"] / end.seconds, "epoch_s": end.seconds,
                             "peak_memory_mib": peak_memory_mib(run.device), "skipped_files": stats["skipped_files"]})
        if run.main:
            save_checkpoint(run.out / LAST_CHECKPOINT, self.checkpoint(end.epoch, self.steps_per_epoch, end.global_step))
        self.score_last_epoch(run)
        final = run.stopping() or end.epoch + 1 == self.options.train.epochs
        if run.main and final:
            save_checkpoint(run.out / LAST_CHECKPOINT, self.checkpoint(end.epoch, self.steps_per_epoch, end.global_step))

    def score_last_epoch(self, run: RunContext) -> None:
        """Score the last finished epoch on the held-out images, log and print its record."""
        record = self.history[-1]
        record.update(evaluate(self, run.dist, run.device))
        if run.logger is not None:
            run.logger.log(record, step=record["step"])
        run.say(f"epoch {record['epoch'] + 1}/{self.options.train.epochs}  loss {record['loss']:.4f}  held-out top-1 "
                f"{record['held_out_top1']:.4f}  top-5 {record['held_out_top5']:.4f}", flush=True)

    def catch_up(self, run: RunContext) -> None:
        """A run stopped between an epoch's end and its scores: score that epoch first."""
        if self.history and "held_out_top1" not in self.history[-1]:
            self.score_last_epoch(run)

    def step_loss(self) -> StepLoss:
        """Random erasing, mixup/cutmix and the soft-target loss of one micro-batch, every draw
        from its seed: the box and mixing parameters from a numpy Generator, the erasing noise
        and drop path from the device generator."""
        forward = self.ddp if self.ddp is not None else self.model
        encoder, reprob = self.model.encoder, self.options.augment.reprob

        def step_loss(images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[str, torch.Tensor]:
            rng = np.random.default_rng(seed)
            self.generator.manual_seed(derive_seed(seed, 1))
            images = random_erase(images, reprob, encoder.pixel_mean, encoder.pixel_std, rng, self.generator)
            images, targets = self.mixup(images, labels, rng)
            return LOSS_NAME, soft_target_cross_entropy(forward(images), targets)

        return step_loss


def training_images(data: DataSplits, options: FinetuneOptions, img_size: int) -> tuple[Dataset, str]:
    """The training set as fine-tuning reads it, and its augmentation in words: the digits as
    they are (--shift), image files through FinetuneTransform (crop 8-100%, flip, --aa)."""
    aa = options.augment.aa
    if not options.data.data_path:
        if aa not in (None, "none"):
            raise ValueError(f"--aa {aa}: RandAugment is for image files; the embedded digits (16 px strokes) are "
                             "augmented by --shift")
        return data.train, f"shift {options.data.shift}"
    spec = aa or DEFAULT_SPEC
    randaugment = RandAugment(parse_spec(spec)) if spec != "none" else None
    view = FinetuneTransform(img_size, data.in_chans, randaugment, jpeg_draft=options.data.jpeg_draft)
    return with_transform(data.train, view), f"crop {view.scale[0]:g}-{view.scale[1]:g}, flip, RandAugment {spec}"


def setup(options: FinetuneOptions, dist_info: DistInfo, dev: torch.device) -> Finetuning:
    """The pretrained (or resumed) classifier, its data and optimizer, and the position to start
    from; DDP under torchrun."""
    run_opts, train_opts = options.run, options.train
    resume_path = resolve_resume(run_opts.resume, run_opts.out)
    state = load_finetune_checkpoint(resume_path) if resume_path is not None else None
    torch.manual_seed(train_opts.seed)
    if state is not None:
        changed = conflicts(state["args"], options.flat(), FinetuneOptions.resumable())
        if changed:
            raise ValueError(f"{', '.join(changed)}: a resumed run keeps the options of {resume_path} (build them "
                             "with FinetuneOptions.from_flat(checkpoint['args']))")
        try:
            encoder = EnergyViT(config_from_dict(state["model_config"]))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{resume_path} has an unusable model config: {e}") from None
        pretrained = state["pretrained"]
    else:
        if not run_opts.checkpoint:
            raise ValueError("no pretrained checkpoint to fine-tune (give one, or --resume a fine-tuning run)")
        encoder, _ = load_model(run_opts.checkpoint, need_energy=False)
        pretrained = run_opts.checkpoint
        if options.classifier.random_init:
            encoder, pretrained = EnergyViT(encoder.cfg), f"random init ({run_opts.checkpoint}'s architecture)"
    data = load_splits(options.data, encoder.cfg.img_size, encoder.cfg.in_chans, gray_to_rgb=True)
    if not data.labeled:
        raise ValueError(f"fine-tuning needs labels, and {data.description} has none")
    if state is not None and state["num_classes"] != data.num_classes:
        raise ValueError(f"{resume_path} classifies {state['num_classes']} classes; {data.description} has "
                         f"{data.num_classes}")
    train_images, augmentation = training_images(data, options, encoder.cfg.img_size)
    for p in encoder.energy_parameters():  # the energy readout and step sizes play no part here
        p.requires_grad_(False)
    torch.manual_seed(train_opts.seed)  # the head's initial weights
    model = Classifier(encoder, data.num_classes, options.classifier.pool).to(dev)
    generator = torch.Generator(dev)
    add_drop_path(encoder, options.classifier.drop_path, generator)
    lr = train_opts.lr_for(dist_info.world_size)
    depth = len(encoder.blocks)
    optimizer = torch.optim.AdamW(param_groups(model, train_opts.weight_decay, train_opts.layer_decay,
                                               lambda name: layer_id(name, depth)), lr=lr)
    per_step = train_opts.batch_size * train_opts.accum_iter
    steps_per_epoch = EpochSampler(data.num_train, per_step, train_opts.seed, 0, 0, dist_info.world_size).steps
    epoch, step_in_epoch, global_step, history = 0, 0, 0, []
    if state is not None:
        load_weights(model, state["model"], resume_path)
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{resume_path}: its optimizer state does not fit this run ({e})") from None
        epoch, step_in_epoch, global_step, history = (state[k] for k in ("epoch", "step_in_epoch", "global_step",
                                                                         "history"))
        if state["steps_per_epoch"] != steps_per_epoch and step_in_epoch not in (0, state["steps_per_epoch"]):
            raise ValueError(f"{resume_path} stopped mid-epoch at {state['steps_per_epoch']} steps per epoch; this "
                             f"run has {steps_per_epoch} (change of data or processes)")
        if step_in_epoch >= state["steps_per_epoch"]:
            epoch, step_in_epoch = epoch + 1, 0
    mixup = Mixup(data.num_classes, options.augment.mixup, options.augment.cutmix, options.augment.mixup_prob,
                  options.augment.mixup_switch_prob, options.augment.smoothing)
    ddp = wrap_ddp(model, dev) if dist_info.enabled else None
    return Finetuning(options, model, data, train_images, augmentation, optimizer, lr, steps_per_epoch, epoch,
                      step_in_epoch, global_step, history, ddp, amp_dtype(train_opts.precision, dev), mixup, generator,
                      pretrained)


def _run(options: FinetuneOptions, dist_info: DistInfo, dev: torch.device) -> dict | None:
    if options.run.wandb and dist_info.is_main:
        require_wandb()
    if options.run.num_threads:
        torch.set_num_threads(options.run.num_threads)
    out = options.run.out
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    t = setup(options, dist_info, dev)
    if dist_info.is_main:
        print(describe(t, dist_info, dev), flush=True)
    sync = DDPGradients(t.ddp) if t.ddp is not None else LocalGradients()
    steps = Steps(t.model, t.step_loss(), [LOSS_NAME], sync, t.train_images, t.data.num_train, t.data.num_workers)
    run_epochs(t, steps, dist_info, dev, out, PROG, before=t.catch_up)
    summary = None
    if dist_info.is_main:
        save_checkpoint(out / FINETUNED, {"model": t.model.state_dict(),
                                          "model_config": config_to_dict(t.model.encoder.cfg), "pool": t.model.pool,
                                          "num_classes": t.model.head.out_features, "args": options.flat()})
        summary = summarize(t)
        save_json(out / "summary.json", summary)
        print(f"held-out top-1 after {options.train.epochs} epochs: {summary['held_out_top1']:.4f}  top-5 "
              f"{summary['held_out_top5']:.4f}  (wrote {out})", flush=True)
    barrier(dist_info)
    return summary


def describe(t: Finetuning, dist_info: DistInfo, dev: torch.device) -> str:
    o, aug = t.options, t.options.augment
    mixing = (f"mixup {aug.mixup} / cutmix {aug.cutmix} (p {aug.mixup_prob}, switch {aug.mixup_switch_prob})"
              if t.mixup.active else "no mixup")
    n_params = sum(p.numel() for p in t.model.parameters() if p.requires_grad)
    return (f"{PROG}: {t.pretrained}, {t.model.encoder.cfg.depth} blocks ({n_params / 1e6:.2f}M trained params), "
            f"{t.data.description} ({len(t.data.held_out_all)} held-out images scored each epoch), pool "
            f"{t.model.pool}, layer decay {o.train.layer_decay}, drop path {o.classifier.drop_path}, smoothing "
            f"{aug.smoothing}, {mixing}, random erasing {aug.reprob}, {t.augmentation}; batch {o.train.batch_size} x "
            f"{o.train.accum_iter} accum x {dist_info.world_size} processes, lr {t.lr:.2e}, "
            f"{'bf16 autocast' if t.autocast_dtype else 'fp32'} on {dev}")


def evaluate(t: Finetuning, dist_info: DistInfo, dev: torch.device) -> dict:
    """Held-out top-1, top-5 and loss over every held-out image, shared by the ranks."""
    t0 = time.perf_counter()
    scores = classify_split(t.model, t.data.held_out_all, t.options.train.batch_size, dist_info, dev,
                            num_workers=t.data.num_workers, precision=t.options.train.precision)
    return {"held_out_top1": scores["top1"], "held_out_top5": scores["top5"], "held_out_loss": scores["loss"],
            "n_held_out": scores["n"], "eval_s": time.perf_counter() - t0}


def summarize(t: Finetuning) -> dict:
    """summary.json: the last epoch's held-out scores (the result), every epoch's record, the run."""
    last, o = t.history[-1], t.options
    return {"checkpoint": o.run.checkpoint, "pretrained": t.pretrained, "random_init": o.classifier.random_init,
            "data": t.data.description, "held_out_top1": last["held_out_top1"], "held_out_top5": last["held_out_top5"],
            "held_out_loss": last["held_out_loss"], "n_held_out": last["n_held_out"], "n_train": t.data.num_train,
            "epochs": o.train.epochs, "seed": o.train.seed, "lr": t.lr, "history": t.history,
            "model_config": config_to_dict(t.model.encoder.cfg)}
