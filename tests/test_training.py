"""The training loop: gradient accumulation, clipping, non-finite stops, bf16 autocast, exact
resume after an interrupt or a crash mid-epoch, periodic checkpoints."""
import json
import signal

import pytest
import torch

from energyvit.cli import main
from energyvit.data.pixels import to_float_pixels
from energyvit.training import EpochPlan, TrainingDiverged, train_one_epoch
from energyvit.sampling import EpochSampler, ShardSampler, derive_seed
from helpers import THREE_TASKS_K2, images, tiny_model

# --shift 1: a seeded augmentation per sample, which resume must reproduce too
TINY = ["pretrain", "--model", "vit_pico_patch2", "--batch_size", "100", "--warmup_epochs", "1", *THREE_TASKS_K2,
        "--shift", "1", "--num_threads", "1", "--grid_rows", "0", "--no-tensorboard", "--probe_images", "200"]
STEPS_PER_EPOCH = 15  # 1500 digits / 100


def batches(x: torch.Tensor, size: int):
    return [(x[i : i + size], torch.zeros(size, dtype=torch.long), torch.zeros(size, dtype=torch.long))
            for i in range(0, len(x), size)]


def energy_mean_loss(model):
    return lambda imgs, labels, seed: ("t", model(imgs).mean())


def one_step(batch_size: int, accum: int, clip: float | None = None, loss_fn=None):
    model = tiny_model()
    x = images(batch=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = EpochPlan(epoch=0, steps=1, start_step=0, global_step=0, accum_iter=accum, clip_grad=clip)
    stats = train_one_epoch(model, loss_fn(model) if loss_fn else energy_mean_loss(model), batches(x, batch_size),
                            opt, plan, lambda s: 0.1, ["t"])
    return model, stats


def test_accumulation_equals_one_big_batch():
    big, _ = one_step(batch_size=8, accum=1)
    small, stats = one_step(batch_size=2, accum=4)
    assert stats["steps"] == 1 and stats["images"] == 8
    for (name, a), b in zip(big.named_parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)


def test_clipping_bounds_the_update_and_reports_the_unclipped_norm():
    start = tiny_model()
    clipped, stats = one_step(8, 1, clip=1e-3)
    _, free_stats = one_step(8, 1)
    assert stats["grad_norm"] == pytest.approx(free_stats["grad_norm"]) and stats["grad_norm"] > 1e-3
    update = torch.cat([(a - b).flatten() for a, b in zip(clipped.parameters(), start.parameters())])
    assert update.norm().item() == pytest.approx(0.1 * 1e-3, rel=1e-6)  # SGD: lr x clipped norm


def test_non_finite_loss_raises_before_the_step():
    def nan_loss(model):
        return lambda imgs, labels, seed: ("t", model(imgs).mean() * float("nan"))

    start = tiny_model()
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrainingDiverged, match="non-finite loss or gradient at epoch 0 step 0"):
        train_one_epoch(model, nan_loss(model), batches(images(8), 8), opt, EpochPlan(0, 1, 0, 0),
                        lambda s: 0.1, ["t"])
    for a, b in zip(model.parameters(), start.parameters()):
        assert torch.equal(a, b)


def test_bf16_autocast_loss_close_to_fp32():
    model = tiny_model(dtype=torch.float32)
    x = images(8, dtype=torch.float32)
    from energyvit.objective import EnergyOptions, task_loss
    from energyvit.tasks import build_task

    corrupted = build_task("mim", 2, mask_ratio=0.5)(x, torch.Generator().manual_seed(0))
    ref = task_loss(model, x, corrupted, EnergyOptions())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = task_loss(model, x, corrupted, EnergyOptions())
    assert torch.isfinite(low) and low.item() == pytest.approx(ref.item(), rel=5e-2)


def test_sampler_is_a_pure_function_of_seed_epoch_and_step():
    full = list(EpochSampler(103, 10, seed=3, epoch=2))
    assert len(full) == 100 and len({i for i, _ in full}) == 100  # the remainder is dropped
    assert list(EpochSampler(103, 10, seed=3, epoch=2, start_step=4)) == full[40:]
    assert full != list(EpochSampler(103, 10, seed=3, epoch=3))
    # two ranks split every global step; together they see what one process sees
    r0, r1 = (list(EpochSampler(103, 5, seed=3, epoch=2, rank=r, world_size=2)) for r in (0, 1))
    assert [k for s in range(10) for k in r0[5 * s : 5 * s + 5] + r1[5 * s : 5 * s + 5]] == full
    assert full[0][1] == derive_seed(3, 2, full[0][0])
    with pytest.raises(ValueError, match="one optimizer step needs 120 images"):
        EpochSampler(100, 60, seed=0, epoch=0, world_size=2)


def test_set_epoch_moves_one_sampler_as_a_new_one_would():
    sampler = EpochSampler(103, 10, seed=3, epoch=0)
    for epoch, start in ((2, 0), (2, 4), (5, 9), (0, 10)):
        sampler.set_epoch(epoch, start)
        assert list(sampler) == list(EpochSampler(103, 10, seed=3, epoch=epoch, start_step=start))
        assert len(sampler) == (10 - start) * 10
    with pytest.raises(ValueError, match="start_step 11 is outside the epoch's 10 steps"):
        sampler.set_epoch(1, 11)


class WhereRead(torch.utils.data.Dataset):
    """Items: (key as a tensor, the reading process's id, whether SIGINT and SIGTERM are ignored there)."""

    def __len__(self):
        return 40

    def __getitem__(self, key):
        import os

        ignored = all(signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM))
        return torch.tensor(key), os.getpid(), ignored


def test_training_loader_keeps_its_workers_and_follows_the_sampler(one_thread):
    from energyvit.data.loader import training_loader

    sampler = EpochSampler(40, 8, seed=1, epoch=0)
    loader = training_loader(WhereRead(), 4, sampler, 2, "cpu")
    assert loader.persistent_workers and loader.prefetch_factor == 4 and not loader.pin_memory
    pids = set()
    for epoch, start in ((0, 0), (1, 2), (2, 0)):
        sampler.set_epoch(epoch, start)
        batches = list(loader)
        keys = torch.cat([b[0] for b in batches]).tolist()
        assert keys == [list(k) for k in EpochSampler(40, 8, seed=1, epoch=epoch, start_step=start)]
        pids |= {int(p) for b in batches for p in b[1]}
        assert all(bool(x) for b in batches for x in b[2])  # workers leave Ctrl-C to the main process
    assert len(pids) == 2  # the same two worker processes every epoch
    # a loop that stops mid-epoch (an interrupt) and a next epoch that starts afresh
    sampler.set_epoch(3)
    next(iter(loader))
    sampler.set_epoch(4, 1)
    assert torch.cat([b[0] for b in loader]).tolist() == [list(k) for k in EpochSampler(40, 8, 1, 4, start_step=1)]
    single = training_loader(WhereRead(), 4, sampler, 0, "cpu")
    assert not single.persistent_workers and single.worker_init_fn is None


def test_default_workers_share_the_usable_cpus_among_local_processes(monkeypatch):
    import os

    from energyvit.data import loader

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    for local, expected in ((None, 8), ("1", 8), ("8", 4), ("64", 1), ("junk", 8)):
        if local is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert loader.default_num_workers() == expected, local
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 7}, raising=False)  # a scheduler's share
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert loader.usable_cpus() == 3 and loader.default_num_workers() == 1


def test_shard_sampler_reads_every_image_once_over_ranks():
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11)) and [len(ShardSampler(11, r, 3)) for r in range(3)] == [4, 4, 3]
    assert list(ShardSampler(2, 2, 3)) == [] and len(ShardSampler(2, 2, 3)) == 0  # more ranks than images
    with pytest.raises(ValueError, match="rank 3 is outside 0..2"):
        ShardSampler(5, 3, 3)


def test_uint8_batches_become_float_pixels_on_the_device():
    u = torch.tensor([[0, 51, 255]], dtype=torch.uint8)
    torch.testing.assert_close(to_float_pixels(u, "cpu"), torch.tensor([[0.0, 0.2, 1.0]]), rtol=0, atol=1e-7)
    f = torch.rand(2, 3)
    assert to_float_pixels(f, "cpu") is f  # float batches are already pixels
    with pytest.raises(TypeError, match="uint8 or floating point, got torch.int64"):
        to_float_pixels(torch.zeros(2, dtype=torch.int64), "cpu")


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert main(TINY + ["--epochs", "2", "--save_every", "1", "--output_dir", str(out)]) == 0
    return out


@pytest.mark.parametrize("workers", ["0", "2"])
def test_interrupt_mid_epoch_saves_and_resumes_exactly(uninterrupted, tmp_path, monkeypatch, workers):
    # A real SIGINT after the 20th optimizer step (epoch 1, step 5 of 15): the run finishes that step,
    # saves checkpoint-last there and exits 130; resuming reaches the uninterrupted run's weights,
    # read by the main process or by 2 persistent DataLoader workers (the uninterrupted run: none).
    calls = {"n": 0}
    step = torch.optim.AdamW.step

    def step_then_signal(self, *a, **k):
        out = step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 20:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_signal)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup or a background job, not Python's
    args = TINY + ["--epochs", "2", "--num_workers", workers, "--output_dir", str(tmp_path)]
    assert main(args) == 130
    monkeypatch.undo()
    state = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 5, 20)
    assert main(args + ["--resume", str(tmp_path / "checkpoint-last.pth")]) == 0
    assert_same_weights(weights(uninterrupted / "checkpoint-last.pth"), weights(tmp_path / "checkpoint-last.pth"))
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_crash_resumes_from_the_periodic_mid_epoch_checkpoint(uninterrupted, tmp_path, monkeypatch):
    # A crash (no handler runs) at step 8: the time-based checkpoint of step 7 is the resume point.
    calls = {"n": 0}
    step = torch.optim.AdamW.step

    def crash_at_eighth(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 8:
            raise MemoryError("simulated crash")
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_at_eighth)
    with pytest.raises(MemoryError):
        main(TINY + ["--epochs", "2", "--checkpoint_minutes", "1e-9", "--output_dir", str(tmp_path)])
    monkeypatch.undo()
    state = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (0, 7)
    assert main(TINY + ["--epochs", "2", "--output_dir", str(tmp_path), "--resume",
                        str(tmp_path / "checkpoint-last.pth")]) == 0
    assert_same_weights(weights(uninterrupted / "checkpoint-last.pth"), weights(tmp_path / "checkpoint-last.pth"))


def test_periodic_checkpoints_and_epoch_records(uninterrupted):
    assert (uninterrupted / "checkpoint-0001.pth").is_file() and (uninterrupted / "checkpoint-0002.pth").is_file()
    assert_same_weights(weights(uninterrupted / "checkpoint-0002.pth"), weights(uninterrupted / "checkpoint-last.pth"))
    log = [json.loads(line) for line in (uninterrupted / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and log[1]["step"] == 2 * STEPS_PER_EPOCH
    for r in log:
        assert set(r["tasks"]) == {"mim", "denoise", "sr"} and len(r["step_sizes"]) == 2
        for t in r["tasks"].values():
            assert t["psnr_restored"] > 0 and t["energy_clean"] != t["energy_corrupted"] and "train_loss" in t
        assert r["grad_norm"] > 0 and r["lr"] > 0 and r["images_per_s"] > 0 and r["peak_memory_mib"] > 0
        assert r["skipped_files"] == 0 and r["eval_s"] > 0


def test_non_finite_loss_stops_cleanly_with_the_last_checkpoint_intact(uninterrupted, tmp_path, monkeypatch, capsys):
    from energyvit.methods.energy import EnergyMethod

    real = EnergyMethod.step_loss

    def nan_after_first_epoch(self, *a, **k):
        inner = real(self, *a, **k)
        calls = {"n": 0}

        def step_loss(imgs, labels, seed):
            calls["n"] += 1
            name, loss = inner(imgs, labels, seed)
            return name, loss * float("nan") if calls["n"] > STEPS_PER_EPOCH + 3 else loss
        return step_loss

    monkeypatch.setattr(EnergyMethod, "step_loss", nan_after_first_epoch)
    assert main(TINY + ["--epochs", "2", "--output_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "non-finite loss" in err and "checkpoint-last.pth" in err, err
    state = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (0, STEPS_PER_EPOCH)
    assert_same_weights(weights(uninterrupted / "checkpoint-0001.pth"), state["model"])
    assert not (tmp_path / "summary.json").exists()


def test_bf16_precision_flag_trains_on_cpu(tmp_path):
    assert main(TINY + ["--epochs", "1", "--precision", "bf16", "--output_dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(r["mse_restored"] < r["mse_corrupted"] * 2 for r in summary["tasks"].values())


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = [a for a in TINY if a != "--no-tensorboard"]
    assert main(argv + ["--epochs", "1", "--grid_rows", "2", "--output_dir", str(tmp_path)]) == 0
    events = EventAccumulator(str(tmp_path)).Reload()
    assert {"loss", "tasks/mim/psnr_restored", "step_sizes/0", "grad_norm"} <= set(events.Tags()["scalars"])
    assert "restoration/mim" in events.Tags()["images"]
