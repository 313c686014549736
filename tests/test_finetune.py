import json
import signal

import pytest
import torch

from energyvit.cli import main
from energyvit.data.in_memory import ImageSplit, SplitDataset
from energyvit.evaluation.finetuning import Classifier, add_drop_path, layer_id
from energyvit.evaluation.streaming import classify_split
from energyvit.training import param_groups
from helpers import tiny_checkpoint, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


def test_layerwise_lr_decay_groups():
    encoder = tiny_model(dtype=torch.float32)  # 2 blocks
    encoder.restore_log_step.requires_grad_(False)
    model = Classifier(encoder, 10)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5, layer_of=lambda name: layer_id(name, 2))
    scale_of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale_of[id(named["encoder.patch_embed.proj.weight"])] == (0.125, 0.05)  # 0.5 ** (2 + 1)
    assert scale_of[id(named["encoder.cls_token"])] == (0.125, 0.0)
    assert scale_of[id(named["encoder.blocks.0.attn.qkv.weight"])] == (0.25, 0.05)
    assert scale_of[id(named["encoder.blocks.1.mlp.fc1.bias"])] == (0.5, 0.0)
    assert scale_of[id(named["encoder.norm.weight"])] == (1.0, 0.0)
    assert scale_of[id(named["head.weight"])] == (1.0, 0.05)
    # frozen tensors are in no group: the fixed position embedding, the step sizes
    assert id(named["encoder.pos_embed"]) not in scale_of and id(named["encoder.restore_log_step"]) not in scale_of


def test_drop_path_hooks_drop_whole_samples_in_training_only():
    model = tiny_model(dtype=torch.float32)
    keys = list(model.state_dict())
    x = torch.rand(2000, 1, 8, 8)
    with torch.no_grad():
        tokens = model.patch_embed(x)
        clean = model.blocks[1].attn(tokens)
        handles = add_drop_path(model, 0.5)  # block 0: rate 0, block 1: rate 0.5
        assert len(handles) == 2 and list(model.state_dict()) == keys
        dropped = model.blocks[1].attn(tokens)
        zero = dropped.flatten(1).eq(0).all(1)
        assert 0.45 < zero.float().mean() < 0.55
        torch.testing.assert_close(dropped[~zero], 2 * clean[~zero])  # survivors scaled by 1 / (1 - p)
        model.eval()
        torch.testing.assert_close(model.blocks[1].attn(tokens), clean, rtol=0, atol=0)
        model.train()
        torch.testing.assert_close(model.blocks[0].mlp(tokens), model.blocks[0].mlp.forward(tokens), rtol=0, atol=0)


def test_finetune_command_trains_and_writes_summary(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "ckpt.pth")
    out = tmp_path / "ft"
    # drop path off: this tiny random-init model learns slowly, and its noise could hide that it does
    argv = ["finetune", str(tmp_path / "ckpt.pth"), "--epochs", "3", "--warmup_epochs", "1", "--batch_size", "100",
            "--drop_path", "0", "--no-tensorboard", "--output_dir", str(out)]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "held-out top-1 after 3 epochs" in said and "fp32 on cpu" in said
    summary = json.loads((out / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2]
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < losses[0] < 2.4  # it learns; ln(10) = 2.30 is the loss of a uniform guess
    assert 0.0 <= summary["held_out_top1"] <= summary["held_out_top5"] <= 1.0 and summary["n_held_out"] == 297
    assert summary["held_out_top1"] == summary["history"][-1]["held_out_top1"]  # the last epoch's, no selection
    state = torch.load(out / "checkpoint-finetuned.pth", weights_only=True)
    assert state["num_classes"] == 10 and "head.weight" in state["model"]
    last = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert (last["epoch"], last["step_in_epoch"], last["global_step"]) == (2, 15, 45)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2] and all(r["held_out_top5"] >= r["held_out_top1"] for r in log)


@pytest.mark.parametrize("flag,value,needle", [
    ("--layer_decay", "0", "--layer_decay/--layer-decay: must be in (0, 1], got 0.0"),
    ("--drop_path", "1", "--drop_path/--drop-path: must be in [0, 1), got 1.0"),
    ("--pool", "tokens", "invalid choice: 'tokens'"),
])
def test_finetune_errors_are_one_line(flag, value, needle, tmp_path, capsys):
    tiny_checkpoint(tmp_path / "ckpt.pth")
    assert main(["finetune", str(tmp_path / "ckpt.pth"), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


# ------------------------------------------------------------------------------ held-out top-1 / top-5
class FixedLogits(torch.nn.Module):
    """Logits looked up by the image's first pixel (its index): a classifier with known answers."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits, requires_grad=False)

    def forward(self, x):
        return self.logits[x[:, 0, 0, 0].round().long()]


def test_streamed_top1_and_top5_by_hand():
    # 7 images, 8 classes; the true class ranks 1st, 1st, 2nd, 5th, 6th, 8th and 3rd among each
    # image's logits: top-1 2/7, top-5 5/7
    ranks = [0, 0, 1, 4, 5, 7, 2]
    logits = torch.arange(8, 0, -1, dtype=torch.float32).repeat(7, 1)  # class c has rank c everywhere
    labels = torch.tensor(ranks)
    dataset = SplitDataset(ImageSplit(torch.arange(7.0).view(7, 1, 1, 1).expand(7, 1, 2, 2), labels))
    scores = classify_split(FixedLogits(logits), dataset, batch_size=3)  # batches of 3, 3 and 1
    assert scores["top1"] == 2 / 7 and scores["top5"] == 5 / 7 and scores["n"] == 7
    expected = torch.nn.functional.cross_entropy(logits, labels).item()
    assert scores["loss"] == pytest.approx(expected, rel=1e-6)
    # fewer than 5 classes: top-5 is top-C, every image counts
    few = classify_split(FixedLogits(logits[:, :3]), SplitDataset(ImageSplit(dataset.split.images, labels % 3)))
    assert few["top5"] == 1.0


def test_unlabeled_images_are_refused_by_the_evaluation():
    split = ImageSplit(torch.zeros(2, 1, 2, 2), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="1 held-out image\\(s\\) have no label"):
        classify_split(FixedLogits(torch.zeros(1, 3)), SplitDataset(split))


# ------------------------------------------------------------------------------ checkpoints and resume
# mixup, cutmix, random erasing and drop path all on: every draw must repeat after a resume
FT = ["--batch_size", "100", "--warmup_epochs", "1", "--num_threads", "1", "--no-tensorboard", "--mixup", "0.8",
      "--cutmix", "1.0", "--reprob", "0.25", "--drop_path", "0.2"]
STEPS_PER_EPOCH = 15  # 1500 digits / 100


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrained") / "ckpt.pth"
    tiny_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def uninterrupted(pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    torch.set_num_threads(1)
    assert main(["finetune", pretrained, *FT, "--epochs", "2", "--output_dir", str(out)]) == 0
    return out


def last_state(out):
    return torch.load(out / "checkpoint-last.pth", weights_only=True)


def test_crash_and_interrupt_mid_epoch_resume_to_the_same_weights(pretrained, uninterrupted, tmp_path, monkeypatch):
    calls = {"n": 0}
    step = torch.optim.AdamW.step

    def crash_at_eighth(self, *a, **k):  # a crash, no handler runs: the timed checkpoint of step 7 is what is left
        calls["n"] += 1
        if calls["n"] == 8:
            raise MemoryError("simulated crash")
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_at_eighth)
    with pytest.raises(MemoryError):  # two DataLoader workers read the digits here, none after
        main(["finetune", pretrained, *FT, "--epochs", "2", "--checkpoint_minutes", "1e-9", "--num_workers", "2",
              "--output_dir", str(tmp_path)])
    state = last_state(tmp_path)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"], state["history"]) == (0, 7, 7, [])
    assert state["pretrained"] == pretrained and state["num_classes"] == 10

    calls["n"] = 0

    def step_then_signal(self, *a, **k):  # a real SIGINT after global step 20 (epoch 1, step 5)
        out = step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 13:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_signal)
    before = signal.getsignal(signal.SIGINT)
    resume = ["--resume", str(tmp_path / "checkpoint-last.pth")]
    assert main(["finetune", *resume, "--epochs", "2", "--num_workers", "0"]) == 130  # the pretrained path from it
    assert signal.getsignal(signal.SIGINT) is before
    monkeypatch.undo()
    state = last_state(tmp_path)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 5, 20)
    assert len(state["history"]) == 1 and "held_out_top1" in state["history"][0]

    assert main(["finetune", pretrained, *FT, *resume, "--epochs", "2", "--output_dir", str(tmp_path)]) == 0
    full, resumed = last_state(uninterrupted), last_state(tmp_path)
    for name, w in full["model"].items():
        torch.testing.assert_close(resumed["model"][name], w, rtol=0, atol=0, msg=name)
    summary, expected = (json.loads((d / "summary.json").read_text()) for d in (tmp_path, uninterrupted))
    for key in ("held_out_top1", "held_out_top5", "held_out_loss"):
        assert summary[key] == expected[key]
    # (an epoch's training loss averages the steps the run that finished it made: not compared)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]  # one record per finished epoch, across the three runs


def test_an_epoch_end_checkpoint_without_scores_is_scored_on_resume(uninterrupted, tmp_path, capsys):
    # stopped after the last epoch's checkpoint and before its evaluation: resuming evaluates it
    state = last_state(uninterrupted)
    expected = state["history"][-1]["held_out_top1"]
    for key in ("held_out_top1", "held_out_top5", "held_out_loss", "n_held_out", "eval_s"):
        del state["history"][-1][key]
    torch.save(state, tmp_path / "checkpoint-last.pth")
    assert main(["finetune", "--resume", str(tmp_path / "checkpoint-last.pth"), "--output_dir", str(tmp_path)]) == 0
    assert "epoch 2/2" in capsys.readouterr().out
    assert json.loads((tmp_path / "summary.json").read_text())["held_out_top1"] == expected


def test_resume_keeps_the_options_refuses_changes_and_auto_continues(pretrained, uninterrupted, tmp_path, capsys):
    ckpt = str(uninterrupted / "checkpoint-last.pth")
    out = str(tmp_path / "more")
    assert main(["finetune", "--resume", ckpt, "--blr", "1e-3", "--mixup", "0", "--output_dir", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--blr 0.001 (the checkpoint's: 0.02)" in err and "--mixup 0.0" in err, err
    assert not (tmp_path / "more").exists()
    # --resume auto: a new run where there is no checkpoint, then the same command continues it
    auto = ["finetune", pretrained, *FT, "--resume", "auto", "--output_dir", out]
    assert main(auto + ["--epochs", "1"]) == 0
    assert "a new run" in capsys.readouterr().out
    assert main(auto + ["--epochs", "2"]) == 0
    said = capsys.readouterr().out
    assert "continuing from" in said and "changed: --epochs 1 -> 2" in said and "epoch 2/2" in said
    assert "epoch 1/2" not in said
    full, continued = last_state(uninterrupted), last_state(tmp_path / "more")
    assert continued["args"]["epochs"] == 2 and continued["global_step"] == 2 * STEPS_PER_EPOCH
    # its first epoch was all warmup, the same lr for 1 epoch in all as for 2: so it is the 2-epoch run
    for name, w in full["model"].items():
        torch.testing.assert_close(continued["model"][name], w, rtol=0, atol=0, msg=name)


def test_a_pretraining_checkpoint_is_not_a_run_to_resume(pretrained, tmp_path, capsys):
    assert main(["finetune", pretrained, "--resume", pretrained, "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a checkpoint-last.pth of `energyvit finetune`" in err


def test_python_api_resume_refuses_other_options_and_from_flat_builds_them(uninterrupted, tmp_path):
    from energyvit import finetune
    from energyvit.finetune import FinetuneOptions, FinetuneRunOptions

    ckpt = str(uninterrupted / "checkpoint-last.pth")
    resume = {"resume": ckpt, "output_dir": str(tmp_path)}
    with pytest.raises(ValueError, match=r"--batch_size 64 \(the checkpoint's: 100\)"):
        finetune.run(FinetuneOptions(run=FinetuneRunOptions(**resume)))
    options = FinetuneOptions.from_flat({**last_state(uninterrupted)["args"], **resume})
    assert options.train.batch_size == 100 and options.augment.cutmix == 1.0 and options.data.shift == 1
    assert FinetuneOptions().data.shift == 1 and FinetuneOptions.from_flat({}).data.shift == 1  # fine-tuning's default
    summary = finetune.run(options)  # nothing left to train: the summary of the finished run
    assert summary["held_out_top1"] == json.loads((uninterrupted / "summary.json").read_text())["held_out_top1"]
    assert "epochs" in FinetuneOptions.resumable() and "mixup" not in FinetuneOptions.resumable()


def test_bf16_autocast_runs_on_the_cpu_with_every_augmentation(pretrained, tmp_path, capsys):
    assert main(["finetune", pretrained, *FT, "--epochs", "1", "--precision", "bf16", "--output_dir", str(tmp_path)]) == 0
    assert "bf16 autocast on cpu" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["history"][0]["loss"] == pytest.approx(2.3, abs=0.1) and 0 < summary["held_out_top5"] <= 1
