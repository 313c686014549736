import pytest
import torch

from energyvit.model import MODEL_ARCHS, ModelOptions, create_model, model_config
from energyvit.options import OptionError
from helpers import images, tiny_model

TIMM_KEYS = {
    "patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "norm.weight", "norm.bias",
    "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight",
    "blocks.0.norm2.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "blocks.1.mlp.fc2.bias",
}


@pytest.mark.parametrize("energy", ["norm", "linear", "cls"])
def test_energy_is_one_scalar_per_image(energy):
    model = tiny_model(energy=energy)
    e = model(images(batch=4))
    assert e.shape == (4,) and torch.isfinite(e).all()
    # images are independent: the energy of one does not depend on the rest of the batch
    assert torch.allclose(model(images(batch=4)[1:2]), e[1:2])


def test_timm_key_names():
    keys = set(tiny_model().state_dict())
    assert TIMM_KEYS <= keys
    extra = keys - TIMM_KEYS - {k for k in keys if k.startswith("blocks.")}
    assert extra == {"restore_log_step"}
    assert "energy_head.weight" in tiny_model(energy="linear").state_dict()
    norms = [m for m in tiny_model().modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)


def test_an_energy_head_stays_out_of_the_encoder_features_and_export():
    """Blocks only the energy reads: the features (what probe, finetune and export take) are the
    encoder's alone, and the energy does change with the head's weights."""
    from energyvit.export import export_tensors

    model = tiny_model(energy_head_depth=2, energy_head_dim=16)
    plain = tiny_model()
    assert set(export_tensors(model)) == set(export_tensors(plain))  # timm keys only
    head = {k for k in model.state_dict() if k not in plain.state_dict()}
    assert head and all(k.startswith(("energy_embed.", "energy_pos_embed", "energy_blocks.")) for k in head)
    assert {id(p) for p in model.energy_parameters()} >= {id(p) for n, p in model.named_parameters() if n in head}
    assert model.unused_parameters() == []  # the head reads the final norm
    x = images(batch=3)
    features, energy = model.forward_features(x), model(x)
    with torch.no_grad():
        model.energy_blocks[0].mlp.fc2.weight.add_(0.5)
    assert torch.equal(model.forward_features(x), features) and not torch.allclose(model(x), energy)
    with pytest.raises(ValueError, match="with an energy head use norm or cls"):
        tiny_model(energy="linear", energy_head_depth=1)


@pytest.mark.parametrize("energy", ["norm", "linear", "cls"])
def test_energy_gradcheck_and_gradgradcheck(energy):
    model = tiny_model(energy=energy)
    x = images(batch=2).requires_grad_(True)
    f = lambda inp: model(inp)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(f, (x,), eps=1e-6, atol=1e-5)


def test_named_configs_build_and_run_small():
    for name in MODEL_ARCHS:
        cfg = model_config(name)
        assert cfg.img_size % cfg.patch_size == 0
    model = create_model("vit_tiny_patch16", img_size=32, depth=1)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2,)


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 1, 8, 8\), got \(2, 3, 8, 8\)"):
        model(images(batch=2, chans=3))
    with pytest.raises(ValueError, match="expected images of shape"):
        model(torch.rand(8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown model 'vit_huge'"):
        create_model("vit_huge")
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        create_model("vit_pico_patch2", img_size=9)
    with pytest.raises(ValueError, match="unknown energy readout"):
        create_model("vit_pico_patch2", energy="max")
    with pytest.raises(ValueError, match="restore_steps must be in 1..8"):
        create_model("vit_pico_patch2", restore_steps=9)


def test_fused_backend_without_triton_says_what_to_install(monkeypatch):
    import sys

    from energyvit.attention import attention

    for name in [m for m in sys.modules if m.startswith("energyvit.kernels")]:
        monkeypatch.delitem(sys.modules, name)  # forget an earlier import, submodules included
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail as if not installed
    q = torch.rand(1, 1, 4, 8)
    with pytest.raises(ImportError, match=r"needs triton: pip install 'energyvit\[triton\]'"):
        attention(q, q, q, backend="fused")


def test_default_energy_head_is_two_blocks_of_half_the_encoders_width():
    cfg = ModelOptions().config(in_chans=1)
    assert (cfg.energy_head_depth, cfg.energy_head_dim) == (2, MODEL_ARCHS["vit_nano_patch4"]["embed_dim"] // 2)
    assert ModelOptions(model="vit_base_patch16").config(3).energy_head_dim == 384
    assert ModelOptions(energy_head_dim=48).config(3).energy_head_dim == 48
    assert ModelOptions(energy_head_depth=0).config(3).energy_head_dim == 0  # no head: no width stored
    with pytest.raises(OptionError, match="linear needs --energy_head_depth 0"):
        ModelOptions(energy="linear")
    assert ModelOptions(energy="linear", energy_head_depth=0).config(1).energy == "linear"
