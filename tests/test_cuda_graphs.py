"""CUDA graphs for the training step (energyvit.cuda_graphs, `pretrain --cuda_graphs`).

On the CPU: the support checks, the fallbacks (one warning, the ordinary step's exact results),
the captured loss function against the eager step, the optimizer's state dict, and everything
around the graph with the graph replaced by running its function eagerly (helpers.eager_replay_step):
accumulation over micro-batches, the loss weight check and sparse restoration's kept patches.
With CUDA (bench/gpu_check.sh runs this file there): replayed gradients and optimizer updates
against the eager step and AdamW, in a task mixture with Langevin noise, through the training
loop (also accumulating over micro-batches, and with the gradient all-reduce of a one-process
group between the two graphs), compiled, with sparse restoration, and the fallbacks after a
capture error and for a batch of another shape.
"""
import warnings

import pytest
import torch

import energyvit.cuda_graphs as cg
from energyvit.cli import main
from energyvit.objective import EnergyOptions, task_loss
from energyvit.tasks import build_task
from helpers import eager_replay_step, free_port, images, tiny_model

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
OPTS = EnergyOptions(langevin_std=0.05)  # noise: a static input the graph must not freeze


@pytest.fixture(autouse=True)
def fresh_warnings():
    cg._WARNED.clear()  # "one warning" is per process; each test sees its own
    yield


def grads_of(model):
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def assert_grads_close(a, b, rtol):
    assert [g is None for g in a] == [g is None for g in b]
    fa = torch.cat([g.flatten().double() for g in a if g is not None])
    fb = torch.cat([g.flatten().double() for g in b if g is not None])
    assert ((fa - fb).norm() / fb.norm()).item() < rtol


def eager_step(model, clean, corrupted, seed, opts=OPTS):
    model.zero_grad(set_to_none=True)
    loss = task_loss(model, clean, corrupted, opts, torch.Generator(clean.device).manual_seed(seed))
    loss.backward()
    return loss.detach(), grads_of(model)


def run_step(step_fn, model, clean, corrupted, seed):
    model.zero_grad(set_to_none=True)
    loss = step_fn(clean, corrupted, torch.Generator(clean.device).manual_seed(seed))
    loss.backward()
    return loss.detach(), grads_of(model)


def tasks(x):
    """A mixture's two kinds of corruption: with an update mask (mim) and without (denoise)."""
    g = torch.Generator(x.device).manual_seed(3)
    return [build_task("mim", 2, mask_ratio=0.5)(x, g), build_task("denoise", 2)(x, g)]


# ------------------------------------------------------------------------------------ CPU
def test_support_says_why_not():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "CUDA device" in cg.cuda_graph_support(cpu)[1]
    assert "Langevin" in cg.cuda_graph_support(cuda, compiled=True, langevin_std=0.1)[1]
    assert cg.cuda_graph_support(cuda) == (True, "")
    assert cg.cuda_graph_support(cuda, compiled=True) == (True, "")
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device"):
        assert not cg.cuda_graphs_usable(cpu)


@pytest.mark.parametrize("opts", [OPTS, EnergyOptions(langevin_std=0.05, contrast_weight=0.5, contrast_margin=1.0)],
                         ids=["restoration", "with_energy_term"])
def test_captured_loss_is_the_eager_step(opts):
    """What the graph captures (the step on static inputs: noise drawn up front, an all-ones mask
    for a task without one) gives the eager step's loss and gradients, float64, the explicit
    energy term (--contrast_weight) included."""
    model = tiny_model()
    x = images(3)
    step = cg.GraphedLossStep(model, opts)
    for i, c in enumerate(tasks(x)):
        ref_loss, ref = eager_step(model, x, c, seed=i, opts=opts)
        model.zero_grad(set_to_none=True)
        loss = step._loss(*step._inputs(x, c, torch.Generator().manual_seed(i)))
        loss.backward()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-13)
        assert_grads_close(grads_of(model), ref, 1e-12)


def test_capture_failure_warns_once_and_runs_the_ordinary_step():
    """Past the warm-up the step tries to capture; without CUDA that fails: one warning, then the
    ordinary step, exactly, for this call and every later one."""
    model = tiny_model()
    x = images(3)
    opt = cg.GraphedAdamW(model.parameters(), lr=1e-3)
    step = cg.GraphedLossStep(model, OPTS, warmup_steps=1, optimizer=opt)
    c = tasks(x)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(3):
            loss, grads = run_step(step, model, x, c, seed)
            ref_loss, ref = eager_step(model, x, c, seed)
            assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-13)
            assert_grads_close(grads, ref, 1e-12)
    assert step.mode == "off" and opt._params == []  # the optimizer is disarmed too
    assert [str(w.message) for w in caught if "capturing the training step failed" in str(w.message)] == [
        str(caught[0].message)]


def test_warmup_must_be_at_least_one_step():
    with pytest.raises(ValueError, match="warmup_steps must be >= 1"):
        cg.GraphedLossStep(tiny_model(), OPTS, warmup_steps=0)
    with pytest.raises(ValueError, match="accum_iter must be >= 1"):
        cg.GraphedLossStep(tiny_model(), OPTS, accum_iter=0)


def train_loop(model, step_fn, optimizer, accum, steps=4, batch=3, grad_sync=None, seed=5, opts=OPTS):
    """train_one_epoch over `steps` optimizer steps of a task mixture (mim, denoise; by default with
    Langevin noise), `accum` micro-batches each, gradients clipped; step_fn None: the ordinary step."""
    from energyvit.distributed import LocalGradients
    from energyvit.methods.energy import EnergyMethod
    from energyvit.tasks import build_mixture
    from energyvit.training import EpochPlan, train_one_epoch

    method = EnergyMethod(model, build_mixture("mim:0.5,denoise:0.5", 2, 1), opts)
    method.step_fn = step_fn
    x = images(steps * accum * batch, dtype=next(model.parameters()).dtype)
    batches = [(x[i: i + batch], None, torch.zeros(batch)) for i in range(0, len(x), batch)]
    plan = EpochPlan(epoch=0, steps=steps, start_step=0, global_step=0, accum_iter=accum, clip_grad=1.0, seed=seed)
    stats = train_one_epoch(model, method.step_loss(), batches, optimizer, plan, lambda s: 1e-3 * (1 - s / steps),
                            method.task_names, grad_sync=grad_sync or LocalGradients())
    return stats


@pytest.mark.parametrize("accum,warmup", [(1, 2), (2, 3), (3, 2)])
def test_replays_accumulate_micro_batches_as_the_ordinary_loop(accum, warmup):
    """Everything around the graph (static gradients zeroed at each optimizer step's start, the
    replays adding d(loss / accum)/d theta into them, a capture in the middle of an optimizer step
    taking over the gradients of its earlier micro-batches) gives the ordinary loop's weights after
    4 optimizer steps, float64, 1e-12 relative; the graph itself replaced by running its function."""
    ref = tiny_model()
    train_loop(ref, None, torch.optim.SGD(ref.parameters(), lr=0.1), accum)
    model = tiny_model()
    step = eager_replay_step(model, OPTS, warmup_steps=warmup, accum_iter=accum)
    train_loop(model, step, torch.optim.SGD(model.parameters(), lr=0.1), accum)
    assert step.mode == "graph" and step.calls == 4 * accum
    assert all(p.grad is g for p, g in zip(step._params(), step.static_grads))
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)
    assert not torch.equal(ref.blocks[0].attn.qkv.weight, tiny_model().blocks[0].attn.qkv.weight)


def test_replays_of_the_compiled_step_accumulate_too():
    """The compiled step inside the graph (its gradients handed out by the backward of its loss)
    adds into the static gradients like the eager one: 2 micro-batches per step against the
    ordinary loop, float64, 1e-10 relative (aot_eager backend: the bookkeeping, not Inductor)."""
    from energyvit.compiled import compile_support, compiled_train_step

    if not compile_support()[0]:
        pytest.skip(compile_support()[1])
    opts = EnergyOptions()  # no Langevin noise: the compiled step under a graph draws none (cuda_graph_support)
    ref = tiny_model()
    train_loop(ref, None, torch.optim.SGD(ref.parameters(), lr=0.1), 2, steps=3, opts=opts)
    model = tiny_model()
    inner = compiled_train_step(model, opts, backend="aot_eager")
    step = eager_replay_step(model, opts, inner, warmup_steps=1, accum_iter=2)
    train_loop(model, step, torch.optim.SGD(model.parameters(), lr=0.1), 2, steps=3, opts=opts)
    assert step.mode == "graph" and inner.mode == "compiled"
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-13, msg=name)


def test_replays_give_the_eager_gradients_and_none_where_the_step_never_reaches():
    """Replayed calls (graph replaced by running its function) give the eager step's gradients,
    float64, and a parameter the backward never reaches (the final norm, under the `norm`
    readout) keeps no gradient, as in the eager step: a zero one would let AdamW decay it."""
    model = tiny_model()
    x = images(3)
    step = eager_replay_step(model, OPTS, warmup_steps=1)
    for seed in range(3):
        c = tasks(x * (0.5 + 0.1 * seed))[seed % 2]
        loss, grads = run_step(step, model, x, c, seed)
        ref_loss, ref = eager_step(model, x, c, seed)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-13)
        assert_grads_close(grads, ref, 1e-12)  # the same parameters without a gradient, too
    assert step.mode == "graph" and model.norm.weight.grad is None and model.norm.weight.requires_grad


def sparse_tasks(x, seed):
    """mim with restore_fraction 0.5: its own kept patches at every seed (a static input to copy)."""
    return build_task("mim", 2, mask_ratio=0.5, restore_fraction=0.5)(x, torch.Generator(x.device).manual_seed(seed))


@pytest.mark.parametrize("compiled", [False, True])
def test_replays_of_sparse_restoration_give_the_eager_gradients(compiled):
    """Sparse restoration: the indices of the patches that enter are a static input, refilled at each
    replay (new indices every call); eager or compiled (aot_eager) inside, float64, against eager."""
    from energyvit.compiled import compile_support, compiled_train_step

    if compiled and not compile_support()[0]:
        pytest.skip(compile_support()[1])
    opts = EnergyOptions() if compiled else OPTS  # the compiled step under a graph draws no noise
    model = tiny_model()
    x = images(3)
    inner = compiled_train_step(model, opts, backend="aot_eager") if compiled else None
    step = eager_replay_step(model, opts, inner, warmup_steps=1)
    for seed in range(3):
        c = sparse_tasks(x, seed)
        loss, grads = run_step(step, model, x, c, seed)
        ref_loss, ref = eager_step(model, x, c, seed, opts)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
        assert_grads_close(grads, ref, 1e-10)
    assert step.mode == "graph" and step.static_inputs[-1].shape == (3, 12)
    assert torch.equal(step.static_inputs[-1], c.keep)


def test_a_replayed_loss_backpropagated_with_another_weight_is_refused():
    """The replay has already added the gradients of loss / accum_iter: a caller that backpropagates
    the loss with another weight (a step built for another accum_iter) gets an error, not gradients
    off by that factor."""
    model = tiny_model()
    x = images(3)
    step = eager_replay_step(model, OPTS, warmup_steps=1, accum_iter=2)
    c = tasks(x)[0]
    (step(x, c, torch.Generator().manual_seed(0)) / 2).backward()  # warm-up: the ordinary step
    loss = step(x, c, torch.Generator().manual_seed(1))
    assert step.mode == "graph"
    with pytest.raises(RuntimeError, match="built for accum_iter 2 .* backpropagated with weight 1;"):
        loss.backward()


def test_pretrain_flag_on_cpu_warns_and_trains_as_without(tmp_path):
    args = ["pretrain", "--model", "vit_pico_patch2", "--batch_size", "250", "--epochs", "1", "--warmup_epochs", "0",
            "--num_threads", "1", "--grid_rows", "0", "--no-tensorboard", "--probe_images", "300", "--device", "cpu"]
    assert main(args + ["--output_dir", str(tmp_path / "plain")]) == 0
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device"):
        assert main(args + ["--output_dir", str(tmp_path / "graphs"), "--cuda_graphs"]) == 0
    plain, graphs = ((tmp_path / d / "log.jsonl").read_text().splitlines()[0] for d in ("plain", "graphs"))
    import json

    assert json.loads(plain)["loss"] == json.loads(graphs)["loss"]


def test_pretrain_flag_is_for_the_energy_method(capsys):
    assert main(["pretrain", "--method", "mae", "--cuda_graphs"]) == 2
    assert "--cuda_graphs" in capsys.readouterr().err


def test_optimizer_state_dict_loads_both_ways():
    """A plain AdamW checkpoint loads into GraphedAdamW (made capturable), and GraphedAdamW saves
    what a plain AdamW loads (capturable=False), so runs resume with or without --cuda_graphs."""
    model = tiny_model(dtype=torch.float32)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    plain.step()
    graphed = cg.GraphedAdamW(model.parameters(), lr=1e-3)
    graphed.load_state_dict(plain.state_dict())
    assert all(g["capturable"] for g in graphed.param_groups)
    step = next(iter(graphed.state.values()))["step"]
    assert step.dtype == torch.float32 and step.item() == 1
    saved = graphed.state_dict()
    assert not any(g["capturable"] for g in saved["param_groups"])
    again = torch.optim.AdamW(model.parameters(), lr=1e-3)
    again.load_state_dict(saved)
    again.step()  # a plain CPU step: capturable would refuse the CPU
    assert next(iter(again.state.values()))["step"].item() == 2


# ------------------------------------------------------------------------------------ CUDA
@pytest.fixture
def fp32_cuda():
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@needs_cuda
def test_replayed_gradients_match_eager(fp32_cuda):
    """After the warm-up, every replay (new inputs each time: two tasks, fresh noise) gives the eager
    step's loss and gradients."""
    model = tiny_model(dtype=torch.float32).to(fp32_cuda)
    x = images(4, dtype=torch.float32).to(fp32_cuda)
    step = cg.GraphedLossStep(model, OPTS, warmup_steps=2)
    for seed in range(7):
        c = tasks(x * (0.5 + 0.1 * seed))[seed % 2]
        loss, grads = run_step(step, model, x, c, seed)
        ref_loss, ref = eager_step(model, x, c, seed)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
        assert_grads_close(grads, ref, 1e-5)
    assert step.mode == "graph" and step.calls == 7


@needs_cuda
def test_other_shape_runs_the_ordinary_step_then_replays_again(fp32_cuda):
    model = tiny_model(dtype=torch.float32).to(fp32_cuda)
    step = cg.GraphedLossStep(model, OPTS, warmup_steps=1)
    x4, x3 = images(4, dtype=torch.float32).to(fp32_cuda), images(3, dtype=torch.float32).to(fp32_cuda)
    run_step(step, model, x4, tasks(x4)[0], 0)
    run_step(step, model, x4, tasks(x4)[0], 1)  # captured
    with pytest.warns(RuntimeWarning, match="differ in shape"):
        loss, grads = run_step(step, model, x3, tasks(x3)[0], 2)
    assert_grads_close(grads, eager_step(model, x3, tasks(x3)[0], 2)[1], 1e-5)
    loss, grads = run_step(step, model, x4, tasks(x4)[1], 3)
    assert_grads_close(grads, eager_step(model, x4, tasks(x4)[1], 3)[1], 1e-5)
    assert step.mode == "graph"


@needs_cuda
def test_capture_error_falls_back_and_cuda_stays_usable(fp32_cuda):
    """A step that cannot be captured (it synchronizes: .item()) warns once and runs eagerly."""
    model = tiny_model(dtype=torch.float32).to(fp32_cuda)
    x = images(4, dtype=torch.float32).to(fp32_cuda)

    def syncing(clean, corrupted, generator):
        loss = task_loss(model, clean, corrupted, EnergyOptions(), generator)
        return loss * (1.0 if loss.item() > -1 else 0.0)

    step = cg.GraphedLossStep(model, EnergyOptions(), syncing, warmup_steps=1)
    with pytest.warns(RuntimeWarning, match="capturing the training step failed"):
        for seed in range(3):
            _, grads = run_step(step, model, x, tasks(x)[0], seed)
    assert step.mode == "off"
    assert_grads_close(grads, eager_step(model, x, tasks(x)[0], 2, EnergyOptions())[1], 1e-5)
    assert torch.isfinite(torch.randn(4, device=fp32_cuda)).all()  # the default generator left capture mode


@needs_cuda
def test_graphed_adamw_matches_adamw_with_a_changing_lr(fp32_cuda):
    ref_model = tiny_model(dtype=torch.float32).to(fp32_cuda)
    model = tiny_model(dtype=torch.float32).to(fp32_cuda)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g).to(fp32_cuda) for p in params]
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    opt = cg.GraphedAdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    opt.use_static_grads(params, grads, None, None)
    for i in range(5):
        for p, q, g in zip(params, ref_model.parameters(), grads):
            g.mul_(0.9)  # the static gradients change in place, as a replay writes them
            p.grad, q.grad = g, g.clone()
        for o in (opt, ref):
            o.param_groups[0]["lr"] = 1e-2 / (i + 1)  # a float, as the training loop sets it
        opt.step()
        ref.step()
    assert opt._graph is not None and isinstance(opt.param_groups[0]["lr"], float)
    for p, q in zip(params, ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def train_with_graphs(device, graphs: bool, accum: int = 1, warmup: int = 2, grad_sync=None):
    """(model, stats, step_fn) after 6 optimizer steps of train_loop, with both graphs or none;
    grad_sync(model): the loop's GradientSync.
    AdamW's eps is large here: with the default 1e-8 a gradient that is zero up to rounding (the
    key bias of attention) becomes an update of +-lr whose sign is rounding noise."""
    from energyvit.training import param_groups

    model = tiny_model(dtype=torch.float32).to(device)
    for p in model.unused_parameters():  # frozen as EnergyMethod will, before the optimizer and grad_sync see them
        p.requires_grad_(False)
    cls = cg.GraphedAdamW if graphs else torch.optim.AdamW
    opt = cls(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95), eps=1e-2)
    step = cg.graphed_training(model, OPTS, None, opt, warmup_steps=warmup, accum_iter=accum) if graphs else None
    stats = train_loop(model, step, opt, accum, steps=6, batch=4, grad_sync=grad_sync(model) if grad_sync else None)
    return model, stats, step


def assert_same_training(got, ref):
    (model, stats, step), (ref_model, ref_stats, _) = got, ref
    assert step.mode == "graph" and step.optimizer._graph is not None  # both graphs replayed
    assert all(p.grad is g for p, g in zip(step._params(), step.static_grads))
    assert stats["loss"] == pytest.approx(ref_stats["loss"], rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@needs_cuda
@pytest.mark.parametrize("accum,warmup", [(1, 2), (2, 3)])
def test_training_loop_with_graphs_matches_the_ordinary_loop(fp32_cuda, accum, warmup):
    """train_one_epoch over 6 optimizer steps of a task mixture: the captured loss step and AdamW
    update reach the ordinary loop's weights, with one micro-batch per step and with two (the
    replays add into the static gradients; with warm-up 3 the capture comes at a step's second
    micro-batch)."""
    assert_same_training(train_with_graphs(fp32_cuda, True, accum, warmup), train_with_graphs(fp32_cuda, False, accum))


@needs_cuda
def test_graphs_with_the_gradient_all_reduce_of_a_process_group(fp32_cuda):
    """Under torchrun the graphed step's gradients are all-reduced eagerly between the two graphs
    (distributed.AllReduceGradients, NCCL): in a one-process group the mean is the gradient
    itself, so the training matches the ordinary loop's, and the all-reduce keeps the static
    gradients static (the optimizer's graph still replays)."""
    import torch.distributed as dist

    from energyvit.distributed import AllReduceGradients

    dist.init_process_group("nccl" if dist.is_nccl_available() else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1)
    try:
        got = train_with_graphs(fp32_cuda, True, accum=2, warmup=3, grad_sync=AllReduceGradients)
        assert_same_training(got, train_with_graphs(fp32_cuda, False, accum=2))
    finally:
        dist.destroy_process_group()


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_replayed_sparse_restoration_matches_eager(fp32_cuda, compiled):
    """Sparse restoration under a real graph, eager or compiled inside (aot_eager: the capture of a
    compiled step that reads the kept patches, without another Inductor compile in
    bench/gpu_check.sh's time for this file): new kept patches each call."""
    from energyvit.compiled import compile_support, compiled_train_step

    if compiled and not compile_support()[0]:
        pytest.skip(compile_support()[1])
    opts = EnergyOptions() if compiled else OPTS
    model = tiny_model(dtype=torch.float32).to(fp32_cuda)
    x = images(4, dtype=torch.float32).to(fp32_cuda)
    inner = compiled_train_step(model, opts, backend="aot_eager") if compiled else None
    step = cg.GraphedLossStep(model, opts, inner, warmup_steps=1)
    for seed in range(4):
        c = sparse_tasks(x, seed)
        loss, grads = run_step(step, model, x, c, seed)
        ref_loss, ref = eager_step(model, x, c, seed, opts)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-4)
        assert_grads_close(grads, ref, 1e-4)
    assert step.mode == "graph"


@needs_cuda
def test_compiled_step_under_a_graph_matches_eager(fp32_cuda):
    from energyvit.compiled import compile_support, compiled_train_step

    if not compile_support()[0]:
        pytest.skip(compile_support()[1])
    opts = EnergyOptions()
    model = tiny_model(dtype=torch.float32, restore_steps=1).to(fp32_cuda)
    x = images(4, dtype=torch.float32).to(fp32_cuda)
    step = cg.GraphedLossStep(model, opts, compiled_train_step(model, opts), warmup_steps=1)
    for seed in range(4):
        c = tasks(x * (0.5 + 0.1 * seed))[seed % 2]
        _, grads = run_step(step, model, x, c, seed)
        assert_grads_close(grads, eager_step(model, x, c, seed, opts)[1], 1e-4)
    assert step.mode == "graph" and step.inner.mode == "compiled"
