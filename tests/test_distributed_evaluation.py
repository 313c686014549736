"""Evaluation under torchrun, on the CPU (2 gloo processes): streamed classification, kNN over
sharded training features and MAE's linear probe give what one process gives on the same data;
work on rank 0 alone cannot time the other ranks out.

Tolerances: the distributed and single-process runs add the same numbers in other groupings
(matrix products of other shapes, sums over ranks), so float64 results agree to rounding
(rtol 1e-9); counts of correct predictions are integers and must be equal."""
import datetime
import json
import os
import subprocess
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from energyvit import pretrain
from energyvit.data.in_memory import ImageSplit, SplitDataset
from energyvit.data.splits import DataSplits
from energyvit.distributed import DistInfo, run_on_main
from energyvit.sampling import derive_seed
from energyvit.evaluation.knn import knn_accuracy, knn_scores
from energyvit.evaluation.mae_probe import GlobalBatchNorm, MAEProbeOptions, feature_dim, probe_head, train_mae_probe
from energyvit.evaluation.streaming import classify_split, gather_shards, shard_features
from helpers import TORCHRUN, free_port, needs_torchrun, process_group, tiny_checkpoint, tiny_model

WORLD = 2
RTOL, ATOL = 1e-9, 1e-12


def clustered() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """37 training and 21 held-out float64 features of 4 overlapping clusters."""
    gen = torch.Generator().manual_seed(5)
    y = torch.randint(0, 4, (58,), generator=gen)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)[y] + 0.8 * torch.randn(58, 6, generator=gen,
                                                                                     dtype=torch.float64)
    return x[:37], y[:37], x[37:], y[37:]


def image_split(n: int, seed: int) -> ImageSplit:
    """3 classes of 8x8 images: a bright quadrant per class over noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.3 * torch.rand(n, 1, 8, 8, generator=gen, dtype=torch.float64)
    for c, (r, s) in enumerate(((0, 0), (0, 4), (4, 0))):
        x[y == c, :, r:r + 4, s:s + 4] += 0.6
    return ImageSplit(x, y)


def splits() -> DataSplits:
    train, held = image_split(48, 1), image_split(13, 2)  # 13: the ranks' shares differ in size
    return DataSplits(SplitDataset(train, max_shift=1), SplitDataset(train), held, SplitDataset(held), 1, True, 3,
                      "synthetic", 0, "mean", ["a", "b", "c"])


class Logits(nn.Module):
    """A fixed float64 classifier of 8x8 images (mean of each quadrant, linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3).double()
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]) * 3)
            self.linear.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))

    def forward(self, x):
        q = torch.nn.functional.avg_pool2d(x.double(), 4).flatten(1)
        return self.linear(q)


SGD_OPTIONS = dict(epochs=3, warmup_epochs=1, blr=16.0, optimizer="sgd", seed=3)
LARS_OPTIONS = dict(epochs=2, warmup_epochs=1, blr=400.0, weight_decay=1e-3, seed=4)  # lr 25: steps of 2.5% of |W|


def run_everything(info: DistInfo, batch_size: int) -> dict:
    """What each test compares: the results of one process (info disabled) or of this rank."""
    out = {}
    # kNN: each rank holds its ShardSampler share of 37 training and 21 held-out features; k = 20 is
    # more than either share (19 and 18), so each rank pads its candidates; t as DINO
    train_x, train_y, test_x, test_y = clustered()
    mine = slice(info.rank, None, info.world_size)
    out["knn_scores"] = knn_scores(train_x[mine], train_y[mine], test_x[mine], k=20, t=0.07, num_classes=4, dist=info)
    out["knn"] = knn_accuracy(train_x[mine], train_y[mine], test_x[mine], test_y[mine], 20, 0.07, 4, info)
    # GlobalBatchNorm on rows of a global batch of 16 that require a gradient: the loss of each rank
    # depends on the other's rows through the statistics
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 3 + 1
    w = torch.randn(16, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    rows = slice(info.rank * 8, info.rank * 8 + 8) if info.enabled else slice(None)
    x_mine = x[rows].clone().requires_grad_(True)
    for momentum in (None, 0.1):
        bn = GlobalBatchNorm(5, momentum=momentum, dist=info).double()
        for _ in range(2):  # two steps: the running statistics' update rule matters
            x_mine.grad = None
            y = bn(x_mine)
            (y * w[rows]).sum().backward()
        out[f"bn{momentum}"] = y.detach(), x_mine.grad, bn.running_mean.clone(), bn.running_var.clone()
    # classify_split over a held-out split of 13 images
    data = splits()
    out["classify"] = classify_split(Logits(), data.held_out_all, 4, info, "cpu")
    feats, labels = shard_features(lambda x: {"q": torch.nn.functional.avg_pool2d(x, 4).flatten(1)},
                                   data.held_out_all, info, torch.device("cpu"), batch_size=5)
    out["gathered"] = gather_shards(feats["q"], 13, info), gather_shards(labels, 13, info)
    # MAE's linear probe, by SGD and by LARS: the same global batch of 16 images per step
    for name, pool, options in (("sgd", "tokens", SGD_OPTIONS), ("lars", "mean", LARS_OPTIONS)):
        result = train_mae_probe(tiny_model(seed=0), pool, data, MAEProbeOptions(batch_size=batch_size, **options),
                                 info, "cpu", log=lambda s: None)
        out[name] = {k: result[k] for k in ("top1", "top5", "n_held_out", "lr", "effective_batch", "steps")}
        out[name + "_loss"] = [h["loss"] for h in result["history"]]
        out[name + "_head"] = {k: v.clone() for k, v in result["head"].state_dict().items()}
    return out


def worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    with process_group(rank, WORLD, port) as info:
        torch.save(run_everything(info, batch_size=8), f"{folder}/rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ranks")
    mp.spawn(worker, args=(free_port(), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_process():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_everything(DistInfo(), batch_size=16)
    finally:
        torch.set_num_threads(threads)


def reference_knn(train_x, train_y, test_x, k, t, num_classes):
    """The vote written out query by query: cosine similarity to every training image, the k best."""
    scores = torch.zeros(len(test_x), num_classes, dtype=torch.float64)
    for i, q in enumerate(test_x):
        sims = [(float(q @ x / (q.norm() * x.norm())), int(y)) for x, y in zip(train_x, train_y)]
        for sim, label in sorted(sims, reverse=True)[:k]:
            scores[i, label] += torch.tensor(sim / t, dtype=torch.float64).exp()
    return scores


def test_knn_over_sharded_features_equals_one_process(two_ranks, one_process):
    train_x, train_y, test_x, _ = clustered()
    expected = one_process["knn_scores"]
    torch.testing.assert_close(expected, reference_knn(train_x, train_y, test_x, 20, 0.07, 4), rtol=RTOL, atol=0)
    for rank, got in enumerate(two_ranks):  # rank r scored held-out features r, r + 2, ...
        torch.testing.assert_close(got["knn_scores"], expected[rank::WORLD], rtol=RTOL, atol=0)
        assert got["knn"] == one_process["knn"]
    assert one_process["knn"]["n"] == 21 and 0.5 < one_process["knn"]["top1"] <= one_process["knn"]["top5"]


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_global_batch_norm_is_torch_batch_norm_over_the_global_batch(momentum, two_ranks, one_process):
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 3 + 1
    w = torch.randn(16, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x.requires_grad_(True)
    bn = nn.BatchNorm1d(5, eps=1e-6, momentum=momentum, affine=False).double()
    for _ in range(2):
        x.grad = None
        y = bn(x)
        (y * w).sum().backward()
    expected = y.detach(), x.grad, bn.running_mean, bn.running_var
    for got, want in zip(one_process[f"bn{momentum}"], expected):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    for rank, got in enumerate(two_ranks):
        rows = slice(rank * 8, rank * 8 + 8)
        for a, b in zip(got[f"bn{momentum}"], (expected[0][rows], expected[1][rows], *expected[2:])):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_classify_split_counts_every_image_once(two_ranks, one_process):
    expected = one_process["classify"]
    assert expected["n"] == 13 and expected["top1"] == 1.0 and expected["top5"] == 1.0
    for got in two_ranks:
        assert {k: got["classify"][k] for k in ("top1", "top5", "n")} == {k: expected[k] for k in ("top1", "top5", "n")}
        assert got["classify"]["loss"] == pytest.approx(expected["loss"], rel=RTOL)
        for a, b in zip(got["gathered"], one_process["gathered"]):  # features back in the images' order
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_mae_probe_under_ddp_equals_one_process_on_the_global_batch(optimizer, two_ranks, one_process):
    expected = one_process[optimizer]
    epochs = {"sgd": SGD_OPTIONS, "lars": LARS_OPTIONS}[optimizer]["epochs"]
    assert expected["effective_batch"] == 16 and expected["steps"] == epochs * 3 and expected["n_held_out"] == 13
    if optimizer == "sgd":
        assert expected["top1"] == 1.0  # 3 classes: chance is 1/3
    for got in two_ranks:
        assert got[optimizer] == expected
        torch.testing.assert_close(torch.tensor(got[optimizer + "_loss"]), torch.tensor(one_process[optimizer + "_loss"]),
                                   rtol=RTOL, atol=ATOL)
        head = one_process[optimizer + "_head"]
        assert set(got[optimizer + "_head"]) == {"0.running_mean", "0.running_var", "0.num_batches_tracked", "1.weight",
                                                 "1.bias"} == set(head)
        for name, value in head.items():
            torch.testing.assert_close(got[optimizer + "_head"][name], value, rtol=RTOL, atol=ATOL, msg=name)
    options = {"sgd": SGD_OPTIONS, "lars": LARS_OPTIONS}[optimizer]
    init = probe_head(feature_dim(tiny_model(), "tokens" if optimizer == "sgd" else "mean"), 3,
                      derive_seed(options["seed"], 1)).double()
    assert (one_process[optimizer + "_head"]["1.weight"] - init[1].weight).abs().max() > 1e-2  # it trained


# ---------------------------------------------------------------- work on rank 0 alone
SHORT_TIMEOUT = datetime.timedelta(seconds=2)


def slow_main_worker(rank: int, port: int, folder: str, patient: bool) -> None:
    """Rank 0 works for longer than the default group's timeout; rank 1 waits for it either by
    run_on_main or, the control, in a barrier of the default group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=SHORT_TIMEOUT)
    info = DistInfo(rank, WORLD, rank)
    try:
        if patient:
            result = run_on_main(info, lambda: time.sleep(3 * SHORT_TIMEOUT.seconds) or "evaluated")
        else:
            if rank == 0:
                time.sleep(3 * SHORT_TIMEOUT.seconds)
            dist.barrier()
            result = "waited"
        outcome = f"ok {result}"
    except RuntimeError as e:
        outcome = f"failed {e}"
    with open(f"{folder}/rank{rank}.txt", "w") as f:
        f.write(outcome)


@pytest.mark.parametrize("patient", [True, False], ids=["run_on_main", "control-default-barrier"])
def test_a_slow_rank_0_does_not_time_the_others_out(patient, tmp_path):
    mp.spawn(slow_main_worker, args=(free_port(), str(tmp_path), patient), nprocs=WORLD, join=True)
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    if patient:
        assert outcomes == ["ok evaluated", "ok None"]
    else:  # the control: the same wait in the default group's barrier times out
        assert outcomes[1].startswith("failed") and "Timed out" in outcomes[1], outcomes


def slow_pretrain_worker(rank: int, port: int, folder: str) -> None:
    """The whole pretraining job under a default-group timeout shorter than its final evaluation."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=10))
    evaluate = pretrain.final_evaluation

    def slow_evaluation(t):
        time.sleep(12)
        return evaluate(t)

    pretrain.final_evaluation = slow_evaluation
    from energyvit.data.splits import DataOptions
    from energyvit.model import ModelOptions
    from energyvit.training import TrainOptions

    options = pretrain.PretrainOptions(
        data=DataOptions(), model=ModelOptions(model="vit_pico_patch2"), train=TrainOptions(batch_size=250, epochs=1),
        run=pretrain.RunOptions(output_dir=folder, grid_rows=0, tensorboard=False, device="cpu", probe_images=300))
    summary = pretrain.run(options)
    with open(f"{folder}/done{rank}.txt", "w") as f:
        f.write("summary" if summary is not None else "none")


def test_pretrain_under_torchrun_outlasts_the_default_timeout_in_its_final_evaluation(tmp_path):
    t0 = time.perf_counter()
    mp.spawn(slow_pretrain_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    assert time.perf_counter() - t0 > 12
    assert [(tmp_path / f"done{r}.txt").read_text() for r in range(WORLD)] == ["summary", "none"]
    assert (tmp_path / "summary.json").exists()


# ---------------------------------------------------------------- `energyvit probe` under torchrun
def image_folder(root) -> str:
    """train/ and val/ of 3 classes of 8x8 gray images: dark, mid-gray and bright, each with noise
    (classes that random resized crops and flips keep)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, per_class in (("train", 16), ("val", 5)):
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(per_class):
                x = 30 + 80 * c + 60 * torch.rand(8, 8, generator=gen)
                Image.fromarray(x.byte().numpy(), mode="L").save(root / split / f"c{c}" / f"{i}.png")
    return str(root)


@needs_torchrun
@pytest.mark.parametrize("protocol", ["mae", "lbfgs"])
def test_torchrun_probe_two_cpu_processes_equals_one(protocol, tmp_path, capsys):
    from energyvit.cli import main

    data = image_folder(tmp_path / "data")
    tiny_checkpoint(tmp_path / "ckpt.pth")
    common = [str(tmp_path / "ckpt.pth"), "--data_path", data, "--protocol", protocol, "--pool", "mean",
              "--num_workers", "0", "--num_threads", "1", "--device", "cpu", "--knn_k", "20"]
    if protocol == "mae":
        common += ["--epochs", "3", "--warmup_epochs", "1", "--blr", "2"]
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "energyvit", "probe", *common,
           "--batch_size", "8", "--output", str(tmp_path / "two.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 alone prints and writes
    assert main(["probe", *common, "--batch_size", "16", "--output", str(tmp_path / "one.json")]) == 0
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert one["n_train"] == 48 and one["n_held_out"] == 15 and one["knn_k"] == 20
    for key in ("linear_probe_acc", "linear_probe_top5", "knn_top1", "knn_top5", "n_held_out", "feature_dim"):
        assert two[key] == one[key], key
    assert one["knn_top1"] > 0.6 and one["linear_probe_acc"] > 0.6  # chance: 1/3
    if protocol == "mae":  # 2 processes x 8 = 1 x 16 images per step: the same steps, to float32 rounding
        assert two["mae_probe"]["effective_batch"] == one["mae_probe"]["effective_batch"] == 16
        assert two["mae_probe"]["steps"] == 3 * 3
        torch.testing.assert_close(torch.tensor([h["loss"] for h in two["mae_probe"]["history"]]),
                                   torch.tensor([h["loss"] for h in one["mae_probe"]["history"]]), rtol=1e-5, atol=1e-6)
