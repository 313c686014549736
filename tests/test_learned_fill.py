"""--mask_fill learned (issue 22): a learnable pixel patch, a model parameter at mid-gray to start,
fills mim's hidden patches and trains through the restoration. At init it is the constant 0.5
fill bit for bit; its gradient is the loss's derivative; the compiled, graphed, fused and DDP steps
give the eager gradients; checkpoints, export, restore and score carry it; refusals are one line."""
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from energyvit.checkpoint import load_model, save_checkpoint
from energyvit.cli import main
from energyvit.distributed import AllReduceGradients, DDPGradients, ddp_energy_fn, wrap_ddp
from energyvit.model import ENERGY_ONLY_KEYS, config_from_dict, config_to_dict
from energyvit.objective import EnergyOptions, task_loss
from energyvit.options import OptionError
from energyvit.pretrain import PretrainOptions, RunOptions
from energyvit.tasks import Corrupted, Denoise, MaskedImageModeling, TaskOptions, build_task
from helpers import eager_replay_step, free_port, images, process_group, rank_share, sgd_steps, tiny_model

PATCH = 2  # tiny_model: vit_pico_patch2 on 8x8 single-channel images
MODELS = [dict(energy="norm", energy_head_depth=2, energy_head_dim=16), dict(energy="linear"), dict(energy="cls")]
MODEL_IDS = ["norm-head", "linear", "cls"]
# every special path of the loss: Langevin noise, the explicit energy term on the corrupted input
OPTS = EnergyOptions(langevin_std=0.05, contrast_weight=0.5, contrast_negative="corrupted")


def mim(fill, fraction=1.0):
    return MaskedImageModeling(PATCH, 0.5, fill, restore_fraction=fraction)


def learned_model(value=None, **kw):
    model = tiny_model(learned_fill=True, **kw)
    if value is not None:
        with torch.no_grad():
            model.mask_fill_patch.copy_(value)
    return model


def named_grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def tiled(model, size=8):
    return model.mask_fill_patch.detach().repeat(1, 1, size // PATCH, size // PATCH)


# ------------------------------------------------------------------------------------ the task and the model
def test_the_task_draws_as_a_constant_fill_and_leaves_the_fill_to_the_model():
    x = images(4)
    for fraction in (1.0, 0.5):
        g_const, g_learned = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        const, learned = mim(0.5, fraction)(x, g_const), mim("learned", fraction)(x, g_learned)
        # the same patches hidden, restored and entering; the generator where a constant fill leaves it
        assert torch.equal(const.update_mask, learned.update_mask) and torch.equal(const.loss_mask, learned.loss_mask)
        assert (const.keep is None and learned.keep is None) or torch.equal(const.keep, learned.keep)
        assert torch.equal(torch.rand(3, generator=g_const), torch.rand(3, generator=g_learned))
        # fill_mask: every hidden patch (also those sparse restoration drops); NaN there until filled
        hidden = mim(0.5)(x, torch.Generator().manual_seed(5)).update_mask
        assert torch.equal(learned.fill_mask, hidden) and const.fill_mask is None
        assert learned.image[hidden.expand_as(x) > 0].isnan().all()
        assert torch.equal(learned.image[hidden.expand_as(x) == 0], x[hidden.expand_as(x) == 0])
        if fraction < 1:
            assert (learned.fill_mask > learned.update_mask).any()  # dropped hidden patches are filled too
        model = learned_model()
        assert torch.equal(model.fill_hidden(learned.image, learned.fill_mask), const.image)  # 0.5 at init, bitwise


def test_fill_hidden_tiles_the_patch_and_a_model_without_one_refuses():
    model = learned_model(torch.arange(4.0).view(1, 1, 2, 2) / 4)
    x = images(2)
    mask = torch.zeros(1, 1, 8, 8, dtype=x.dtype)
    mask[..., 2:4, 4:8] = 1  # two patches of row 1
    out = model.fill_hidden(x, mask)
    assert torch.equal(out[..., 2:4, 4:6], model.mask_fill_patch.detach().expand(2, 1, 2, 2))
    assert torch.equal(out[..., 2:4, 6:8], model.mask_fill_patch.detach().expand(2, 1, 2, 2))
    assert torch.equal(out * (1 - mask), x * (1 - mask))
    assert model.cfg.learned_fill and tiny_model().mask_fill_patch is None
    with pytest.raises(ValueError, match="no learned fill patch"):
        tiny_model().fill_hidden(x, mask)
    c = mim("learned")(x, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="learned_fill is False"):
        task_loss(tiny_model(), x, c, EnergyOptions())


def test_the_patch_is_an_energy_only_key_without_weight_decay_and_old_configs_load_without_it():
    from energyvit.training import param_groups

    model = learned_model()
    assert model.mask_fill_patch.shape == (1, 1, PATCH, PATCH) and (model.mask_fill_patch == 0.5).all()
    assert "mask_fill_patch".startswith(ENERGY_ONLY_KEYS)
    assert any(p is model.mask_fill_patch for p in model.energy_parameters())
    no_decay = [p for g in param_groups(model, 0.05) if g["weight_decay"] == 0 for p in g["params"]]
    assert any(p is model.mask_fill_patch for p in no_decay)  # decay would pull it towards black
    old = config_to_dict(tiny_model().cfg)
    del old["learned_fill"]
    assert config_from_dict(old).learned_fill is False


# ------------------------------------------------------------------------------------ loss and gradients
@pytest.mark.parametrize("kw", MODELS, ids=MODEL_IDS)
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_at_init_the_learned_fill_is_the_constant_fill_bit_for_bit(kw, fraction):
    """Same weights, the patch at 0.5: the loss and every other parameter's gradient are those of
    --mask_fill 0.5 exactly (K = 2, Langevin noise, the energy term); the patch gets a gradient."""
    x = images(3)
    const_model, model = tiny_model(**kw), learned_model(**kw)
    model.load_state_dict(const_model.state_dict(), strict=False)
    losses = []
    for m, fill in ((const_model, 0.5), (model, "learned")):
        c = mim(fill, fraction)(x, torch.Generator().manual_seed(3))
        loss = task_loss(m, x, c, OPTS, torch.Generator().manual_seed(1))
        loss.backward()
        losses.append(loss)
    assert torch.equal(*losses)
    expected, got = named_grads(const_model), named_grads(model)
    assert set(got) - set(expected) == {"mask_fill_patch"}
    for name, g in expected.items():
        assert (g is None and got[name] is None) or torch.equal(g, got[name]), name
    assert got["mask_fill_patch"].abs().sum() > 0


def test_the_truncated_second_order_path_starts_from_the_filled_image_too():
    """--second_order_blocks: at init the learned fill is the constant fill bit for bit there as
    well, and the patch still gets a gradient (the gradient's value is exact, only its graph is cut)."""
    x = images(3)
    opts = EnergyOptions(second_order_blocks=1)
    const_model, model = tiny_model(), learned_model()
    model.load_state_dict(const_model.state_dict(), strict=False)
    losses = []
    for m, fill in ((const_model, 0.5), (model, "learned")):
        loss = task_loss(m, x, mim(fill)(x, torch.Generator().manual_seed(3)), opts)
        loss.backward()
        losses.append(loss)
    assert torch.equal(*losses)
    expected, got = named_grads(const_model), named_grads(model)
    assert all((g is None and got[n] is None) or torch.equal(g, got[n]) for n, g in expected.items())
    assert got["mask_fill_patch"].abs().sum() > 0


def test_the_patch_gradient_is_the_derivative_of_the_loss():
    """d loss / d patch through K = 2 steps (and sparse restoration) against central differences, float64."""
    x = images(3)
    model = learned_model(torch.tensor([[[[0.2, 0.7], [0.4, 0.9]]]], dtype=torch.float64))
    c = mim("learned", 0.5)(x, torch.Generator().manual_seed(2))
    opts = EnergyOptions(contrast_weight=0.5)
    task_loss(model, x, c, opts).backward()
    grad = model.mask_fill_patch.grad.clone()
    eps = 1e-6
    for i in range(PATCH * PATCH):
        with torch.no_grad():
            flat = model.mask_fill_patch.view(-1)
            flat[i] += eps
            up = task_loss(model, x, c, opts).item()
            flat[i] -= 2 * eps
            down = task_loss(model, x, c, opts).item()
            flat[i] += eps
        assert grad.view(-1)[i].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-10)


def test_a_task_that_hides_nothing_gives_the_patch_a_zero_gradient_not_none():
    x = images(3)
    model = learned_model()
    task_loss(model, x, Denoise(0.2)(x, torch.Generator().manual_seed(0)), EnergyOptions()).backward()
    assert model.mask_fill_patch.grad is not None and not model.mask_fill_patch.grad.any()
    assert model.blocks[0].attn.qkv.weight.grad.any()


def test_the_patch_changes_with_training():
    from types import SimpleNamespace

    from energyvit.pretrain import build_method

    options = PretrainOptions(tasks=TaskOptions(mask_ratio=0.5, mask_fill="learned"))
    model = learned_model(dtype=torch.float32)
    method = build_method(options, model, SimpleNamespace(in_chans=1))
    x = images(16, dtype=torch.float32)
    sgd_steps(model, method.step_loss(), x, 8, 1, steps=2)
    assert not torch.allclose(model.mask_fill_patch, torch.full_like(model.mask_fill_patch, 0.5))
    record = method.record()["mask_fill_patch"]
    assert record["min"] < record["max"] and set(record) == {"min", "mean", "max"}
    results, samples = method.evaluate(x, seed=0, keep_samples=2)
    assert torch.isfinite(samples["mim"][0]).all()  # the pictures show the filled image
    c = mim("learned")(x, torch.Generator().manual_seed(0))
    filled = model.fill_hidden(c.image, c.fill_mask)
    from energyvit.losses import restoration_loss
    assert results["mim"]["mse_corrupted"] == pytest.approx(restoration_loss(filled, x, c.loss_mask).item(), rel=1e-6)


# ------------------------------------------------------------------------------------ compiled, graphed, fused
def mixture_batches(x):
    """A learned-fill mim batch, a sparse one and a denoise batch (which hides nothing)."""
    return [mim("learned")(x, torch.Generator().manual_seed(0)), mim("learned", 0.5)(x, torch.Generator().manual_seed(1)),
            Denoise(0.2)(x, torch.Generator().manual_seed(2))]


def grads_of_step(model, step_fn, x, c):
    """The gradients one call of step_fn(x, c) -> loss and its backward leave, from none."""
    model.zero_grad(set_to_none=True)
    step_fn(x, c).backward()
    return named_grads(model)


def assert_close_grads(got, expected, rtol):
    assert [n for n, g in got.items() if g is None] == [n for n, g in expected.items() if g is None]
    fa = torch.cat([g.flatten() for g in got.values() if g is not None])
    fb = torch.cat([g.flatten() for g in expected.values() if g is not None])
    assert ((fa - fb).norm() / fb.norm()).item() < rtol
    torch.testing.assert_close(got["mask_fill_patch"], expected["mask_fill_patch"], rtol=rtol, atol=1e-14)


def test_the_compiled_step_fills_inside_its_graph_and_matches_eager():
    """One compiled graph (aot_eager: the trace, without an Inductor compile's time) serves the
    learned-fill mim batch, a sparse one and a denoise batch; loss and gradients, the patch's too,
    are eager's (float64)."""
    from energyvit.compiled import compile_support, compiled_train_step

    if not compile_support()[0]:
        pytest.skip(compile_support()[1])
    model = learned_model(torch.tensor([[[[0.2, 0.7], [0.4, 0.9]]]], dtype=torch.float64))
    x = images(4)
    step = compiled_train_step(model, EnergyOptions(contrast_weight=0.5), backend="aot_eager")
    for i, c in enumerate(mixture_batches(x)[::2]):  # sparse restoration is its own graph: its keep input
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback
            got = grads_of_step(model, step, x, c)
        loss, ref_loss = step(x, c), task_loss(model, x, c, EnergyOptions(contrast_weight=0.5))
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
        expected = grads_of_step(model, lambda x, c: task_loss(model, x, c, EnergyOptions(contrast_weight=0.5)), x, c)
        assert_close_grads(got, expected, 1e-9)
        assert got["mask_fill_patch"].any() == (i == 0)
    assert step.mode == "compiled" and step.compiled_graphs() == 1


@pytest.mark.parametrize("compiled", [False, True])
def test_the_graphed_step_replays_the_fill_and_matches_eager(compiled):
    """The CUDA-graphed step's bookkeeping (the graph run eagerly: helpers.eager_replay_step): the
    fill mask is a static input refilled at each replay, the patch's gradient a static tensor."""
    from energyvit.compiled import compile_support, compiled_train_step

    if compiled and not compile_support()[0]:
        pytest.skip(compile_support()[1])
    opts = EnergyOptions(contrast_weight=0.5)
    model = learned_model(torch.tensor([[[[0.2, 0.7], [0.4, 0.9]]]], dtype=torch.float64))
    x = images(4)
    inner = compiled_train_step(model, opts, backend="aot_eager") if compiled else None
    step = eager_replay_step(model, opts, inner, warmup_steps=1)
    batches = mixture_batches(x)[::2] if compiled else mixture_batches(x)[::2] + mixture_batches(x)[:1]
    for c in [batches[0], *batches]:
        got = grads_of_step(model, step, x, c)
        assert_close_grads(got, grads_of_step(model, lambda x, c: task_loss(model, x, c, opts), x, c), 1e-9)
    assert step.mode == "graph"


def test_fused_kernels_give_the_math_paths_patch_gradient():
    pytest.importorskip("triton")
    patch = torch.tensor([[[[0.2, 0.7], [0.4, 0.9]]]])
    model = learned_model(patch, dtype=torch.float32, attn_backend="fused")
    reference = learned_model(patch.double(), dtype=torch.float64)
    reference.load_state_dict(model.state_dict())
    x = images(3)
    c = mim("learned", 0.5)(x, torch.Generator().manual_seed(0))

    def grads(m, dtype):
        corrupted = Corrupted(c.image.to(dtype), c.loss_mask.to(dtype), c.update_mask.to(dtype), c.keep,
                              c.fill_mask.to(dtype))
        task_loss(m, x.to(dtype), corrupted, EnergyOptions()).backward()
        return m.mask_fill_patch.grad.double()

    fused, math = grads(model, torch.float32), grads(reference, torch.float64)
    assert ((fused - math).norm() / math.norm()).item() < 1e-5


# ------------------------------------------------------------------------------------ two processes (gloo)
BATCH = 8


def alternating_step_loss(model, ddp=None):
    """Even calls: a fixed learned-fill mim corruption (the same hidden area in every image, so
    per-rank means average to the global one); odd calls: a deterministic noise, nothing hidden."""
    calls = []

    def step_loss(clean, labels, seed):
        calls.append(1)
        if len(calls) % 2:
            mask = torch.zeros(1, 1, 4, 4, dtype=clean.dtype)
            mask.view(-1)[::3] = 1
            mask = mask.repeat_interleave(2, 2).repeat_interleave(2, 3).expand(len(clean), 1, 8, 8)
            c = Corrupted(clean.masked_fill(mask > 0, float("nan")), mask, mask, fill_mask=mask)
        else:
            c = Corrupted(clean + 0.1 * torch.sin(37 * clean), torch.ones_like(clean), None)
        energy_fn = ddp_energy_fn(ddp, model) if ddp is not None else None
        return "mim", task_loss(model, clean, c, EnergyOptions(), energy_fn=energy_fn)
    return step_loss


def fill_model():
    model = learned_model()
    model.norm.requires_grad_(False)  # as EnergyMethod does: DDP wants a gradient for every trainable one
    return model


def fill_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    with process_group(rank, world, port) as info:
        share = rank_share(images(2 * BATCH), rank, world, 2)
        model = fill_model()
        ddp = wrap_ddp(model, torch.device("cpu"))
        after_ddp = sgd_steps(model, alternating_step_loss(model, ddp), share, BATCH // world, 1, info,
                              DDPGradients(ddp), steps=2)
        model = fill_model()
        after_explicit = sgd_steps(model, alternating_step_loss(model), share, BATCH // world, 1, info,
                                   AllReduceGradients(model), steps=2)
        torch.save({"ddp": after_ddp, "explicit": after_explicit}, f"{out}/rank{rank}.pt")


def test_two_processes_train_the_patch_as_one(tmp_path):
    """Two SGD steps (a learned-fill mim batch, then one that hides nothing) on 2 gloo processes,
    under DDP and under the explicit all-reduce, give one process's weights on the global batches."""
    mp.spawn(fill_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    model = fill_model()
    expected = sgd_steps(model, alternating_step_loss(model), images(2 * BATCH), BATCH, 1, steps=2)
    assert not torch.allclose(expected["mask_fill_patch"], torch.full_like(expected["mask_fill_patch"], 0.5))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for kind in ("ddp", "explicit"):
            for name, w in expected.items():
                torch.testing.assert_close(got[kind][name], w, rtol=1e-10, atol=1e-13, msg=f"{kind} {name}")


# ------------------------------------------------------------------------------------ options and refusals
@pytest.mark.parametrize("argv,needle", [
    (["--method", "mae"], "--mask_fill: must be a constant or 'noise' with --method mae"),
    (["--tasks", "sr,denoise"], "must be a constant or 'noise' with --tasks sr,denoise"),
])
def test_refused_combinations_give_one_line(argv, needle, capsys, tmp_path):
    assert main(["pretrain", "--mask_fill", "learned", *argv, "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_the_python_api_takes_learned_and_refuses_the_same():
    assert TaskOptions(mask_fill="learned").mask_fill == "learned"
    assert build_task("mim", PATCH, mask_fill="learned").fill == "learned"
    for bad in ("lerned", 1.5):
        with pytest.raises(OptionError, match="'noise', 'learned' or a pixel value"):
            TaskOptions(mask_fill=bad)
    with pytest.raises(OptionError, match="needs mim among the tasks"):
        TaskOptions(tasks="denoise", mask_fill="learned")
    with pytest.raises(OptionError, match="--method mae"):
        PretrainOptions(tasks=TaskOptions(mask_fill="learned"), run=RunOptions(method="mae"))
    with pytest.raises(ValueError, match="'noise', 'learned' or a number"):
        MaskedImageModeling(PATCH, fill="gray")


# ------------------------------------------------------------------------------------ checkpoints and commands
PICO = ["pretrain", "--model", "vit_pico_patch2", "--batch_size", "100", "--num_threads", "1", "--no-tensorboard",
        "--grid_rows", "0", "--probe_images", "200", "--mask_fill", "learned"]


def test_pretrain_saves_the_patch_resumes_and_commands_use_it(tmp_path, capsys, one_thread, monkeypatch):
    out = tmp_path / "run"
    assert main(PICO + ["--epochs", "1", "--output_dir", str(out)]) == 0
    assert "learned fill" in capsys.readouterr().out
    ckpt = out / "checkpoint-last.pth"
    state = torch.load(ckpt, weights_only=True)
    assert state["model_config"]["learned_fill"] and state["args"]["mask_fill"] == "learned"
    after_one = state["model"]["mask_fill_patch"]
    assert after_one.shape == (1, 1, PATCH, PATCH) and not torch.allclose(after_one, torch.full_like(after_one, 0.5))
    assert main(PICO + ["--resume", str(ckpt), "--epochs", "2", "--output_dir", str(out)]) == 0
    after_two = torch.load(ckpt, weights_only=True)["model"]["mask_fill_patch"]
    assert not torch.equal(after_two, after_one)  # the resumed run goes on training it
    model, meta = load_model(ckpt)
    assert torch.equal(model.mask_fill_patch.detach(), after_two) and meta["mask_fill"] == '"learned"'

    # export: the encoder alone leaves it out (timm has no place for it), --full keeps it
    from safetensors.torch import load_file

    from energyvit.export import export
    export(ckpt, tmp_path / "enc.safetensors")
    export(ckpt, tmp_path / "full.safetensors", full=True)
    assert "mask_fill_patch" not in load_file(tmp_path / "enc.safetensors")
    assert torch.equal(load_file(tmp_path / "full.safetensors")["mask_fill_patch"], after_two)

    # restore fills with the learned patch by default (random patches and a mask file), a number when given
    import numpy as np
    from PIL import Image

    import energyvit.commands.restore as restore_cmd
    Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    Image.fromarray(np.kron(np.eye(2, dtype=np.uint8), np.ones((4, 4), np.uint8)) * 255).save(tmp_path / "mask.png")
    seen = []
    real = restore_cmd.restore
    monkeypatch.setattr(restore_cmd, "restore", lambda m, image, mask, **kw: seen.append((image, mask)) or real(
        m, image, mask, **kw))
    for source in (ckpt, tmp_path / "full.safetensors"):
        for extra in ([], ["--mask", str(tmp_path / "mask.png")], ["--mask_fill", "0.25"], ["--mask_fill", "noise"]):
            assert main(["restore", str(source), str(tmp_path / "in.png"), "--task", "inpaint", "-o",
                         str(tmp_path / "o.png"), *extra]) == 0
    tile = after_two.repeat(1, 1, 4, 4)
    for i, (image, mask) in enumerate(seen):
        hidden = mask.expand_as(image) > 0
        assert hidden.any() and torch.isfinite(image).all()
        if i % 4 < 2:
            assert torch.equal(image[hidden], tile.expand_as(image)[hidden])
        elif i % 4 == 2:
            assert (image[hidden] == 0.25).all()
    capsys.readouterr()

    # score's restoration errors hide patches under the learned fill
    from energyvit.scoring import restoration_errors
    x = images(2, dtype=torch.float32)
    assert not torch.equal(restoration_errors(model, x, fill="learned"), restoration_errors(model, x, fill=0.5))
    with torch.no_grad():
        model.mask_fill_patch.fill_(0.5)
    assert torch.equal(restoration_errors(model, x, fill="learned"), restoration_errors(model, x, fill=0.5))


def test_restore_refuses_learned_for_a_checkpoint_without_the_patch(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    model = tiny_model(dtype=torch.float32)
    save_checkpoint(tmp_path / "c.pth", {"model": model.state_dict(), "model_config": config_to_dict(model.cfg),
                                         "args": {"mask_fill": 0.5}})
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "in.png")
    assert main(["restore", str(tmp_path / "c.pth"), str(tmp_path / "in.png"), "--task", "inpaint", "-o",
                 str(tmp_path / "o.png"), "--mask_fill", "learned"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--mask_fill learned" in err and "has no learned fill patch" in err, err
