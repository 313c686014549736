"""Energy as a score: per-patch energies, restoration scores over rotating masks, MAE's error
through the same masks, the detection metrics against hand-computed and scikit-learn values, and
`energyvit score` (CSV, metrics JSON, heatmaps, one-class protocol, bad inputs)."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import energyvit
from energyvit.cli import main
from energyvit.evaluation.detection import aupr, auroc, fpr_at_tpr, knn_distance, mahalanobis_distance, \
    nearest_distance
from energyvit.methods.mae import MAEBaseline
from energyvit.scoring import mae_errors, restoration_errors, rotation_masks
from helpers import images, tiny_checkpoint, tiny_model

PICO = ["--model", "vit_pico_patch2", "--batch_size", "50", "--num_threads", "1", "--no-tensorboard", "--grid_rows",
        "0", "--probe_images", "100"]


def test_metrics_on_a_hand_computed_case():
    s_in, s_out = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 3.0])
    # pairs (out, in): 1>0, 1=1 (half), 1<2, 3>all: (1 + 0.5 + 3) / 6
    assert auroc(s_in, s_out) == pytest.approx(0.75)
    # ranked: 3 (out: precision 1, recall 1/2), 2 (in), then 1 and 1 together (precision 2/4, recall 1)
    assert aupr(s_in, s_out) == pytest.approx(0.5 * 1 + 0.5 * 0.5)
    # catching 95% of 2 out images needs both: threshold 1, flagging in images 1 and 2
    assert fpr_at_tpr(s_in, s_out) == pytest.approx(2 / 3)
    assert auroc(s_in, s_in + 10) == 1.0 and fpr_at_tpr(s_in, s_in + 10) == 0.0
    with pytest.raises(ValueError, match="need in- and out-of-distribution scores"):
        auroc(torch.tensor([]), s_out)


def test_metrics_match_scikit_learn_with_ties():
    from sklearn.metrics import average_precision_score, roc_auc_score

    g = torch.Generator().manual_seed(0)
    s_in, s_out = torch.randint(0, 6, (40,), generator=g).float(), torch.randint(2, 9, (23,), generator=g).float()
    y, s = [0] * 40 + [1] * 23, torch.cat([s_in, s_out]).numpy()
    assert auroc(s_in, s_out) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert aupr(s_in, s_out) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_feature_distances():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert knn_distance(ref, torch.tensor([[2.0, 0.0]]), k=1).item() == pytest.approx(0.0, abs=1e-6)
    assert knn_distance(ref, torch.tensor([[2.0, 0.0]]), k=2).item() == pytest.approx(1 - 2 ** -0.5, abs=1e-6)
    assert nearest_distance(ref, torch.tensor([[1.0, 3.0]])).item() == pytest.approx(2.0)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 3, generator=g), torch.randn(200, 3, generator=g) + 10
    labels = torch.cat([torch.zeros(200), torch.ones(200)]).long()
    near_b = mahalanobis_distance(torch.cat([a, b]), torch.tensor([[10.0, 10.0, 10.0]]), labels)
    far = mahalanobis_distance(torch.cat([a, b]), torch.tensor([[5.0, 5.0, 5.0]]), labels)
    assert near_b.item() < 1.0 < far.item()  # the nearest class mean, not the pooled mean


def test_rotation_masks_hide_every_patch_exactly_once():
    masks = rotation_masks(16, 3, seed=4)
    assert masks.shape == (3, 16) and (masks.sum(0) == 1).all() and sorted(masks.sum(1).tolist()) == [5, 5, 6]
    assert torch.equal(masks, rotation_masks(16, 3, seed=4)) and not torch.equal(masks, rotation_masks(16, 3, seed=5))
    with pytest.raises(ValueError, match="rounds must be in 1..16"):
        rotation_masks(16, 17)


@pytest.mark.parametrize("readout", ["norm", "linear"])
def test_patch_energies_sum_to_the_energy(readout):
    model = tiny_model(energy=readout, energy_head_depth=1 if readout == "norm" else 0, energy_head_dim=16 if
                       readout == "norm" else 0)
    x = images(3)
    parts = model.patch_energies(x)
    assert parts.shape == (3, 16)
    torch.testing.assert_close(parts.sum(1), model(x), rtol=1e-12, atol=1e-12)


def test_cls_readout_has_no_patch_energies_but_still_scores():
    model = tiny_model(energy="cls")
    with pytest.raises(ValueError, match="no per-patch energies"):
        model.patch_energies(images(2))
    s = energyvit.score(model, images(2))
    assert s.patch_energy is None and s.patch_restoration.shape == (2, 4, 4)


def test_restoration_score_restores_each_patch_from_the_rest():
    model = tiny_model()
    x = images(2)
    errors = restoration_errors(model, x, rounds=4, seed=0, fill=0.5)
    assert errors.shape == (2, 16) and (errors >= 0).all()
    # one round by hand: the patches of round 0, hidden under 0.5 and restored with the rest visible
    hidden = rotation_masks(16, 4, seed=0)[0]
    mask = hidden.double().view(1, 1, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)
    restored = energyvit.restore(model, x * (1 - mask) + 0.5 * mask, mask.expand(2, -1, -1, -1)).restored
    by_hand = (restored - x).pow(2).view(2, 1, 4, 2, 4, 2).mean(dim=(1, 3, 5)).flatten(1)
    torch.testing.assert_close(errors[:, hidden], by_hand[:, hidden])
    s = energyvit.score(model, x, rounds=4, seed=0, fill=0.5)
    torch.testing.assert_close(s.restoration, errors.mean(1))
    torch.testing.assert_close(s.energy, model(x))


def test_mae_error_through_a_mask_is_its_own_loss_on_those_patches():
    torch.manual_seed(0)
    mae = MAEBaseline(tiny_model(dtype=torch.float32).cfg, mask_ratio=0.75).eval()
    x = images(3, dtype=torch.float32)
    errors = mae_errors(mae, x, rounds=4, seed=1)
    hidden = rotation_masks(16, 4, seed=1)[2]
    # MAE's own path with the same visible patches: the loss over the hidden ones
    ids = torch.cat([(~hidden).nonzero()[:, 0], hidden.nonzero()[:, 0]]).expand(3, -1)
    pred = mae.decode(mae.encode_kept(x, ids[:, : int((~hidden).sum())]), ids.argsort(1))
    loss = (pred - mae.targets(x)).pow(2).mean(-1)[:, hidden]
    torch.testing.assert_close(errors[:, hidden], loss.detach())


def save_pngs(folder, arrays):
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"{i}.png")


def test_score_command_in_vs_out_csv_metrics_heatmaps_and_skipped_files(tmp_path, capsys, one_thread):
    ckpt = tmp_path / "c.pth"
    tiny_checkpoint(ckpt)
    rng = np.random.default_rng(0)
    save_pngs(tmp_path / "in", [np.full((8, 8), 30, np.uint8) + rng.integers(0, 5, (8, 8), dtype=np.uint8)
                                for _ in range(5)])
    save_pngs(tmp_path / "out", [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(4)])
    (tmp_path / "out" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "m.json"
    assert main(["score", str(ckpt), "--in", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--reference",
                 str(tmp_path / "in"), "--output", str(out), "--csv", str(tmp_path / "s.csv"), "--heatmaps",
                 str(tmp_path / "maps"), "--per_patch", "--knn_k", "2"]) == 0
    said = capsys.readouterr().out
    assert "scored 5 in, 4 out (1 unreadable, skipped)" in said
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"energy", "restoration", "energy_typicality", "knn", "mahalanobis", "pixels"}
    for m in metrics.values():
        assert 0 <= m["auroc"] <= 1 and 0 <= m["aupr"] <= 1 and 0 <= m["fpr95"] <= 1 and (m["n_in"], m["n_out"]) == (5, 4)
    assert metrics["pixels"]["auroc"] == 1.0  # noise is far from every flat gray reference image
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert len(rows) == 9 and {r["set"] for r in rows} == {"in", "out"} and "restoration_patch15" in rows[0]
    assert not any("broken" in r["path"] for r in rows)
    assert len(list((tmp_path / "maps").glob("*.png"))) == 9
    strip = Image.open(next((tmp_path / "maps").glob("in-*.png")))
    assert strip.mode == "RGB" and strip.size[0] > 3 * strip.size[1] - 10  # image | restoration | energy


def test_one_class_protocol_scores_its_class_lower(tmp_path, capsys, one_thread):
    """The answer is known: a model pretrained on one class of shapes scores held-out images of
    that class lower than clearly different images. Which score sees it depends on how they differ:
    restoration sees the digits (strokes it cannot restore), the energy sees noise (digits get a
    lower energy than shapes: simpler images, as likelihood models rate them higher), and the
    two-sided energy typicality sees both."""
    data = tmp_path / "shapes"
    assert main(["shapes", str(data), "--train_per_class", "60", "--val_per_class", "8", "--size", "16"]) == 0
    run = tmp_path / "run"
    assert main(["pretrain", *PICO, "--input_size", "8", "--data_path", str(data), "--one_class", "disc",
                 "--epochs", "8", "--warmup_epochs", "1", "--output_dir", str(run)]) == 0
    ckpt = str(run / "checkpoint-last.pth")
    saved = torch.load(ckpt, weights_only=True)
    assert saved["args"]["one_class"] == "disc" and "class 'disc' only (60 train images)" in saved["data"]
    capsys.readouterr()
    assert main(["score", ckpt, "--data_path", str(data), "--one_class", "disc", "--output", str(tmp_path / "oc.json")]) == 0
    assert "scored 8 in, 72 out" in capsys.readouterr().out  # class disc against the 9 others
    noise = tmp_path / "noise"
    save_pngs(noise, [np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8) for i in range(8)])

    def mean_scores(out_set: str) -> dict:
        assert main(["score", ckpt, "--in", str(data / "val" / "disc"), "--out", out_set, "--reference",
                     str(data / "train" / "disc"), "--output", str(tmp_path / "m.json")]) == 0
        rows = list(csv.DictReader((run / "scores.csv").open()))
        return {(k, s): np.mean([float(r[k]) for r in rows if r["set"] == s])
                for k in ("restoration", "energy", "energy_typicality") for s in ("in", "out")}

    digits = mean_scores("digits")
    assert digits["restoration", "in"] < digits["restoration", "out"], digits
    assert digits["energy_typicality", "in"] < digits["energy_typicality", "out"], digits
    noisy = mean_scores(str(noise))
    assert noisy["energy", "in"] < noisy["energy", "out"], noisy
    assert noisy["energy_typicality", "in"] < noisy["energy_typicality", "out"], noisy


@pytest.mark.parametrize("argv,needle", [
    (lambda t: [t["ckpt"], str(t["empty"])], "no image files under"),
    (lambda t: [t["ckpt"], str(t["dir"] / "nothing.png")], "does not exist"),
    (lambda t: [t["ckpt"], "--in", str(t["imgs"])], "--in and --out go together"),
    (lambda t: [t["ckpt"], str(t["imgs"]), "--in", str(t["imgs"]), "--out", str(t["imgs"])], "give one of"),
    (lambda t: [t["ckpt"]], "give one of"),
    (lambda t: [t["ckpt"], "--one_class", "ten"], "no class 'ten'"),
    (lambda t: [t["ckpt"], "--in", str(t["imgs"]), "--out", str(t["empty"])], "no image files under"),
    (lambda t: [t["ckpt"], str(t["imgs"]), "--mae", t["ckpt"]], "is not a checkpoint of `energyvit pretrain --method mae`"),
    (lambda t: [t["ckpt"], str(t["imgs"]), "--rounds", "0"], "--rounds"),
    (lambda t: [t["ckpt"], str(t["imgs"]), "--rounds", "17"], "rounds must be in 1..16"),
    (lambda t: [t["ckpt"], str(t["broken"])], "none of the 1 images could be read"),
])
def test_bad_score_inputs_are_one_line(tmp_path, capsys, argv, needle):
    t = {"ckpt": str(tmp_path / "c.pth"), "empty": tmp_path / "empty", "dir": tmp_path, "imgs": tmp_path / "imgs",
         "broken": tmp_path / "broken"}
    tiny_checkpoint(t["ckpt"])
    t["empty"].mkdir()
    save_pngs(t["imgs"], [np.zeros((8, 8), np.uint8)] * 2)
    t["broken"].mkdir()
    (t["broken"] / "b.png").write_bytes(b"no")
    assert main(["score", *argv(t)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_pretrain_one_class_needs_a_labeled_class(tmp_path, capsys):
    assert main(["pretrain", *PICO, "--one_class", "11", "--output_dir", str(tmp_path / "o")]) == 2
    assert "no class '11'" in capsys.readouterr().err
    flat = tmp_path / "flat"
    save_pngs(flat, [np.zeros((8, 8), np.uint8)] * 12)
    assert main(["pretrain", *PICO, "--data_path", str(flat), "--one_class", "0", "--output_dir", str(tmp_path / "o")]) == 2
    assert "has no labels" in capsys.readouterr().err
