import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from energyvit.checkpoint import load_model, save_checkpoint
from energyvit.cli import main
from energyvit.export import export, timm_model_name
from energyvit.model import config_to_dict, create_model
from helpers import images, tiny_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


def timm_vit_tiny_patch16_224_keys() -> dict[str, tuple[int, ...]]:
    """The state dict of timm.create_model("vit_tiny_patch16_224", num_classes=0), written out by
    hand (global_pool="token": `norm` is a LayerNorm, `fc_norm` and `head` are Identity)."""
    d, mlp = 192, 768
    keys = {"cls_token": (1, 1, d), "pos_embed": (1, 197, d), "patch_embed.proj.weight": (d, 3, 16, 16),
            "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(12):
        keys |= {f"blocks.{i}.norm1.weight": (d,), f"blocks.{i}.norm1.bias": (d,),
                 f"blocks.{i}.attn.qkv.weight": (3 * d, d), f"blocks.{i}.attn.qkv.bias": (3 * d,),
                 f"blocks.{i}.attn.proj.weight": (d, d), f"blocks.{i}.attn.proj.bias": (d,),
                 f"blocks.{i}.norm2.weight": (d,), f"blocks.{i}.norm2.bias": (d,),
                 f"blocks.{i}.mlp.fc1.weight": (mlp, d), f"blocks.{i}.mlp.fc1.bias": (mlp,),
                 f"blocks.{i}.mlp.fc2.weight": (d, mlp), f"blocks.{i}.mlp.fc2.bias": (d,)}
    return keys


@pytest.fixture(scope="module")
def vit_tiny_export(tmp_path_factory):
    """vit_tiny_patch16 at 224 px, RGB, with the `linear` readout (so there is an energy_head to drop)."""
    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16", energy="linear").eval()
    save_checkpoint(tmp / "ckpt.pth", {"model": model.state_dict(), "model_config": config_to_dict(model.cfg)})
    export(tmp / "ckpt.pth", tmp / "encoder.safetensors")
    return model, tmp / "encoder.safetensors"


def test_encoder_export_has_exactly_timm_vit_keys_and_shapes(vit_tiny_export):
    model, path = vit_tiny_export
    tensors = load_file(str(path))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == timm_vit_tiny_patch16_224_keys()
    assert "energy_head.weight" in model.state_dict() and "restore_log_step" in model.state_dict()
    for k, v in tensors.items():
        torch.testing.assert_close(v, model.state_dict()[k], rtol=0, atol=0, msg=k)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["contents"] == "encoder" and meta["timm_model"] == "vit_tiny_patch16_224"
    assert json.loads(meta["pixel_mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(meta["timm_kwargs"])["num_classes"] == 0


def test_timm_loads_the_export_strictly_and_computes_the_same_features(vit_tiny_export):
    try:
        import timm
    except ImportError as e:  # timm imports torchvision, which this machine's torch build lacks
        pytest.skip(f"timm is not importable here ({e}); the key/shape test above checks the format")
    model, path = vit_tiny_export
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, checkpoint_path=str(path)).eval()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        expected = model.forward_features(x)
        got = vit.forward_features((x - model.pixel_mean) / model.pixel_std)  # timm does not normalize
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_full_export_round_trips_the_energy_model_and_encoder_export_the_features(tmp_path):
    model = tiny_checkpoint(tmp_path / "ckpt.pth", energy="linear").eval()
    export(tmp_path / "ckpt.pth", tmp_path / "full.safetensors", full=True)
    export(tmp_path / "ckpt.pth", tmp_path / "enc.safetensors")
    x = images(4, dtype=torch.float32)
    full, meta = load_model(tmp_path / "full.safetensors")
    assert meta["contents"] == "full" and full.cfg == model.cfg
    torch.testing.assert_close(full(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(full.step_sizes, model.step_sizes, rtol=0, atol=0)
    enc, _ = load_model(tmp_path / "enc.safetensors", need_energy=False)
    torch.testing.assert_close(enc.forward_features(x), model.forward_features(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="encoder-only export without restore_log_step, energy_head.weight"):
        load_model(tmp_path / "enc.safetensors")


def test_timm_name_only_for_timm_architectures():
    assert timm_model_name(create_model("vit_base_patch16", img_size=384).cfg) == "vit_base_patch16_384"
    assert timm_model_name(create_model("vit_nano_patch4", in_chans=1).cfg) is None


@pytest.mark.parametrize("args,needle", [
    (["/nonexistent/ckpt.pth", "--output", "{tmp}/a.safetensors"], "checkpoint /nonexistent/ckpt.pth does not exist"),
    (["{tmp}/ckpt.pth", "--output", "{tmp}/a.pt"], "must end in .safetensors"),
    (["{tmp}/garbage.safetensors", "--output", "{tmp}/a.safetensors"], "could not be read as safetensors"),
    (["{tmp}/ckpt.pth"], "the following arguments are required: --output"),
])
def test_export_errors_are_one_line(args, needle, tmp_path, capsys):
    tiny_checkpoint(tmp_path / "ckpt.pth")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    assert main(["export"] + [a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_export_cli_writes_the_file(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "ckpt.pth")
    assert main(["export", str(tmp_path / "ckpt.pth"), "--output", str(tmp_path / "enc.safetensors")]) == 0
    assert "VisionTransformer(**{'img_size': 8, 'patch_size': 2, 'in_chans': 1" in capsys.readouterr().out
    assert "restore_log_step" not in load_file(str(tmp_path / "enc.safetensors"))


def test_load_model_names_foreign_checkpoints(tmp_path):
    model = tiny_checkpoint(tmp_path / "ckpt.pth")
    save_checkpoint(tmp_path / "other.pth", {"state_dict": {}})
    with pytest.raises(ValueError, match="other.pth lacks 'model' or 'model_config'"):
        load_model(tmp_path / "other.pth")
    classifier_state = {f"encoder.{k}": v for k, v in model.state_dict().items()}  # e.g. a finetune checkpoint
    save_checkpoint(tmp_path / "ft.pth", {"model": classifier_state, "model_config": config_to_dict(model.cfg)})
    with pytest.raises(ValueError, match=r"ft.pth does not match its model config: 31 missing keys"):
        load_model(tmp_path / "ft.pth")
