import json

import pytest
import torch

from energyvit.cli import main
from energyvit.evaluation.knn import knn_scores, topk_accuracy
from helpers import tiny_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


def test_knn_separates_clusters():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(3, 16, generator=gen)[y] * 3 + 0.3 * torch.randn(300, 16, generator=gen)
    scores = knn_scores(x[:200], y[:200], x[200:], k=20, t=0.1)
    assert scores.shape == (100, 3) and topk_accuracy(scores, y[200:], 1) == 1.0


def test_knn_votes_are_weighted_by_similarity_over_temperature():
    # two training neighbours of class 0 at cosine 0.6, one of class 1 at cosine 1
    train_x = torch.tensor([[0.6, 0.8], [0.6, -0.8], [1.0, 0.0]])
    train_y = torch.tensor([0, 0, 1])
    query = torch.tensor([[2.0, 0.0]])  # the length does not matter: cosine similarity
    sharp = knn_scores(train_x, train_y, query, k=3, t=0.1)  # exp(10) beats 2 exp(6)
    flat = knn_scores(train_x, train_y, query, k=3, t=10.0)  # nearly a plain majority vote
    assert sharp.argmax().item() == 1 and flat.argmax().item() == 0
    torch.testing.assert_close(sharp, torch.tensor([[2 * torch.e ** 6, torch.e ** 10]]))
    assert topk_accuracy(sharp, torch.tensor([0]), 1) == 0.0 and topk_accuracy(sharp, torch.tensor([0]), 2) == 1.0


def test_knn_rejects_bad_k_and_t():
    x, y = torch.randn(5, 4), torch.arange(5) % 2
    with pytest.raises(ValueError, match=r"knn_k must be in 1..5 \(the training images\), got 6"):
        knn_scores(x, y, x, k=6, t=0.1)
    with pytest.raises(ValueError, match="knn_t must be > 0"):
        knn_scores(x, y, x, k=2, t=0.0)


@pytest.mark.parametrize("chans", [1, 3])
def test_probe_command_prints_and_writes_json(chans, tmp_path, capsys):
    tiny_checkpoint(tmp_path / "ckpt.pth", in_chans=chans)
    assert main(["probe", str(tmp_path / "ckpt.pth"), "--pool", "mean", "--knn_k", "10"]) == 0
    printed = capsys.readouterr().out
    assert "linear probe" in printed and "kNN (k=10, t=0.1)" in printed
    result = json.loads((tmp_path / "probe-mean.json").read_text())
    assert result["n_train"] == 1500 and result["n_held_out"] == 297 and result["feature_dim"] == 32
    for key in ("linear_probe_acc", "knn_top1", "knn_top5"):
        assert 0.0 <= result[key] <= 1.0
    assert result["knn_top1"] <= result["knn_top5"]
    # even a random tiny encoder's features beat chance (0.1) by far on the digits
    assert result["knn_top1"] > 0.3 and result["linear_probe_acc"] > 0.3


def test_probe_errors_are_one_line(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "ckpt.pth")
    assert main(["probe", str(tmp_path / "ckpt.pth"), "--knn_t", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--knn_t/--knn-t: must be a finite number > 0, got 0" in err and len(err.splitlines()) == 1, err


def test_probe_defaults_to_k200_and_scores_random_init(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "ckpt.pth", seed=3)
    assert main(["probe", str(tmp_path / "ckpt.pth"), "--pool", "mean"]) == 0
    assert main(["probe", str(tmp_path / "ckpt.pth"), "--pool", "mean", "--random_init", "--seed", "5"]) == 0
    assert "(random init)" in capsys.readouterr().out
    trained = json.loads((tmp_path / "probe-mean.json").read_text())
    random = json.loads((tmp_path / "probe-mean-random-init.json").read_text())
    assert trained["knn_k"] == 200 and trained["knn_t"] == 0.1 and random["random_init"]
    assert trained["linear_probe_acc"] != random["linear_probe_acc"]  # other weights, other features


def test_probe_on_a_labeled_image_folder(tmp_path):
    from PIL import Image

    for label, value in (("dark", 40), ("bright", 200)):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(12):
            Image.new("L", (10, 10), value + 3 * i).save(tmp_path / "data" / label / f"{i}.png")
    tiny_checkpoint(tmp_path / "ckpt.pth")
    assert main(["probe", str(tmp_path / "ckpt.pth"), "--data_path", str(tmp_path / "data"), "--pool", "mean"]) == 0
    result = json.loads((tmp_path / "probe-mean.json").read_text())
    # 24 images, a tenth (2) held out; k capped at the 22 training images
    assert result["n_train"] == 22 and result["n_held_out"] == 2 and result["knn_k"] == 22
    assert result["linear_probe_acc"] == 1.0


def test_probe_mae_protocol_on_the_digits_beats_chance_in_seconds(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "ckpt.pth")
    assert main(["probe", str(tmp_path / "ckpt.pth"), "--protocol", "mae", "--epochs", "3", "--num_threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "MAE linear probe of tokens features" in printed and "SGD, effective batch 256" in printed
    assert "linear probe (MAE, 3 epochs)" in printed and printed.count("epoch ") >= 3
    result = json.loads((tmp_path / "probe-mae-tokens.json").read_text())
    assert result["protocol"] == "mae" and result["n_held_out"] == 297 and result["n_train"] == 1500
    mae = result["mae_probe"]
    assert mae["effective_batch"] == 256 and mae["steps"] == 3 * (1500 // 256) and mae["lr"] == 0.1
    assert [h["epoch"] for h in mae["history"]] == [0, 1, 2] and mae["history"][-1]["loss"] < mae["history"][0]["loss"]
    # ten classes: chance is 0.1 (a random tiny encoder: the L-BFGS probe of its tokens reaches about 0.8)
    assert result["linear_probe_acc"] > 0.5 and result["linear_probe_acc"] <= result["linear_probe_top5"]
    assert "probe_train_images" not in result and 0.3 < result["knn_top1"] <= result["knn_top5"]


def test_probe_scores_every_held_out_image_and_knn_every_training_image(tmp_path):
    from PIL import Image

    for split, n in (("train", 30), ("val", 20)):
        for label, value in (("dark", 40), ("bright", 200)):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(n):
                Image.new("L", (10, 10), value + 2 * i).save(tmp_path / "data" / split / label / f"{i}.png")
    tiny_checkpoint(tmp_path / "ckpt.pth")
    assert main(["probe", str(tmp_path / "ckpt.pth"), "--data_path", str(tmp_path / "data"), "--eval_images", "8",
                 "--probe_images", "10", "--knn_k", "100", "--num_workers", "0"]) == 0
    result = json.loads((tmp_path / "probe-mean.json").read_text())  # mean: the default pooling of image files
    # all 40 validation images (--eval_images caps only the in-memory sample); the L-BFGS probe fits
    # on 10 training images, the kNN votes among all 60 (k capped there)
    assert result["n_held_out"] == 40 and result["probe_train_images"] == 10 and result["n_train"] == 60
    assert result["knn_k"] == 60 and result["pool"] == "mean"
    assert result["linear_probe_acc"] == 1.0
