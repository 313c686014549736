"""The benchmark's analytic model FLOPs (energyvit.benchmark.flops) against torch's FLOP counter on
the steps the benchmark times, and the datasheet peaks MFU divides by."""
import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import energyvit
from energyvit import benchmark as bench
from energyvit.checkpoint import save_checkpoint
from energyvit.methods.mae import MAEBaseline, default_decoder
from energyvit.model import EnergyViT, ModelOptions, config_to_dict, model_config
from energyvit.objective import EnergyOptions, task_loss
from energyvit.pretrain import PretrainOptions
from energyvit.tasks import TaskOptions, build_task, mim_patch_counts

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("head_depth,energy", [(2, "norm"), (0, "cls")])
def test_sparse_energy_step_flops_are_what_the_step_executes(one_thread, head_depth, energy):
    """Sparse restoration (mim, --restore_fraction 0.25 of 12 hidden patches of vit_nano_patch4's
    16): 1 + 4 visible + 3 restored tokens enter every energy, also the explicit term's; the patch
    embedding runs on every patch. Counted = executed, and less than the dense step."""
    cfg = ModelOptions(model="vit_nano_patch4", restore_steps=2, energy=energy, energy_head_depth=head_depth).config(1)
    model = EnergyViT(cfg)
    clean = torch.rand(3, 1, 16, 16)
    task = build_task("mim", 4, TaskOptions(restore_fraction=0.25))
    corrupted = task(clean, torch.Generator().manual_seed(0))
    hidden, restored = mim_patch_counts(cfg.num_patches, 0.75, 0.25)
    patches = cfg.num_patches - hidden + restored
    assert (hidden, restored, patches) == (12, 3, 7) and corrupted.keep.shape == (3, patches)
    for opts, contrast in ((EnergyOptions(), False), (EnergyOptions(contrast_weight=0.5), True)):
        flops = measured_flops(lambda: task_loss(model, clean, corrupted, opts).backward())
        counted = bench.energy_step_flops(cfg, 2, 3, contrast=contrast, patches=patches)
        assert counted == pytest.approx(flops, rel=1e-9)
        assert counted < 0.6 * bench.energy_step_flops(cfg, 2, 3, contrast=contrast)


def test_compare_methods_counts_the_runs_restore_fraction(tmp_path):
    """experiments/compare_methods.py's training_flops reads the run's --restore_fraction from the
    checkpoint's options (a checkpoint without it: every patch)."""
    spec = importlib.util.spec_from_file_location("compare_methods", ROOT / "experiments" / "compare_methods.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    cfg = ModelOptions(model="vit_pico_patch2").config(3)
    path = tmp_path / "checkpoint-last.pth"

    def flops_of(args: dict) -> float:
        save_checkpoint(path, {"model": EnergyViT(cfg).state_dict(), "model_config": config_to_dict(cfg),
                               "args": args, "global_step": 5, "method": "energy"})
        return compare.training_flops(path)

    options = PretrainOptions(tasks=TaskOptions(mask_ratio=0.5, restore_fraction=0.5)).flat()
    per_image = bench.energy_step_flops(cfg, cfg.restore_steps, 1, patches=8 + 4)
    assert flops_of(options) == pytest.approx(5 * options["batch_size"] * per_image, rel=1e-12)
    dense = {k: v for k, v in options.items() if k != "restore_fraction"}  # written before the option existed
    assert flops_of(dense) == pytest.approx(5 * options["batch_size"] * bench.energy_step_flops(cfg, 1, 1), rel=1e-12)


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


@pytest.mark.parametrize("exact_blocks", [0, 1, 2])
def test_truncated_energy_step_flops_are_what_the_step_executes(one_thread, exact_blocks):
    """--second_order_blocks L: the blocks below the last L skip the outer backward of their
    input-gradient graph (linear 4x, attention 5x forward); L = depth is the exact step's count."""
    cfg = ModelOptions(model="vit_pico_patch2", restore_steps=2).config(3)
    model = EnergyViT(cfg)
    clean = torch.rand(3, 3, 8, 8)
    corrupted = energyvit.corrupt(clean, "mim", patch_size=2, generator=torch.Generator().manual_seed(0), mask_ratio=0.5)
    opts = EnergyOptions(second_order_blocks=exact_blocks, contrast_weight=0.5)
    flops = measured_flops(lambda: task_loss(model, clean, corrupted, opts).backward())
    counted = bench.energy_step_flops(cfg, 2, 3, contrast=True, exact_blocks=exact_blocks)
    assert counted == pytest.approx(flops, rel=1e-9)
    assert (counted < bench.energy_step_flops(cfg, 2, 3, contrast=True)) == (exact_blocks < cfg.depth)
