"""The benchmark's analytic model FLOPs (energyvit.benchmark.flops) against torch's FLOP counter on
the steps the benchmark times, and the datasheet peaks MFU divides by."""
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import energyvit
from energyvit import benchmark as bench
from energyvit.methods.mae import MAEBaseline, default_decoder
from energyvit.model import EnergyViT, ModelOptions, model_config
from energyvit.objective import EnergyOptions, task_loss

CPU = torch.device("cpu")


class _NoModuleTracking:
    """FlopCounterMode's module tracker hooks the backward in a way autograd.grad refuses ("A leaf
    node was passed to _will_engine_execute_node"); only the global count is needed here."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def measured_flops(fn) -> int:
    """The matmul and convolution FLOPs torch.utils.flop_counter counts in one call of fn."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracking()
    with counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("head_depth", [2, 0])
@pytest.mark.parametrize("restore_steps", [1, 2])
def test_energy_step_flops_are_what_the_timed_step_executes(one_thread, head_depth, restore_steps):
    """The eager energy step the benchmark times (forward, input gradient with its graph, double
    backward, K times) executes exactly the counted matmul FLOPs: same matmuls, so the tolerance is
    rounding of the sum (1e-9). With pretrain's default energy head the count includes the head."""
    case = bench.step_case("eager", "vit_pico_patch2", None, restore_steps, 2, CPU, None)
    assert case.model.cfg.energy_head_depth == ModelOptions().energy_head_depth == 2
    assert case.flops == pytest.approx(measured_flops(case.fn), rel=1e-9)
    # another batch, and the head's depth varied (0: the encoder alone)
    cfg = ModelOptions(model="vit_pico_patch2", restore_steps=restore_steps, energy_head_depth=head_depth).config(3)
    model = EnergyViT(cfg)
    clean = torch.rand(3, 3, 8, 8)
    corrupted = energyvit.corrupt(clean, "mim", patch_size=2, generator=torch.Generator().manual_seed(0), mask_ratio=0.5)
    flops = measured_flops(lambda: task_loss(model, clean, corrupted, EnergyOptions()).backward())
    assert bench.energy_step_flops(cfg, restore_steps, 3) == pytest.approx(flops, rel=1e-9)
    # with the explicit energy term: E of the clean and of the negative images, backward to the weights
    opts = EnergyOptions(contrast_weight=0.5)
    flops = measured_flops(lambda: task_loss(model, clean, corrupted, opts).backward())
    assert bench.energy_step_flops(cfg, restore_steps, 3, contrast=True) == pytest.approx(flops, rel=1e-9)


def test_mae_step_flops_are_what_the_timed_step_executes(one_thread):
    """The MAE step (math attention, whose matmuls the counter sees; SDPA's CPU kernel it does not
    count) executes exactly the counted FLOPs, for the benchmark's case and another decoder."""
    case = bench.mae_case("mae-math", "vit_pico_patch2", None, 2, CPU, None)
    assert case.flops > 0 and case.flops == pytest.approx(measured_flops(case.fn), rel=1e-9)
    cfg = model_config("vit_nano_patch4")
    mae = MAEBaseline(cfg, decoder=replace(default_decoder(cfg), depth=3), mask_ratio=0.5)
    flops = measured_flops(lambda: mae.forward_loss(torch.rand(2, 3, 16, 16)).backward())
    assert bench.mae_step_flops(cfg, mae.decoder_cfg, mae.num_visible, 2) == pytest.approx(flops, rel=1e-9)


def test_vit_b_counts_and_the_energy_to_mae_ratio():
    """ViT-B/16 at 224 px (the figures docs/benchmarks.md states): a forward is 35.1 GFLOP; an energy
    step at K=1 with pretrain's head (2 blocks, 384 wide) 225 GFLOP, 6.4 forwards; an MAE step 58.5
    GFLOP, 1.67 forwards; so at equal MFU energy reaches 0.26x MAE's images/s at K=1, 0.13x at K=2."""
    cfg = model_config("vit_base_patch16")
    energy = bench.energy_step_flops(ModelOptions(model="vit_base_patch16").config(3), 1, 1)
    decoder = default_decoder(cfg)
    mae = bench.mae_step_flops(cfg, decoder, 49, 1)
    assert bench.vit_forward_flops(cfg) == pytest.approx(35.13e9, rel=1e-3)
    assert energy == pytest.approx(225.2e9, rel=1e-3)
    assert mae == pytest.approx(58.5e9, rel=1e-3)
    assert mae / energy == pytest.approx(0.260, abs=1e-3)
    assert bench.energy_step_flops(ModelOptions(model="vit_base_patch16").config(3), 2, 1) == pytest.approx(2 * energy)


def test_datasheet_peaks_per_gpu():
    assert bench.datasheet_peak("NVIDIA H200", "bf16") == pytest.approx(989.4)
    assert bench.datasheet_peak("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4)
    assert bench.datasheet_peak("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.5)
    assert bench.datasheet_peak("NVIDIA H100 NVL", "fp16") == pytest.approx(835.5)
    assert bench.datasheet_peak("NVIDIA A100-SXM4-80GB", "bf16") == pytest.approx(312.0)
    assert bench.datasheet_peak("NVIDIA H200", "fp32") is None
    assert bench.datasheet_peak("CPU: Intel(R) Xeon(R)", "bf16") is None
