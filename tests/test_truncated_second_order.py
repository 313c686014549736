"""Truncated second order (--second_order_blocks L, energyvit.restore.input_gradient): the restoring
gradient keeps its exact value, but the training loss differentiates it through the energy head
and the last L encoder blocks only, the blocks below counting as the identity. Checked in float64
against the exact path."""
import pytest
import torch

from energyvit.cli import main
from energyvit.objective import EnergyOptions, task_loss
from energyvit.options import OptionError
from energyvit.pretrain import PretrainOptions, RunOptions
from energyvit.restore import input_gradient
from energyvit.tasks import MaskedImageModeling, TaskOptions
from helpers import assert_ddp_task_loss_grads, images, tiny_model

DEPTH = 2  # tiny_model: vit_pico_patch2
HEAD = dict(energy_head_depth=2, energy_head_dim=16)


def corrupted_batch(x, restore_fraction=1.0):
    return MaskedImageModeling(2, 0.5, 0.5, restore_fraction)(x, torch.Generator().manual_seed(0))


def step_grads(model, x, corrupted, blocks):
    """Parameter gradients of the training loss through K=2 restoration steps, by name."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loss = task_loss(model, x, corrupted, EnergyOptions(second_order_blocks=blocks, contrast_weight=0.5))
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)}


@pytest.mark.parametrize("restore_fraction", [1.0, 0.5])
def test_every_block_exact_is_the_exact_path_and_the_gradient_value_never_changes(restore_fraction):
    model = tiny_model(**HEAD)
    x = images(3)
    c = corrupted_batch(x, restore_fraction)
    exact = step_grads(model, x, c, None)
    for name, g in step_grads(model, x, c, DEPTH).items():
        torch.testing.assert_close(g, exact[name], rtol=1e-12, atol=1e-15, msg=name)
    x0 = c.image.clone().requires_grad_(True)
    energy, grad = input_gradient(lambda t, **kw: model(t, c.keep, **kw), x0, True)
    for blocks in range(DEPTH):
        e, g = input_gradient(lambda t, **kw: model(t, c.keep, **kw), x0, True, blocks)
        torch.testing.assert_close(e, energy, rtol=1e-13, atol=0)
        torch.testing.assert_close(g, grad, rtol=1e-12, atol=1e-15)
        assert g.requires_grad


@pytest.mark.parametrize("blocks", [0, 1])
def test_the_blocks_below_count_as_the_identity(blocks):
    """With the residual branches of the blocks below the cut zeroed, those blocks are the identity,
    so the truncated path differentiates the same function as the exact one: every gradient agrees
    except those of the zeroed branches' output weights, whose second-order term only the exact path
    has. With the branches live the two differ: the option does drop something."""
    model = tiny_model(**HEAD)
    x = images(3)
    c = corrupted_batch(x)
    live_exact, live_cut = step_grads(model, x, c, None), step_grads(model, x, c, blocks)
    assert (live_cut["blocks.1.attn.qkv.weight"] - live_exact["blocks.1.attn.qkv.weight"]).abs().max() > 1e-6
    zeroed = []
    with torch.no_grad():
        for i, block in enumerate(model.blocks[:DEPTH - blocks]):
            for layer, name in ((block.attn.proj, "attn.proj"), (block.mlp.fc2, "mlp.fc2")):
                layer.weight.zero_()
                layer.bias.zero_()
                zeroed.append(f"blocks.{i}.{name}.weight")
    exact, cut = step_grads(model, x, c, None), step_grads(model, x, c, blocks)
    for name, g in cut.items():
        if name not in zeroed:
            torch.testing.assert_close(g, exact[name], rtol=1e-10, atol=1e-13, msg=name)
    assert all((cut[n] - exact[n]).abs().max() > 1e-8 for n in zeroed)


def test_the_ddp_energy_passes_the_cut_through():
    """Under DDP the first energy of a step is the wrapper's forward, the split streams come back
    through it, and the gradients are those without DDP."""
    x = images(3)
    assert_ddp_task_loss_grads(tiny_model(**HEAD), x, corrupted_batch(x, 0.5), EnergyOptions(second_order_blocks=1))


def test_bad_cut_gives_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="exact_blocks must be in 0..2"):
        model(images(1), exact_blocks=3)
    with pytest.raises(OptionError, match="second_order_blocks"):
        EnergyOptions(second_order_blocks=-1)
    with pytest.raises(OptionError, match="at most vit_nano_patch4's depth 4"):
        PretrainOptions(energy=EnergyOptions(second_order_blocks=5))
    with pytest.raises(OptionError, match="left off with --compile"):
        PretrainOptions(energy=EnergyOptions(second_order_blocks=1), run=RunOptions(compile=True))
    PretrainOptions(energy=EnergyOptions(second_order_blocks=4), tasks=TaskOptions(tasks="mim,denoise"))


@pytest.mark.parametrize("argv,needle", [
    (["--second_order_blocks", "-1"], "--second_order_blocks"),
    (["--second_order_blocks", "9"], "at most vit_nano_patch4's depth 4"),
    (["--second_order_blocks", "1", "--method", "mae"], "left off with --method mae"),
    (["--second_order_blocks", "1", "--cuda_graphs"], "left off with --cuda_graphs"),
])
def test_refused_flags_give_one_line(argv, needle, capsys, tmp_path):
    assert main(["pretrain", *argv, "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_pretrain_trains_with_a_truncated_path(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", "--model", "vit_pico_patch2", "--input_size", "8", "--epochs", "1", "--batch_size", "32",
            "--second_order_blocks", "1", "--output_dir", str(out), "--grid_rows", "0", "--no-tensorboard",
            "--probe_images", "64", "--eval_images", "32"]
    assert main(argv) == 0
    state = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert state["args"]["second_order_blocks"] == 1
