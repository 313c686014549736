import json

import pytest
import torch

from energyvit.cli import main
from energyvit.evaluation.finetuning import Classifier, add_drop_path, layer_id
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
    argv = ["finetune", str(tmp_path / "ckpt.pth"), "--epochs", "3", "--warmup_epochs", "1", "--batch_size", "100",
            "--output_dir", str(out)]
    assert main(argv) == 0
    assert "held-out top-1 after 3 epochs" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2]
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < losses[0] < 2.4  # it learns; ln(10) = 2.30 is the loss of a uniform guess
    assert 0.0 <= summary["held_out_top1"] <= 1.0
    state = torch.load(out / "checkpoint-finetuned.pth", weights_only=True)
    assert state["num_classes"] == 10 and "head.weight" in state["model"]
    assert len((out / "log.jsonl").read_text().splitlines()) == 3


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
