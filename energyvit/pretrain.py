"""The pretraining job: data, model, optimizer, epochs, checkpoints, final evaluation."""
from __future__ import annotations

import json
import time
from argparse import Namespace
from pathlib import Path

import torch

from energyvit.checkpoint import load_checkpoint, save_checkpoint, save_json
from energyvit.data import channel_stats, load_digits
from energyvit.engine import LossOptions, cosine_lr, evaluate_restoration, train_one_epoch
from energyvit.model import EnergyViT, config_from_dict, config_to_dict, model_config
from energyvit.probe import POOLING, extract_features, linear_probe
from energyvit.tasks import build_mixture

CHECKPOINT_NAME = "checkpoint-last.pth"


def param_groups(model: EnergyViT, weight_decay: float) -> list[dict]:
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


def probe_accuracies(model: EnergyViT, train, held_out, pool: str, seed: int) -> dict:
    """Linear-probe accuracy of the model's frozen features, of the same architecture at random
    init (seeded), and of the raw pixels, on the same split; `pool` gives the headline numbers,
    `probe_by_pool` holds every pooling."""
    torch.manual_seed(seed)
    random_model = EnergyViT(model.cfg).to(model.pixel_mean.device)
    by_pool = {}
    for p in POOLING:
        by_pool[p] = {
            key: linear_probe(extract_features(m, train.images, p), train.labels,
                              extract_features(m, held_out.images, p), held_out.labels)
            for key, m in (("pretrained", model), ("random_init", random_model))
        }
    raw = linear_probe(train.images, train.labels, held_out.images, held_out.labels)
    return {"probe_acc": by_pool[pool]["pretrained"], "probe_acc_random_init": by_pool[pool]["random_init"],
            "probe_acc_raw_pixels": raw, "probe_pool": pool, "probe_by_pool": by_pool}


def run(args: Namespace) -> dict:
    torch.manual_seed(args.seed)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    # A resumed run takes its architecture (image and patch size included) from the checkpoint.
    resume_state = load_checkpoint(args.resume) if args.resume else None
    model_name = resume_state["args"]["model"] if resume_state is not None else args.model
    arch = (config_from_dict(resume_state["model_config"]) if resume_state is not None
            else model_config(args.model, img_size=args.input_size))
    train, held_out = load_digits(arch.img_size)
    mixture = build_mixture(
        args.tasks, patch_size=arch.patch_size, in_chans=train.images.shape[1],
        mask_ratio=args.mask_ratio, mask_fill=args.mask_fill, sort_fraction=args.sort_fraction,
        sr_factor=args.sr_factor, noise_sigma=args.noise_sigma,
    )
    opts = LossOptions(region=args.loss_region, langevin_std=args.langevin_std,
                       norm_pix_patch=arch.patch_size if args.norm_pix_loss else None)

    start_epoch, step = 0, 0
    generator = torch.Generator().manual_seed(args.seed)
    if resume_state is not None:
        model = EnergyViT(arch)
    else:
        model = build_model(args, *channel_stats(train.images), train.images.shape[1])
    model.to(args.device)
    lr = args.lr if args.lr is not None else args.blr * args.batch_size / 256
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95))
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        generator.set_state(resume_state["generator"])
        torch.set_rng_state(resume_state["torch_rng"])
        start_epoch, step = resume_state["epoch"] + 1, resume_state["step"]

    step_fn = restore_fn = None
    if args.compile:
        from energyvit.compiled import compiled_restore, compiled_train_step

        step_fn, restore_fn = compiled_train_step(model, opts, generator), compiled_restore(model)

    steps_per_epoch = len(train.labels) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch_size {args.batch_size} exceeds the {len(train.labels)} training images")
    total, warmup = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    n_params = sum(p.numel() for p in model.parameters())
    print(f"energyvit pretrain: {model_name} ({n_params / 1e6:.2f}M params, attention {model.cfg.attn_backend}), "
          f"{len(train.labels)} train / {len(held_out.labels)} held-out digits at {model.cfg.img_size}px, "
          f"tasks {args.tasks}, K={model.cfg.restore_steps}, lr {lr:.2e}{', compiled' if args.compile else ''}", flush=True)

    log_path = out / "log.jsonl"
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        stats = train_one_epoch(model, train, mixture, optimizer, opts, args.batch_size, generator,
                                lambda s: cosine_lr(lr, s, total, warmup), step, args.clip_grad, args.shift,
                                step_fn=step_fn)
        step += stats.pop("steps")
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch, "step": step, **stats, "lr": optimizer.param_groups[0]["lr"],
                  "step_sizes": [round(a, 6) for a in model.step_sizes.tolist()],
                  "images_per_s": steps_per_epoch * args.batch_size / seconds, "epoch_s": seconds}
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"epoch {epoch + 1}/{args.epochs}  loss {stats['loss']:.4f}  "
              f"{record['images_per_s']:.0f} img/s  a_k {record['step_sizes']}", flush=True)
        save_checkpoint(out / CHECKPOINT_NAME, {
            "model": model.state_dict(), "model_config": config_to_dict(model.cfg),
            "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step, "args": vars(args),
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
        })

    restoration = evaluate_restoration(model, held_out, mixture, seed=args.seed + 1, restore_fn=restore_fn)
    probes = probe_accuracies(model, train, held_out, args.probe_pool, seed=args.seed + 2)
    summary = {**probes, "tasks": restoration, "model": model_name, "epochs": args.epochs, "seed": args.seed,
               "model_config": config_to_dict(model.cfg)}
    save_json(out / "summary.json", summary)
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    print("\nheld-out restoration (MSE over each task's region, pixel units):")
    print(f"  {'task':<10}{'corrupted':>12}{'restored':>12}")
    for name, r in summary["tasks"].items():
        print(f"  {name:<10}{r['mse_corrupted']:>12.5f}{r['mse_restored']:>12.5f}")
    print(f"held-out linear probe accuracy (frozen features, {summary['probe_pool']} pooling):")
    print(f"  pretrained   {summary['probe_acc']:.4f}")
    print(f"  random init  {summary['probe_acc_random_init']:.4f}")
    print(f"  raw pixels   {summary['probe_acc_raw_pixels']:.4f}")
