"""One pretraining step (forward, K restoration steps, parameter backward) per mode (pytest-benchmark).

Compiled modes run on CUDA, or on CPU with ENERGYVIT_BENCH=full (compiling takes minutes there).
"""
import pytest

from _sizes import COMPILE_STEPS, DEVICE, SIZES, synced
from energyvit.benchmark import STEP_MODES, Unavailable, step_case

CASES = [(name, img, batch) for name, img, batch in SIZES["steps"]]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("restore_steps", SIZES["ks"], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("mode", STEP_MODES)
def test_train_step(benchmark, mode, restore_steps, case):
    name, img, batch = case
    if mode.endswith("compiled") and not COMPILE_STEPS:
        pytest.skip("compiled step on CPU: set ENERGYVIT_BENCH=full (about a minute of compiling per row)")
    try:
        step = step_case(mode, name, img, restore_steps, batch, DEVICE, SIZES["amp"])
    except Unavailable as e:
        pytest.skip(f"unavailable: {e}")
    benchmark.extra_info.update(mode=mode, model=name, restore_steps=restore_steps, flop=step.flops,
                                first_call_s=step.first_call_s, note=step.note)
    benchmark.pedantic(synced(step.fn), rounds=3 if DEVICE.type == "cpu" else 10, warmup_rounds=1, iterations=1)
