"""A resumed run is the same run (its checkpoint's options; only resumable flags may change;
--resume auto), and --config recipes (YAML flags, the command line wins, one-line errors)."""
import json
from pathlib import Path

import pytest
import torch

from energyvit import pretrain
from energyvit.cli import build_parser, main, parse
from energyvit.commands.args import config_argv
from energyvit.pretrain import PretrainOptions, RunOptions, TrainOptions

ROOT = Path(__file__).resolve().parents[1]
PICO = ["pretrain", "--model", "vit_pico_patch2", "--batch_size", "100", "--num_threads", "1", "--no-tensorboard",
        "--grid_rows", "0", "--probe_images", "200"]


def args_of(path: Path) -> dict:
    return torch.load(path, weights_only=True)["args"]


def test_resume_takes_the_checkpoints_options_and_refuses_changes(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    assert main(PICO + ["--blr", "1e-2", "--mask_ratio", "0.5", "--epochs", "1", "--output_dir", str(out)]) == 0
    ckpt = str(out / "checkpoint-last.pth")
    capsys.readouterr()
    # the case: resumed without repeating --blr and --mask_ratio, it must keep them
    assert main(PICO + ["--resume", ckpt, "--epochs", "2", "--output_dir", str(out)]) == 0
    said = capsys.readouterr().out
    assert "changed: --epochs 1 -> 2" in said and "lr 3.91e-03" in said  # 1e-2 x 100 / 256
    saved = args_of(out / "checkpoint-last.pth")
    assert (saved["blr"], saved["mask_ratio"], saved["epochs"]) == (0.01, 0.5, 2)
    # a flag given with the checkpoint's own value is fine; another value is refused in one line
    assert main(PICO + ["--resume", ckpt, "--epochs", "2", "--blr", "0.01", "--output_dir", str(out)]) == 0
    capsys.readouterr()
    assert main(PICO + ["--resume", ckpt, "--epochs", "3", "--blr", "4e-3", "--mask_ratio", "0.75",
                        "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--blr 0.004 (the checkpoint's: 0.01)" in err[0]
    assert "--mask_ratio 0.75 (the checkpoint's: 0.5)" in err[0]
    assert args_of(out / "checkpoint-last.pth")["epochs"] == 2  # nothing ran


def test_resume_auto_starts_new_and_continues(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    auto = PICO + ["--resume", "auto", "--output_dir", str(out)]
    assert main(auto + ["--epochs", "1", "--seed", "3"]) == 0
    assert "--resume auto: no checkpoint-last.pth in" in capsys.readouterr().out
    assert main(auto + ["--epochs", "2"]) == 0  # a requeued job: same command, more epochs
    said = capsys.readouterr().out
    assert f"continuing from {out / 'checkpoint-last.pth'}" in said and "epoch 2/2" in said and "epoch 1/2" not in said
    saved = args_of(out / "checkpoint-last.pth")
    assert saved["seed"] == 3 and saved["resume"] == str(out / "checkpoint-last.pth")


def test_python_api_resume_refuses_other_options_and_from_flat_builds_them(tmp_path, one_thread):
    out = tmp_path / "run"
    assert main(PICO + ["--epochs", "1", "--warmup_epochs", "1", "--output_dir", str(out)]) == 0
    saved = args_of(out / "checkpoint-last.pth")
    resume = {"resume": str(out / "checkpoint-last.pth"), "output_dir": str(out)}
    wrong = PretrainOptions(train=TrainOptions(epochs=2), run=RunOptions(**resume))
    with pytest.raises(ValueError, match=r"--batch_size 64 \(the checkpoint's: 100\)"):
        pretrain.run(wrong)
    options = PretrainOptions.from_flat({**saved, **resume, "epochs": 2})
    assert options.train.batch_size == 100 and options.model.model == "vit_pico_patch2"
    assert pretrain.run(options)["epochs"] == 2
    assert "epochs" in PretrainOptions.resumable() and "blr" not in PretrainOptions.resumable()


# ---------------------------------------------------------------------------------------------- --config
def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_config_sets_flags_and_the_command_line_wins(tmp_path):
    cfg = write(tmp_path / "r.yaml", "batch_size: 32\nblr: 1.0e-2\nlr: null\ntensorboard: false\ntasks: mim:0.5,sr:0.5\n"
                                     "restore-steps: 2\nfused: false\n")
    args = parse(["pretrain", "--config", cfg, "--batch_size", "16"])
    assert (args.batch_size, args.blr, args.lr, args.tensorboard, args.tasks, args.restore_steps) == (
        16, 0.01, None, False, "mim:0.5,sr:0.5", 2)
    # what the file or the command line set counts as given (a resumed run checks those); null and false
    # switches set nothing
    assert {"batch_size", "blr", "tensorboard", "tasks", "restore_steps"} <= args.given
    assert not {"lr", "fused", "epochs"} & args.given


@pytest.mark.parametrize("text,needle", [
    ("bacth_size: 3\n", "unknown key 'bacth_size': not a flag of energyvit pretrain"),
    ("method: dino\n", "method: must be one of energy, mae, got 'dino'"),
    ("tensorboard: 3\n", "tensorboard: must be true or false, got 3"),
    ("batch_size: [1, 2]\n", "batch_size: must be a single number or string"),
    ("batch_size: ten\n", "batch_size: invalid int value: 'ten'"),
    ("blr: 1e-3\nblr 2\n", "not valid YAML at line 3"),
    ("- batch_size\n", "must hold a mapping of flag names to values, not a list"),
    ("config: other.yaml\n", "unknown key 'config'"),
    ("!!python/object/apply:os.system ['true']\n", "not valid YAML"),
])
def test_bad_config_files_are_one_line(tmp_path, capsys, text, needle):
    cfg = write(tmp_path / "bad.yaml", text)
    assert main(["pretrain", "--config", cfg, "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--config {cfg}" in err and needle in err, err
    assert not (tmp_path / "o").exists()


def test_missing_config_file_is_one_line(tmp_path, capsys):
    assert main(["pretrain", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "cannot read it" in capsys.readouterr().err


def recipes() -> list[Path]:
    return sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", recipes(), ids=lambda p: p.stem)
def test_every_recipe_key_is_a_flag_of_its_command(recipe):
    command = recipe.stem.rsplit("_", 1)[-1]
    command = {"linprobe": "probe"}.get(command, command)
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    assert config_argv(str(recipe), sub)  # raises on any key that is no flag, or a value it refuses
    positional = [] if command == "pretrain" else ["ckpt.pth"]
    parse([command, *positional, "--config", str(recipe)])


def test_recipes_cover_pretraining_finetuning_and_the_linear_probe():
    assert {p.stem for p in recipes()} >= {"imagenet1k_vitb16_pretrain", "imagenet1k_vitb16_mae_pretrain",
                                           "shapes_pretrain", "imagenet1k_vitb16_finetune", "shapes_finetune",
                                           "imagenet1k_vitb16_linprobe", "shapes_linprobe"}


def test_the_small_recipes_run(tmp_path, one_thread):
    data = tmp_path / "shapes"
    assert main(["shapes", str(data), "--train_per_class", "12", "--val_per_class", "3"]) == 0
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(ROOT / "recipes" / "shapes_pretrain.yaml"), "--data_path", str(data),
                 "--epochs", "1", "--batch_size", "20", "--num_threads", "1", "--no-tensorboard", "--grid_rows", "0",
                 "--output_dir", str(out)]) == 0
    saved = args_of(out / "checkpoint-last.pth")
    assert saved["model"] == "vit_nano_patch4" and saved["blr"] == 4e-3 and saved["batch_size"] == 20
    # then the fine-tuning recipe on that checkpoint
    assert main(["finetune", str(out / "checkpoint-last.pth"), "--config", str(ROOT / "recipes" / "shapes_finetune.yaml"),
                 "--data_path", str(data), "--epochs", "1", "--batch_size", "20", "--num_threads", "1",
                 "--no-tensorboard"]) == 0
    saved = args_of(out / "finetune" / "checkpoint-last.pth")
    assert saved["aa"] == "none" and saved["layer_decay"] == 0.75 and saved["batch_size"] == 20
    # and MAE's linear-probe protocol on it
    result = tmp_path / "probe.json"
    assert main(["probe", str(out / "checkpoint-last.pth"), "--config", str(ROOT / "recipes" / "shapes_linprobe.yaml"),
                 "--data_path", str(data), "--epochs", "1", "--batch_size", "20", "--num_threads", "1",
                 "--output", str(result)]) == 0
    probe = json.loads(result.read_text())
    assert probe["protocol"] == "mae" and probe["pool"] == "mean" and 0 <= probe["linear_probe_acc"] <= 1
