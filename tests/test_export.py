"""Export as safetensors + JSON (`mixmim export --format pair`), and loading through timm.create_model."""

import json

import pytest
import timm
import torch

import mixmim.interop.timm_models  # noqa: F401  (registers mixmim_* with timm)
from mixmim.cli import main
from mixmim.interop.export import load_encoder, save_encoder
from mixmim.models.registry import create_encoder

SMALL = dict(img_size=64, window_size=(8, 8, 4, 2))


@pytest.fixture
def exported(tmp_path):
    encoder = create_encoder("mixmim_tiny", **SMALL).eval()
    save_encoder(encoder, tmp_path / "tiny")
    return encoder, tmp_path / "tiny.safetensors"


def test_roundtrip_is_exact(exported):
    encoder, path = exported
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["config"]["img_size"] == [64, 64]
    again = load_encoder(path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(encoder(x), again(x))


def test_timm_create_model_loads_the_export(exported):
    encoder, path = exported
    model = timm.create_model("mixmim_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert model.img_size == (64, 64) and model.num_classes == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(encoder(x), model(x))
    # A new head and a new resolution/windows at load time.
    bigger = timm.create_model("mixmim_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                               num_classes=7, img_size=128, window_size=[16, 8, 8, 4]).eval()
    with torch.no_grad():
        assert bigger(torch.randn(1, 3, 128, 128)).shape == (1, 7)
    assert "mixmim_base" in timm.list_models("mixmim*")


def test_timm_refuses_another_architecture(exported):
    _, path = exported
    with pytest.raises(ValueError, match="another architecture"):
        timm.create_model("mixmim_base", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_export_cli_from_training_checkpoint(tmp_path, capsys):
    encoder = create_encoder("mixmim_tiny", **SMALL).eval()
    checkpoint = {"format": "mixmim-checkpoint/1", "step": 3,
                  "model": {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                  "config": {"model": {"name": "mixmim_tiny", "img_size": 64, "window_size": [8, 8, 4, 2],
                                       "drop_path_rate": 0.0, "attention_impl": "fast"}}}
    torch.save(checkpoint, tmp_path / "step.pt")
    assert main(["export", "--checkpoint", str(tmp_path / "step.pt"), "--output", str(tmp_path / "out"),
                 "--format", "pair"]) == 0
    assert "exported checkpoint encoder" in capsys.readouterr().out
    again = load_encoder(tmp_path / "out.safetensors").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(encoder(x), again(x))


def test_export_cli_bad_file_is_one_line(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["export", "--checkpoint", str(tmp_path / "junk.pt"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "junk.pt" in err
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "o")]) == 2


def test_export_cli_from_release_checkpoint_resized(tmp_path):
    from mixmim.interop.official import to_official
    from mixmim.models.attention import relative_position_index

    source = create_encoder("mixmim_tiny")  # the release layout: 224, windows 14/14/14/7
    release = to_official(source.state_dict())
    release["layers.0.blocks.0.attn.relative_position_index"] = relative_position_index(14)
    torch.save({"model": release}, tmp_path / "release.pth")
    assert main(["export", "--checkpoint", str(tmp_path / "release.pth"), "--output", str(tmp_path / "o")]) == 2
    assert main(["export", "--checkpoint", str(tmp_path / "release.pth"), "--model", "mixmim_tiny",
                 "--img-size", "64", "--window-size", "8,8,4,2", "--output", str(tmp_path / "o"), "--format",
                 "pair"]) == 0
    small = load_encoder(tmp_path / "o.safetensors")
    assert small.img_size == (64, 64) and small.window_sizes == [[8, 8], [8, 8], [4] * 6, [2, 2]]
    table = small.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == (15 * 15, 2)
    assert torch.equal(small.layers[1].blocks[0].mlp.fc1.weight, source.layers[1].blocks[0].mlp.fc1.weight)
