"""torch.compile of the training step and of inference restoration (energyvit.compiled).

Compiling is slow on CPU, so the compiled functions are built once per module (fixtures) on the
tiny float64 model, and the tests that only exercise Dynamo's guards use the aot_eager backend.
"""
import warnings

import pytest
import torch

import energyvit.compiled as compiled
from energyvit.losses import restoration_loss
from energyvit.objective import EnergyOptions, task_loss
from energyvit.restore import draw_noise, restore
from energyvit.tasks import Denoise, MaskedImageModeling
from helpers import images, tiny_model

pytestmark = pytest.mark.skipif(not compiled.compile_support()[0], reason="this torch cannot trace autograd.grad")

# Every special path at once: loss over the whole image (a ones region in the compiled graph),
# per-patch normalized targets and Langevin noise drawn from the caller's generator.
OPTS = EnergyOptions(loss_region="all", norm_pix_loss=True, langevin_std=0.05)
SEED = 7


def corrupt(batch, task="mim", seed=0):
    clean = images(batch=batch, seed=batch + 10)
    t = MaskedImageModeling(patch_size=2, mask_ratio=0.5) if task == "mim" else Denoise(0.2)
    return clean, t(clean, torch.Generator().manual_seed(seed))


def param_grads(model, loss):
    """d loss / d params via loss.backward(), as train_one_epoch runs it (None where unused)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


def rel_err(a, b, none_is_zero=False):
    """|a - b| / |b| over all parameters; by default both must leave the same parameters without grad."""
    if none_is_zero:
        pairs = [(x, y) for x, y in zip(a, b) if x is not None or y is not None]
        a = [torch.zeros_like(y) if x is None else x for x, y in pairs]
        b = [torch.zeros_like(x) if y is None else y for x, y in pairs]
    assert [g is None for g in a] == [g is None for g in b]
    fa = torch.cat([g.flatten() for g in a if g is not None])
    fb = torch.cat([g.flatten() for g in b if g is not None])
    return ((fa - fb).norm() / fb.norm()).item()


def eager_grads(model, clean, c, seed=SEED):
    return param_grads(model, task_loss(model, clean, c, OPTS, torch.Generator().manual_seed(seed)))


def first_order_only_grads(model, clean, c, seed=SEED):
    """The same loss with dE/dx detached: a_k, the noise and the path through x stay, the
    second-order terms d(dE/dx)/d theta are dropped (what a silently-wrong compile would give)."""
    gen = torch.Generator().manual_seed(seed)
    a = model.step_sizes
    mask = torch.ones_like(c.image[:, :1]) if c.update_mask is None else c.update_mask
    x = c.image
    for k in range(model.cfg.restore_steps):
        xk = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xk).sum(), xk)
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        x = x + (-a[k] * g + OPTS.langevin_std * (2 * a[k]).sqrt() * noise) * mask
    return param_grads(model, restoration_loss(x, clean, None, 2))


@pytest.fixture(scope="module")
def model():
    return tiny_model(dtype=torch.float64, energy="linear", restore_steps=2)


@pytest.fixture(scope="module")
def step(model):
    """The Inductor-compiled training step, compiled once (first call at batch 4) for the module."""
    fn = compiled.compiled_train_step(model, OPTS, torch.Generator().manual_seed(SEED))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback allowed
        clean, c = corrupt(4)
        fn(clean, c)
    assert fn.mode == "compiled" and fn.compiled_graphs() == 1
    return fn


def compiled_grads(model, step, clean, c, seed=SEED):
    step.generator = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        loss = step(clean, c)
    assert step.mode == "compiled"
    return loss, param_grads(model, loss)


@pytest.mark.parametrize("task", ["mim", "denoise"])
def test_compiled_gradients_match_eager_and_keep_second_order_terms(model, step, task):
    """Parameter gradients through a K=2 unrolled restoration, compiled vs eager, float64; and far
    from the variant without second-order terms, which the compiled step must not silently become."""
    clean, c = corrupt(4, task)
    loss, grads = compiled_grads(model, step, clean, c)
    ref_loss = task_loss(model, clean, c, OPTS, torch.Generator().manual_seed(SEED))
    ref = eager_grads(model, clean, c)
    assert abs(loss.item() - ref_loss.item()) <= 1e-12 * abs(ref_loss.item())
    assert rel_err(grads, ref) < 1e-9
    for g, r in zip(grads, ref):  # parameter by parameter too
        if r is not None and r.norm() > 0:
            assert ((g - r).norm() / r.norm()).item() < 1e-9
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert grads[names.index("restore_log_step")].abs().min() > 0  # every a_k is trained
    # Without them only the step sizes a_k would get a gradient: every other parameter acts on
    # the restored image only through dE/dx.
    dropped = first_order_only_grads(model, clean, c)
    assert rel_err(dropped, ref, none_is_zero=True) > 0.5  # the second-order terms matter here...
    assert rel_err(grads, dropped, none_is_zero=True) > 0.5  # ...and the compiled step keeps them
    assert step.compiled_graphs() == 1  # one graph for every task (update mask or None)


def test_compiled_gradients_match_eager_with_the_default_readout_and_one_step():
    """The pretraining defaults' shape of the step, K = 1 with the `norm` readout: compiled vs
    eager parameter gradients in float64, second-order terms kept."""
    model = tiny_model(dtype=torch.float64, energy="norm", restore_steps=1)
    step = compiled.compiled_train_step(model, OPTS, torch.Generator().manual_seed(SEED))
    clean, c = corrupt(4)
    loss, grads = compiled_grads(model, step, clean, c)
    ref = eager_grads(model, clean, c)
    ref_loss = task_loss(model, clean, c, OPTS, torch.Generator().manual_seed(SEED))
    assert abs(loss.item() - ref_loss.item()) <= 1e-12 * abs(ref_loss.item())
    assert rel_err(grads, ref) < 1e-9
    assert rel_err(grads, first_order_only_grads(model, clean, c), none_is_zero=True) > 0.5


def test_first_step_check_rejects_gradients_without_second_order_terms(model, step):
    """The safety net of the first compiled call: gradients missing the second-order terms fail it."""
    clean, c = corrupt(4)
    args = step._args(clean, c, draw_noise(c.image, 2, OPTS.langevin_std, torch.Generator().manual_seed(SEED)), 4)
    loss = task_loss(model, clean, c, OPTS, torch.Generator().manual_seed(SEED)).detach()
    ref = eager_grads(model, clean, c)
    assert step._check_against_eager(args, loss, ref) == ""
    dropped = first_order_only_grads(model, clean, c)
    assert "different set of parameters" in step._check_against_eager(args, loss, dropped)
    zero_filled = [torch.zeros_like(r) if d is None and r is not None else d for d, r in zip(dropped, ref)]
    assert "relative error" in step._check_against_eager(args, loss, zero_filled)


def test_no_graph_break_in_the_training_step(model, step):
    """One graph, no break (the fixture also compiles with fullgraph=True, where a break raises)."""
    clean, c = corrupt(4)
    noise = draw_noise(c.image, 2, OPTS.langevin_std, torch.Generator().manual_seed(SEED))
    with compiled._trace_autograd():
        explanation = torch._dynamo.explain(step._traced)(*step._args(clean, c, noise, 4))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("batch", [3, 1])
def test_smaller_batches_are_padded_exactly_without_recompiling(model, step, batch):
    clean, c = corrupt(batch)
    loss, grads = compiled_grads(model, step, clean, c)
    assert rel_err(grads, eager_grads(model, clean, c)) < 1e-9
    assert step.compiled_graphs() == 1


def test_batch_size_changes_compile_a_bounded_number_of_graphs(model):
    """Smaller batches reuse (pad to) a compiled size, a larger one compiles once more, and past
    max_graphs sizes a batch runs eagerly with one warning: never a crash, always exact."""
    fn = compiled.compiled_train_step(model, OPTS, backend="aot_eager", max_graphs=2)
    compiled._WARNED.discard("sizes")
    counts = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in (4, 3, 6, 5, 7, 1, 7):
            clean, c = corrupt(batch)
            fn.generator = torch.Generator().manual_seed(SEED)
            grads = param_grads(model, fn(clean, c))
            assert rel_err(grads, eager_grads(model, clean, c)) < 1e-9, batch
            counts.append(fn.compiled_graphs())
    assert counts == [1, 1, 2, 2, 2, 2, 2] and fn.mode == "compiled"
    assert [str(w.message) for w in caught if "compiled sizes" in str(w.message)] == [
        "energyvit compile: batch size 7 is beyond the 2 compiled sizes; such batches run eagerly"]


def test_batch_size_policy():
    sizes = compiled._BatchSizes(pad=True, max_graphs=2)
    assert sizes.target(64) == 64
    sizes.compiled.add(64)
    assert [sizes.target(b) for b in (64, 40, 1)] == [64, 64, 64]
    assert sizes.target(80) == 80
    sizes.compiled.add(80)
    assert sizes.target(81) is None and sizes.target(70) == 80
    no_pad = compiled._BatchSizes(pad=False, max_graphs=2)
    no_pad.compiled.add(64)
    assert no_pad.target(40) == 40


def test_unsupported_torch_falls_back_to_eager_with_one_warning(model, monkeypatch):
    monkeypatch.setattr(compiled, "compile_support", lambda: (False, "no trace_autograd_ops"))
    compiled._WARNED.discard("support")
    with pytest.warns(RuntimeWarning, match="no trace_autograd_ops; training runs eagerly") as caught:
        fn = compiled.compiled_train_step(model, OPTS, torch.Generator().manual_seed(SEED))
        compiled.compiled_train_step(model, OPTS)
    assert len([w for w in caught if "trace_autograd_ops" in str(w.message)]) == 1
    assert fn.mode == "eager"
    clean, c = corrupt(4)
    loss = fn(clean, c)
    assert torch.equal(loss, task_loss(model, clean, c, OPTS, torch.Generator().manual_seed(SEED)))


def test_compile_failure_falls_back_to_eager_with_one_warning(model):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("backend cannot compile this")

    fn = compiled.compiled_train_step(model, OPTS, backend=broken_backend)
    compiled._WARNED.discard("fallback")
    clean, c = corrupt(3)
    with pytest.warns(RuntimeWarning, match="compiling the training step failed"):
        fn.generator = torch.Generator().manual_seed(SEED)
        grads = param_grads(model, fn(clean, c))
    assert fn.mode == "eager"
    assert rel_err(grads, eager_grads(model, clean, c)) < 1e-12


def test_compiled_inference_restoration_matches_eager(model):
    fn = compiled.compiled_restore(model)
    for batch in (4, 3):  # 3 is padded to the compiled 4
        _, c = corrupt(batch)
        got = fn(c.image, c.update_mask, noise_std=0.01, generator=torch.Generator().manual_seed(1))
        ref = restore(model, c.image, c.update_mask, noise_std=0.01, generator=torch.Generator().manual_seed(1))
        assert got.energies.shape == ref.energies.shape == (3, batch)
        assert torch.allclose(got.energies, ref.energies, rtol=1e-12, atol=1e-12)
        assert len(got.steps) == len(ref.steps) == 3
        for a, b in zip(got.steps, ref.steps):
            assert torch.allclose(a, b, rtol=0, atol=1e-13)
        assert not got.restored.requires_grad
    assert fn.mode == "compiled" and fn.compiled_graphs() == 1


def test_compiled_step_with_fused_attention_matches_eager_fused():
    """The fused Triton custom ops (attn_fwd -> attn_bwd -> attn_bwdbwd) trace into the compiled
    step: fp32 parameter gradients match the eager fused step, with no fallback to eager, and the
    float64 math step of the same weights (the kernels have no float64: fp32 against float64)."""
    pytest.importorskip("triton")
    model = tiny_model(dtype=torch.float32, attn_backend="fused")
    clean, c = corrupt(2)
    clean32, c32 = clean.float(), type(c)(c.image.float(), c.loss_mask.float(), c.update_mask.float())
    opts = EnergyOptions()
    expected = param_grads(model, task_loss(model, clean32, c32, opts))
    step = compiled.compiled_train_step(model, opts)
    got = param_grads(model, step(clean32, c32))
    assert step.mode == "compiled" and step.compiled_graphs() == 1  # no fallback to eager
    assert rel_err(got, expected) < 1e-5
    reference = tiny_model(dtype=torch.float64, attn_backend="math")
    reference.load_state_dict(model.state_dict())
    in_float64 = param_grads(reference, task_loss(reference, clean, c, opts))
    err = rel_err([None if g is None else g.double() for g in got], in_float64)
    assert err < 1e-5, err


def test_compiled_sparse_restoration_matches_eager(model):
    """mim with restore_fraction 0.5 (the patches that enter: one more static input) and the
    explicit energy term on the same patches: compiled vs eager float64 gradients, a smaller batch
    padded (with copies of the first row's indices) in the same graph, no fallback."""
    opts = EnergyOptions(loss_region="all", norm_pix_loss=True, langevin_std=0.05, contrast_weight=0.5)
    task = MaskedImageModeling(patch_size=2, mask_ratio=0.5, restore_fraction=0.5)
    fn = compiled.compiled_train_step(model, opts)
    for batch in (4, 3):
        clean = images(batch=batch, seed=batch + 10)
        c = task(clean, torch.Generator().manual_seed(batch))
        assert c.keep.shape == (batch, 12)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            loss = fn(clean, c, torch.Generator().manual_seed(SEED))
        ref_loss = task_loss(model, clean, c, opts, torch.Generator().manual_seed(SEED))
        assert abs(loss.item() - ref_loss.item()) <= 1e-12 * abs(ref_loss.item())
        ref = param_grads(model, task_loss(model, clean, c, opts, torch.Generator().manual_seed(SEED)))
        assert rel_err(param_grads(model, loss), ref) < 1e-9
        dense = param_grads(model, task_loss(model, clean, type(c)(c.image, c.loss_mask, c.update_mask), opts,
                                             torch.Generator().manual_seed(SEED)))
        assert rel_err(dense, ref) > 1e-2  # the dropped patches change the step: keep was used
    assert fn.mode == "compiled" and fn.compiled_graphs() == 1


def test_compiled_visible_encoder_step_matches_eager():
    """encoder_input visible: the split (mim's hidden patches, one more static input) in the compiled
    region, the encoder once, the explicit term on the same features, Langevin noise: compiled vs
    eager float64 gradients, a smaller batch padded in the same graph, no fallback; and without the
    split (hidden dropped) the step differs."""
    model = tiny_model(dtype=torch.float64, encoder_input="visible", energy_head_depth=1, energy_head_dim=16,
                       restore_steps=1)
    opts = EnergyOptions(langevin_std=0.05, contrast_weight=0.5)
    task = MaskedImageModeling(patch_size=2, mask_ratio=0.5)
    fn = compiled.compiled_train_step(model, opts)
    for batch in (4, 3):
        clean = images(batch=batch, seed=batch + 10)
        c = task(clean, torch.Generator().manual_seed(batch))
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            loss = fn(clean, c, torch.Generator().manual_seed(SEED))
        ref_loss = task_loss(model, clean, c, opts, torch.Generator().manual_seed(SEED))
        assert abs(loss.item() - ref_loss.item()) <= 1e-12 * abs(ref_loss.item())
        ref = param_grads(model, ref_loss)
        assert rel_err(param_grads(model, loss), ref) < 1e-9
        unsplit = param_grads(model, task_loss(model, clean, type(c)(c.image, c.loss_mask, c.update_mask), opts,
                                               torch.Generator().manual_seed(SEED)))
        assert rel_err(unsplit, ref, none_is_zero=True) > 1e-2  # the split was used
    assert fn.mode == "compiled" and fn.compiled_graphs() == 1


def test_attached_gradients_follow_the_incoming_gradient():
    """The compiled step's loss hands each parameter its gradient times d(out)/d(loss), in one
    foreach op; a parameter without a gradient keeps none."""
    from energyvit.compiled import _AttachGrads

    a, b, c = (torch.zeros(n, requires_grad=True) for n in (3, 2, 1))
    loss = _AttachGrads.apply(torch.tensor(1.5), 3, a, b, c, torch.arange(3.0), None, torch.ones(1))
    assert loss.item() == 1.5
    (loss * 2.5).backward()
    assert torch.equal(a.grad, torch.arange(3.0) * 2.5) and b.grad is None and torch.equal(c.grad, torch.full((1,), 2.5))
