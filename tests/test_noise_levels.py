"""--noise_sigma LO:HI (issue 22): a mixture of noise levels for denoise, each image's sigma drawn
log-uniformly in [LO, HI] (NCSN's geometric spread), optionally with inverse-variance loss weights
(--noise_loss_weight). One sigma stays exactly what it was; bad ranges are one line."""
import math
import warnings

import pytest
import torch

from energyvit.cli import main
from energyvit.losses import restoration_loss
from energyvit.objective import EnergyOptions, task_loss
from energyvit.options import OptionError
from energyvit.tasks import Denoise, MaskedImageModeling, TaskOptions, build_task, noise_levels
from helpers import eager_replay_step, images, tiny_model

LO, HI = 0.05, 0.5


def test_one_sigma_is_the_draw_it_always_was():
    x = images(4)
    g = torch.Generator().manual_seed(3)
    c = build_task("denoise", 2, TaskOptions(noise_sigma=0.2))(x, g)
    ref_gen = torch.Generator().manual_seed(3)
    expected = x + 0.2 * torch.randn(x.shape, generator=ref_gen, dtype=x.dtype)
    assert torch.equal(c.image, expected) and c.loss_weight is None and c.update_mask is None
    assert torch.equal(torch.rand(2, generator=g), torch.rand(2, generator=ref_gen))  # one draw, as before
    assert noise_levels(0.2) == 0.2 and noise_levels("0.05:0.5") == (0.05, 0.5)


def test_the_drawn_sigmas_lie_in_the_range_log_uniformly():
    """Quantiles of log sigma over 200,000 seeded draws: those of the uniform law on [log LO, log HI]
    (a linear spread would put the median at (LO + HI) / 2 = 0.275, not sqrt(LO HI) = 0.158)."""
    sigmas = Denoise((LO, HI)).draw_sigmas(200_000, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert sigmas.min() >= LO and sigmas.max() <= HI
    qs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    expected = math.log(LO) + qs * math.log(HI / LO)
    torch.testing.assert_close(torch.quantile(sigmas.log(), qs), expected, rtol=0, atol=0.01)
    assert abs(sigmas.median().item() - math.sqrt(LO * HI)) < 0.003


def test_each_image_gets_the_noise_of_one_sigma_scaled_by_its_own():
    x = images(6)
    c = Denoise((LO, HI))(x, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(x.shape, generator=g, dtype=x.dtype)  # the single-sigma draw comes first
    sigmas = Denoise((LO, HI)).draw_sigmas(6, g, dtype=x.dtype)
    torch.testing.assert_close(c.image, x + sigmas.view(-1, 1, 1, 1) * noise, rtol=0, atol=0)
    assert c.loss_weight is None and len(set(sigmas.tolist())) == 6


def test_inverse_variance_weights_average_one_and_weight_each_images_loss():
    task = Denoise((LO, HI), inverse_variance=True)
    n = 100_000
    many = task(torch.zeros(n, 1, 1, 1, dtype=torch.float64), torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)  # the noise, drawn first
    sigmas = task.draw_sigmas(n, g, dtype=torch.float64)
    mean_inverse_variance = (LO ** -2 - HI ** -2) / (2 * math.log(HI / LO))  # E[1/sigma^2], log-uniform sigma
    torch.testing.assert_close(many.loss_weight, sigmas.pow(-2) / mean_inverse_variance, rtol=1e-12, atol=0)
    assert abs(many.loss_weight.mean().item() - 1) < 0.02
    # the training loss: each image's mean squared error times its weight, averaged over the batch
    from energyvit.restore import restore

    model = tiny_model()
    x = images(4)
    c = task(x, torch.Generator().manual_seed(1))
    loss = task_loss(model, x, c, EnergyOptions())
    plain = task_loss(model, x, type(c)(c.image, c.loss_mask, c.update_mask), EnergyOptions())
    restored = restore(model, c.image, None, create_graph=True).restored
    per_image = (restored - x).pow(2).mean(dim=(1, 2, 3))
    assert loss.item() == pytest.approx((c.loss_weight * per_image).mean().item(), rel=1e-12)
    assert plain.item() == pytest.approx(per_image.mean().item(), rel=1e-12)
    assert not c.loss_weight.allclose(torch.ones_like(c.loss_weight))
    ones = torch.ones(4, dtype=x.dtype)
    assert torch.equal(restoration_loss(restored, x, torch.ones_like(x), weight=ones),
                       restoration_loss(restored, x, torch.ones_like(x)))


@pytest.mark.parametrize("graphed", [False, True])
def test_compiled_and_graphed_steps_weigh_images_as_eager(graphed):
    """A weighted denoise batch and an unweighted mim batch share one compiled graph (aot_eager);
    under the graphed step's bookkeeping the weights are a static input. Float64, against eager."""
    from energyvit.compiled import compile_support, compiled_train_step

    if not compile_support()[0]:
        pytest.skip(compile_support()[1])
    model = tiny_model()
    x = images(4)
    opts = EnergyOptions()
    step = compiled_train_step(model, opts, backend="aot_eager")
    if graphed:
        step = eager_replay_step(model, opts, step, warmup_steps=1)
    batches = [Denoise((LO, HI), True)(x, torch.Generator().manual_seed(s)) for s in range(2)]
    batches.insert(1, MaskedImageModeling(2, 0.5)(x, torch.Generator().manual_seed(0)))
    for c in batches + batches[:1]:
        got = grads_of_step(model, lambda: step(x, c))
        expected = grads_of_step(model, lambda: task_loss(model, x, c, opts))
        assert ((got - expected).norm() / expected.norm()).item() < 1e-9
    unweighted = grads_of_step(model, lambda: task_loss(model, x, type(c)(c.image, c.loss_mask, None), opts))
    assert ((unweighted - expected).norm() / expected.norm()).item() > 1e-2  # the weights were used
    if not graphed:
        assert step.mode == "compiled" and step.compiled_graphs() == 1


def grads_of_step(model, loss_fn):
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        loss_fn().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


# ------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("value", ["0.5:0.05", "0.1:0.1", "0:1", "-1:1", "a:b", "1:2:3", "nan:1", "0.1:inf", "junk",
                                   ":", "-0.2"])
def test_bad_sigmas_give_one_line_naming_the_flag(value, capsys, tmp_path):
    assert main(["pretrain", f"--noise_sigma={value}", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--noise_sigma" in err, err
    assert "0 < LO < HI" in err or "finite" in err, err


def test_the_python_api_takes_a_range_and_refuses_the_same():
    assert TaskOptions(noise_sigma="0.05:0.5").noise_sigma == "0.05:0.5"
    for bad in ("0.5:0.05", "x", 0.0, -1.0):
        with pytest.raises(OptionError, match="noise_sigma"):
            TaskOptions(noise_sigma=bad)
    with pytest.raises(OptionError, match="it weights a range LO:HI"):
        TaskOptions(noise_loss_weight="inverse_variance")
    assert TaskOptions(noise_sigma="0.05:0.5", noise_loss_weight="inverse_variance")
    for bad in ((0.5, 0.05), 0.0):
        with pytest.raises(ValueError, match="sigma"):
            Denoise(bad)
    with pytest.raises(ValueError, match="need a range"):
        Denoise(0.2, inverse_variance=True)


def test_weighting_one_sigma_is_one_line(capsys, tmp_path):
    assert main(["pretrain", "--noise_loss_weight", "inverse_variance", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--noise_loss_weight" in err and "range LO:HI" in err, err


def test_a_range_from_a_config_file_trains_and_is_kept_in_the_checkpoint(tmp_path, capsys, one_thread):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tasks: denoise\nnoise_sigma: 0.05:0.5\nnoise_loss_weight: inverse_variance\n")
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(cfg), "--model", "vit_pico_patch2", "--batch_size", "100", "--epochs", "1",
                 "--num_threads", "1", "--no-tensorboard", "--grid_rows", "0", "--probe_images", "200",
                 "--output_dir", str(out)]) == 0
    args = torch.load(out / "checkpoint-last.pth", weights_only=True)["args"]
    assert (args["noise_sigma"], args["noise_loss_weight"]) == ("0.05:0.5", "inverse_variance")
    assert "denoise" in capsys.readouterr().out
