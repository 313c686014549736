"""The visible-patch encoder (--encoder_input visible, issue 22): under mim's split the encoder reads
the class token and the visible patches once per batch, the energy head reads its output and its
own embedding of the hidden patches' pixels, and every restoration step runs the head alone.
Checked in float64 against a reference built here by hand that recomputes the encoder at every step."""
import json
import os
import subprocess

import pytest
import torch
import torch.multiprocessing as mp

from energyvit.benchmark.flops import energy_step_flops, mae_step_flops, visible_step_flops
from energyvit.checkpoint import load_model
from energyvit.cli import main
from energyvit.distributed import AllReduceGradients, broadcast_parameters
from energyvit.losses import restoration_loss
from energyvit.methods.mae import default_decoder
from energyvit.model import EnergyViT, ModelOptions, model_config
from energyvit.objective import EnergyOptions, task_loss
from energyvit.options import OptionError
from energyvit.pretrain import PretrainOptions, RunOptions, build_method
from energyvit.restore import VisibleEncoderEnergy, restore
from energyvit.tasks import Corrupted, MaskedImageModeling, TaskOptions, build_task, mim_patch_counts
from helpers import TORCHRUN, fixed_corruption, free_port, images, needs_torchrun, process_group, rank_share, \
    sgd_steps, tiny_model, write_image_folder

PATCH, GRID, L = 2, 4, 16  # tiny_model: vit_pico_patch2 on 8x8 single-channel images
HEAD = dict(energy_head_depth=2, energy_head_dim=16)


def visible_model(seed=0, dtype=torch.float64, **kw):
    return tiny_model(dtype=dtype, seed=seed, encoder_input="visible", **{**HEAD, **kw})


def mim(x, seed=0, mask_ratio=0.5):
    return build_task("mim", PATCH, mask_ratio=mask_ratio)(x, torch.Generator().manual_seed(seed))


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def reference_energy(model: EnergyViT, x, hidden):
    """E(x; V, H) image by image without EnergyViT's split code: the encoder (its blocks) on the class
    token and the visible patches of x, cut out by reshape and embedded by the conv's weights as a
    matmul; the head's tokens of those, and of the hidden patches embedded by energy_patch_embed's
    weights; the head's blocks; the readout written out."""
    cfg = model.cfg
    B, C = x.shape[:2]
    xn = (x - model.pixel_mean) / model.pixel_std
    cut = xn.reshape(B, C, GRID, PATCH, GRID, PATCH)
    conv_order = cut.permute(0, 2, 4, 1, 3, 5).reshape(B, L, -1)  # (C, p, p): the conv's weight layout
    mae_order = cut.permute(0, 2, 4, 3, 5, 1).reshape(B, L, -1)  # (p, p, C): patchify's
    w = model.patch_embed.proj.weight.reshape(cfg.embed_dim, -1)
    out = []
    for i in range(B):
        hid = hidden[i]
        vis = torch.tensor([j for j in range(L) if j not in hid.tolist()])
        tokens = conv_order[i, vis] @ w.T + model.patch_embed.proj.bias + model.pos_embed[0, 1 + vis]
        z = torch.cat([model.cls_token[0] + model.pos_embed[0, :1], tokens])[None]
        for block in model.blocks:
            z = block(z)
        rows = torch.cat([torch.zeros(1, dtype=torch.long), 1 + vis])
        context = model.energy_embed(model.norm(z))[0] + model.energy_pos_embed[0, rows]
        e = model.energy_patch_embed
        hidden_tokens = mae_order[i, hid] @ e.weight.T + e.bias + model.energy_pos_embed[0, 1 + hid]
        z = torch.cat([context, hidden_tokens])[None]
        for block in model.energy_blocks:
            z = block(z)
        z = z[0]
        if cfg.energy == "norm":
            out.append(0.5 * z[1:].pow(2).sum() / z.shape[-1])
        else:
            out.append(0.5 * z[0].pow(2).sum() * L / z.shape[-1])
    return torch.stack(out)


def pixel_mask(hidden, batch):
    m = torch.zeros(batch, L).scatter_(1, hidden, 1.0).view(batch, 1, GRID, GRID)
    return m.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3) > 0


# ------------------------------------------------------------------------------------ the model
@pytest.mark.parametrize("energy", ["norm", "cls"])
def test_split_energy_is_the_hand_built_one_and_reads_the_pixels_of_hidden_patches_only(energy):
    model = visible_model(energy=energy)
    x = images(3)
    c = mim(x)
    assert c.hidden.shape == (3, 8) and torch.equal(c.hidden, c.hidden.sort(dim=1).values)
    assert torch.equal(pixel_mask(c.hidden, 3), c.update_mask > 0)  # mim's hidden patches are its update mask
    split = VisibleEncoderEnergy(model, c.image, c.hidden, grad=False)
    xi = c.image.clone().requires_grad_(True)
    energy_value = split(xi)
    torch.testing.assert_close(energy_value, reference_energy(model, c.image, c.hidden), rtol=1e-12, atol=0)
    (g,) = torch.autograd.grad(energy_value.sum(), xi)
    hid = pixel_mask(c.hidden, 3)
    assert (g[~hid] == 0).all() and (g[hid] != 0).all()  # dE/dx: hidden patches only
    # restoration moves the hidden patches only, even with an update mask everywhere and Langevin noise
    r = restore(model, c.image, None, noise_std=0.1, generator=torch.Generator().manual_seed(0), hidden=c.hidden)
    moved = r.restored != c.image
    assert not moved[~hid].any() and moved[hid].all()
    assert torch.allclose(r.energies[0], energy_value.detach(), rtol=1e-12, atol=0)


def test_without_a_split_the_model_is_the_head_model_whose_encoder_sees_every_patch():
    """forward(x), the features and a restoration without hidden: exactly the encoder_input 'all'
    model with the same weights (energy_patch_embed unused)."""
    visible = visible_model()
    every = tiny_model(**HEAD)
    missing, unexpected = every.load_state_dict(visible.state_dict(), strict=False)
    assert not missing and unexpected == ["energy_patch_embed.weight", "energy_patch_embed.bias"]
    x = images(3)
    assert torch.equal(visible(x), every(x))
    assert torch.equal(visible.forward_features(x), every.forward_features(x))
    assert torch.equal(visible.patch_energies(x), every.patch_energies(x))
    c = build_task("denoise", PATCH)(x, torch.Generator().manual_seed(0))
    assert c.hidden is None
    a, b = restore(visible, c.image, c.update_mask), restore(every, c.image, c.update_mask)
    assert torch.equal(a.restored, b.restored)
    # task_loss on a task without a split: the same loss and encoder gradients as the head model
    la, lb = task_loss(visible, x, c, EnergyOptions()), task_loss(every, x, c, EnergyOptions())
    assert torch.equal(la, lb)


# ------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("energy,contrast", [("norm", 0.0), ("norm", 0.5), ("cls", 0.5)])
def test_two_steps_with_the_encoder_run_once_equal_a_reference_that_reruns_it_every_step(energy, contrast):
    """K = 2, second order, float64: task_loss (the encoder once, the head each step, the explicit
    term's energies on the same features) against a loop around reference_energy that runs the
    encoder at every step on the current image, and on the clean and negative images."""
    model = visible_model(energy=energy)
    x = images(3)
    c = mim(x, seed=4)
    calls = []
    hook = model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    opts = EnergyOptions(contrast_weight=contrast, contrast_margin=0.1)
    loss = task_loss(model, x, c, opts)
    hook.remove()
    assert len(calls) == 1  # one encoder pass for K = 2 steps and the explicit term
    params = trainable(model)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    xk = c.image.clone().requires_grad_(True)
    for a in model.step_sizes:
        (g,) = torch.autograd.grad(reference_energy(model, xk, c.hidden).sum(), xk, create_graph=True)
        xk = xk - a * g * c.update_mask
    ref = ((xk - x).pow(2) * c.loss_mask).sum() / c.loss_mask.sum()
    if contrast:
        gap = (reference_energy(model, x, c.hidden) - reference_energy(model, xk.detach(), c.hidden)) / L
        ref = ref + contrast * torch.relu(0.1 + gap).mean()
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert all(g is not None for g in grads) and all(g is not None for g in ref_grads)
    for name, g, r in zip([n for n, p in model.named_parameters() if p.requires_grad], grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13, msg=name)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name in ("blocks.0.attn.qkv.weight", "energy_patch_embed.weight", "energy_blocks.0.attn.qkv.weight"):
        assert grads[names.index(name)].abs().sum() > 0, name


def test_fused_backends_give_the_math_gradients():
    """--fused: the encoder's and the head's blocks run the fused attention, LayerNorm and GELU (the
    Triton interpreter on the CPU); K = 2 split step, fp32: every parameter's gradient within 1e-5
    relative of the math/aten model's."""
    pytest.importorskip("triton")

    def grads(attn, ln_gelu):
        model = visible_model(dtype=torch.float32, attn_backend=attn, ln_gelu_backend=ln_gelu)
        x = images(3, dtype=torch.float32)
        task_loss(model, x, mim(x, seed=2), EnergyOptions(contrast_weight=0.5)).backward()
        return model, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    fused, got = grads("fused", "fused")
    assert fused.energy_blocks[0].attn.backend == "fused" and fused.energy_blocks[0].norm1.backend == "fused"
    _, ref = grads("math", "aten")
    assert got.keys() == ref.keys() and "energy_patch_embed.weight" in ref
    for name, g in ref.items():
        err = ((got[name] - g).norm() / g.norm().clamp_min(1e-30)).item()
        assert err < 1e-5, (name, err)


def test_pretrain_evaluates_with_the_split(tmp_path):
    """The held-out evaluation restores with the split, and its clean energy is E(clean; V, H)."""
    from types import SimpleNamespace

    from energyvit.methods.energy import evaluate_restoration

    options = PretrainOptions(model=ModelOptions(encoder_input="visible"), tasks=TaskOptions(mask_ratio=0.5))
    model = visible_model()
    method = build_method(options, model, SimpleNamespace(in_chans=1))
    x = images(4)
    name, loss = method.step_loss()(x, None, 0)
    assert name == "mim" and torch.isfinite(loss)
    results, _ = evaluate_restoration(model, x, method.eval_mixture, seed=3)
    c = method.eval_mixture.tasks["mim"](x, torch.Generator().manual_seed(3))
    r = restore(model, c.image, c.update_mask, hidden=c.hidden)
    assert results["mim"]["mse_restored"] == pytest.approx(restoration_loss(r.restored, x, c.loss_mask).item(),
                                                           rel=1e-12)
    clean = VisibleEncoderEnergy(model, c.image, c.hidden, grad=False)(x).mean().item()
    assert results["mim"]["energy_clean"] == pytest.approx(clean, rel=1e-12)
    with pytest.raises(ValueError, match="DDP cannot all-reduce"):
        method.step_loss(ddp=model)


# ------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("argv,needle", [
    (["--energy_head_depth", "0"], "must be all with --energy_head_depth 0"),
    (["--method", "mae"], "must be all with --method mae"),
    (["--tasks", "mim,sr"], "must be all with --tasks mim,sr"),
    (["--restore_fraction", "0.5"], "must be all with --restore_fraction 0.5"),
    (["--cuda_graphs"], "must be all with --cuda_graphs"),
    (["--second_order_blocks", "1"], "must be all with --second_order_blocks 1"),
    (["--encoder_input", "some"], "invalid choice: 'some'"),
])
def test_refused_combinations_give_one_line(argv, needle, capsys, tmp_path):
    assert main(["pretrain", "--encoder_input", "visible", *argv, "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "--encoder_input" in err, err


def test_the_python_api_refuses_bad_splits():
    with pytest.raises(OptionError, match="encoder_input"):
        ModelOptions(encoder_input="visible", energy_head_depth=0)
    with pytest.raises(OptionError, match="--method mae"):
        PretrainOptions(model=ModelOptions(encoder_input="visible"), run=RunOptions(method="mae"))
    with pytest.raises(ValueError, match="needs an energy head"):
        model_config("vit_pico_patch2", encoder_input="visible")
    x = images(2)
    c = mim(x)
    with pytest.raises(ValueError, match="needs a model with encoder_input 'visible'"):
        restore(tiny_model(**HEAD), c.image, c.update_mask, hidden=c.hidden)
    model = visible_model()
    with pytest.raises(ValueError, match="neither keep, energy_fn nor exact_blocks"):
        restore(model, c.image, c.update_mask, hidden=c.hidden, keep=c.hidden)
    with pytest.raises(ValueError, match="names a patch twice"):
        restore(model, c.image, c.update_mask, hidden=torch.tensor([[0, 0, 1], [1, 2, 3]]))
    with pytest.raises(ValueError, match="at least one of the 16 must stay visible"):
        restore(model, c.image, c.update_mask, hidden=torch.arange(L).expand(2, L))
    with pytest.raises(ValueError, match="outside 0..15"):
        restore(model, c.image, c.update_mask, hidden=torch.tensor([[0, 16], [1, 2]]))
    with pytest.raises(ValueError, match="computes its own energy"):
        task_loss(model, x, c, EnergyOptions(), energy_fn=model)
    with pytest.raises(ValueError, match="never takes"):
        task_loss(model, x, c, EnergyOptions(second_order_blocks=1))
    with pytest.raises(ValueError, match="visible/hidden split needs a model"):
        tiny_model(**HEAD).split_context(x, c.hidden)


# ------------------------------------------------------------------------------------ the command line
def test_pretrain_then_probe_finetune_restore_score_and_export(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", "--encoder_input", "visible", "--model", "vit_pico_patch2", "--batch_size", "250",
            "--warmup_epochs", "1", "--restore_steps", "2", "--contrast_weight", "0.1", "--epochs", "1",
            "--num_threads", "1", "--no-tensorboard", "--probe_images", "200", "--eval_images", "200",
            "--output_dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "encoder on the visible patches" in printed
    ckpt = out / "checkpoint-last.pth"
    state = torch.load(ckpt, weights_only=True)
    assert state["model_config"]["encoder_input"] == "visible" and "energy_patch_embed.weight" in state["model"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"]["mim"]["mse_restored"] < summary["tasks"]["mim"]["mse_corrupted"]
    model, _ = load_model(ckpt)
    assert model.cfg.encoder_input == "visible"

    # resumed after epoch 1 of 2: the same weights as 2 epochs uninterrupted (the split's draws repeat)
    at = argv.index("--epochs") + 1
    two = [*argv[:at], "2", *argv[at + 1:-1]]
    assert main(two + [str(tmp_path / "two")]) == 0
    assert main(two + [str(tmp_path / "resumed"), "--resume", str(ckpt)]) == 0
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1]  # it ran epoch 1 only, from the checkpoint
    a = torch.load(tmp_path / "two" / "checkpoint-last.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint-last.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)

    assert main(["probe", str(ckpt), "--pool", "mean", "--output", str(tmp_path / "probe.json")]) == 0
    assert main(["finetune", str(ckpt), "--epochs", "1", "--batch_size", "250", "--warmup_epochs", "1",
                 "--num_threads", "1", "--no-tensorboard", "--output_dir", str(tmp_path / "ft")]) == 0
    assert (tmp_path / "ft" / "checkpoint-last.pth").exists()

    from PIL import Image
    Image.fromarray((images(1, size=8, dtype=torch.float32)[0, 0].numpy() * 255).astype("uint8")).save(
        tmp_path / "digit.png")
    mask = Image.new("L", (8, 8))
    mask.paste(255, (0, 0, 3, 3))  # touches patches (0, 0), (0, 1), (1, 0), (1, 1)
    mask.save(tmp_path / "mask.png")
    capsys.readouterr()
    for extra in ([], ["--mask", str(tmp_path / "mask.png")]):
        assert main(["restore", str(ckpt), str(tmp_path / "digit.png"), "--task", "inpaint", *extra,
                     "--output", str(tmp_path / "restored.png")]) == 0
    assert "PSNR vs the input" in capsys.readouterr().out
    # a mask over every patch leaves nothing for the encoder: one line
    Image.new("L", (8, 8), 255).save(tmp_path / "all.png")
    assert main(["restore", str(ckpt), str(tmp_path / "digit.png"), "--task", "inpaint", "--mask",
                 str(tmp_path / "all.png"), "--output", str(tmp_path / "r2.png")]) == 2
    assert "needs at least one patch left visible" in capsys.readouterr().err

    assert main(["export", str(ckpt), "-o", str(tmp_path / "enc.safetensors")]) == 0
    from safetensors.torch import load_file
    assert not any(k.startswith("energy_") for k in load_file(tmp_path / "enc.safetensors"))
    assert main(["export", str(ckpt), "--full", "-o", str(tmp_path / "full.safetensors")]) == 0
    assert main(["restore", str(tmp_path / "full.safetensors"), str(tmp_path / "digit.png"), "--task", "inpaint",
                 "--output", str(tmp_path / "r3.png")]) == 0


def test_restore_command_splits_on_the_masked_patches(tmp_path):
    """`energyvit restore --mask` with a visible-encoder model: the split is every patch the mask
    touches; restored pixels outside the mask stay the input's, those inside move."""
    from energyvit.commands.restore import inpainting_split

    model = visible_model(dtype=torch.float32)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 0:3, 0:3] = 1
    c = Corrupted(torch.rand(1, 1, 8, 8), mask, mask)
    hidden = inpainting_split(model, "inpaint", c)
    assert hidden.tolist() == [[0, 1, 4, 5]]
    r = restore(model, c.image, c.update_mask, hidden=hidden)
    assert torch.equal(r.restored[mask == 0], c.image[mask == 0]) and (r.restored[mask > 0] != c.image[mask > 0]).all()
    assert inpainting_split(model, "denoise", c) is None and inpainting_split(tiny_model(**HEAD), "inpaint", c) is None


def test_score_restores_each_round_with_its_split():
    """energyvit score's restoration error: each round of hidden patches is the split; one round
    (every patch hidden) leaves nothing visible and is refused."""
    from energyvit.scoring import _pixel_mask, patch_mse, restoration_errors, rotation_masks

    model = visible_model()
    x = images(3)
    got = restoration_errors(model, x, rounds=2, seed=0)
    want = torch.zeros(3, L, dtype=x.dtype)
    for hidden in rotation_masks(L, 2, 0):
        mask = _pixel_mask(hidden, GRID, PATCH).to(x)
        r = restore(model, x * (1 - mask) + 0.5 * mask, mask.expand(3, -1, -1, -1),
                    hidden=hidden.nonzero().flatten().expand(3, -1))
        want[:, hidden] = patch_mse(r.restored, x, PATCH)[:, hidden]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    every = tiny_model(**HEAD)
    every.load_state_dict(model.state_dict(), strict=False)
    assert not torch.allclose(got, restoration_errors(every, x, rounds=2, seed=0))  # the split changed it
    with pytest.raises(ValueError, match="must stay visible"):
        restoration_errors(model, x, rounds=1)


# ------------------------------------------------------------------------------------ FLOPs
@pytest.mark.parametrize("energy", ["norm", "cls"])
@pytest.mark.parametrize("restore_steps", [1, 2])
def test_visible_step_flops_are_what_the_step_executes(one_thread, energy, restore_steps):
    """vit_nano_patch4 (16 patches, mask ratio 0.75: 4 visible, 12 hidden), pretrain's head: the
    encoder once on 1 + 4 tokens, the head K times on 17: counted = torch's FLOP counter, with and
    without the explicit energy term; and far below the default step."""
    from test_bench_flops import measured_flops

    cfg = ModelOptions(model="vit_nano_patch4", restore_steps=restore_steps, energy=energy,
                       encoder_input="visible").config(3)
    model = EnergyViT(cfg)
    clean = torch.rand(3, 3, 16, 16)
    c = build_task("mim", 4, TaskOptions())(clean, torch.Generator().manual_seed(0))
    hidden, _ = mim_patch_counts(cfg.num_patches, 0.75)
    assert c.hidden.shape == (3, hidden) == (3, 12)
    for opts, contrast in ((EnergyOptions(), False), (EnergyOptions(contrast_weight=0.5), True)):
        flops = measured_flops(lambda: task_loss(model, clean, c, opts).backward())
        counted = visible_step_flops(cfg, restore_steps, 3, hidden, contrast=contrast)
        assert counted == pytest.approx(flops, rel=1e-9)
        dense = ModelOptions(model="vit_nano_patch4", restore_steps=restore_steps, energy=energy).config(3)
        assert counted < 0.3 * energy_step_flops(dense, restore_steps, 3, contrast=contrast)


def test_visible_step_flops_at_vit_b_and_nano_against_the_default_and_mae():
    """The ratios docs/benchmarks.md states (mask ratio 0.75, K = 1, pretrain's head)."""
    ratios = {}
    for name, chans in (("vit_base_patch16", 3), ("vit_nano_patch4", 3)):
        cfg = ModelOptions(model=name, encoder_input="visible").config(chans)
        hidden, _ = mim_patch_counts(cfg.num_patches, 0.75)
        visible = visible_step_flops(cfg, 1, 1, hidden)
        default = energy_step_flops(ModelOptions(model=name).config(chans), 1, 1)
        enc = model_config(name, in_chans=chans)
        mae = mae_step_flops(enc, default_decoder(enc), cfg.num_patches - hidden, 1)
        ratios[name] = (visible / 1e9, visible / default, visible / mae)
    assert ratios["vit_base_patch16"] == pytest.approx((36.27, 0.161, 0.620), rel=2e-3)
    assert ratios["vit_nano_patch4"] == pytest.approx((0.01211, 0.245, 1.331), rel=2e-3)


def test_compare_methods_counts_a_visible_run(tmp_path):
    import importlib.util
    from pathlib import Path

    from energyvit.checkpoint import save_checkpoint
    from energyvit.model import config_to_dict

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("compare_methods", root / "experiments" / "compare_methods.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    options = PretrainOptions(model=ModelOptions(model="vit_pico_patch2", encoder_input="visible"),
                              tasks=TaskOptions(mask_ratio=0.5))
    cfg = options.model.config(3)
    path = tmp_path / "checkpoint-last.pth"
    save_checkpoint(path, {"model": EnergyViT(cfg).state_dict(), "model_config": config_to_dict(cfg),
                           "args": options.flat(), "global_step": 5, "method": "energy"})
    per_image = visible_step_flops(cfg, cfg.restore_steps, 1, 8)
    assert compare.training_flops(path) == pytest.approx(5 * options.train.batch_size * per_image, rel=1e-12)


# ------------------------------------------------------------------------------------ torchrun
BATCH = 8


def fixed_split(x):
    """helpers.fixed_corruption (every other patch hidden, the same in every image) with its split."""
    c = fixed_corruption(x)
    c.hidden = torch.arange(0, L, 2).expand(len(x), -1)
    return c


def split_step_loss(model):
    return lambda clean, labels, seed: ("mim", task_loss(model, clean, fixed_split(clean), EnergyOptions()))


def worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    with process_group(rank, world, port) as info:
        model = visible_model(seed=rank)  # other weights on rank 1 until the broadcast
        broadcast_parameters(model)
        share = rank_share(images(BATCH), rank, world, 1)
        after = sgd_steps(model, split_step_loss(model), share, BATCH // world, 1, info, AllReduceGradients(model))
        torch.save(after, f"{out}/rank{rank}.pt")


def test_two_processes_equal_one_process(tmp_path, one_thread):
    """2 gloo processes, each the split step on its 4 images, gradients all-reduced after the
    backward (as pretrain does for this option), one SGD step: the weights of one process on the
    global batch of 8, within rounding (float64)."""
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    model = visible_model()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    one = sgd_steps(model, split_step_loss(model), images(BATCH), BATCH, 1)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, w in one.items():
            torch.testing.assert_close(got[name], w, rtol=1e-10, atol=1e-13, msg=name)
    for name in ("blocks.0.attn.qkv.weight", "energy_patch_embed.weight"):
        assert (one[name] - initial[name]).abs().max() > 1e-4, name  # the step moved it


@needs_torchrun
def test_torchrun_pretrain_two_cpu_processes(tmp_path):
    """`torchrun --nproc_per_node 2 ... pretrain --encoder_input visible`: the gradients are
    all-reduced after each step (no DDP), 1 epoch of 2 steps, the evaluation and probe on rank 0."""
    write_image_folder(tmp_path / "data" / "train", 16, 0)
    write_image_folder(tmp_path / "data" / "val", 4, 1)
    out = tmp_path / "out"
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "energyvit", "pretrain",
           "--encoder_input", "visible", "--device", "cpu", "--data_path", str(tmp_path / "data"), "--model",
           "vit_pico_patch2", "--input_size", "8", "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "1",
           "--num_threads", "1", "--num_workers", "0", "--grid_rows", "2", "--no-tensorboard", "--output_dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "encoder on the visible patches" in done.stdout and "gradients all-reduced after each step" in done.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and log[-1]["loss"] > 0 and log[-1]["grad_norm"] > 0
    assert json.loads((out / "summary.json").read_text())["probe_acc"] is not None


def test_learned_fill_with_the_split():
    """--mask_fill learned with --encoder_input visible: the split reads the filled image (a NaN left
    where the fill goes would reach the patch embedding's weight gradient as 0 * NaN), and the fill
    patch learns through the head's embedding of the hidden patches."""
    model = tiny_model(energy_head_depth=2, energy_head_dim=16, encoder_input="visible", learned_fill=True)
    x = images(3)
    corrupted = MaskedImageModeling(2, 0.5, "learned")(x, torch.Generator().manual_seed(0))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loss = task_loss(model, x, corrupted, EnergyOptions(contrast_weight=0.5))
    grads = dict(zip([n for n, _ in named], torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)))
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    assert grads["mask_fill_patch"].abs().sum() > 0 and grads["patch_embed.proj.weight"].abs().sum() > 0
