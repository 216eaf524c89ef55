"""Exports in the Hub/timm folder layout (config.json + model.safetensors + README.md): timm's
``local-dir:`` loader rebuilds every family with the same features, this project's verbs read the
folder back, a folder timm itself wrote reads too, and the model card reports the run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import mixmim
from conftest import TINY_ENCODERS
from mixmim.cli import main
from mixmim.interop.checkpoint import CheckpointManager
from mixmim.interop.export import load_encoder
from mixmim.interop.hub import save_hub_folder, timm_architecture
from mixmim.interop.pretrained import build_encoder
from mixmim.interop.weights import open_weights
from mixmim.models.registry import create_encoder

# The timm architecture each tiny encoder is exported as (a depth timm's BiT names lack: the generic one).
ARCHITECTURES = {"mixmim_tiny": "mixmim_tiny", "vit_tiny": "vit_tiny_patch16_224",
                 "swin_tiny": "swin_tiny_patch4_window7_224", "swinv2_tiny": "swinv2_tiny_window8_256",
                 "pvt_v2_b2": "pvt_v2_b2", "twins_svt_small": "twins_svt_small",
                 "resnetv2_50": "mixmim_resnetv2_bit"}
SMALL = dict(img_size=64, window_size=(8, 8, 4, 2))


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(TINY_ENCODERS))
def test_timm_local_dir_and_read_pretrained_give_the_source_features(name, tmp_path):
    torch.manual_seed(0)
    encoder = create_encoder(name, **TINY_ENCODERS[name]).eval()
    folder = save_hub_folder(encoder, tmp_path / "export", card={"model": name, "method": "mixmim"})
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == ARCHITECTURES[name] and config["num_classes"] == 0
    assert config["pretrained_cfg"]["input_size"] == [3, 128, 128]

    x = torch.randn(2, 3, 128, 128)
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    pretrained = open_weights(folder)
    assert pretrained.family == encoder.family and pretrained.source == "export"
    again = build_encoder(pretrained).eval()
    with torch.no_grad():
        want = encoder(x)
        _same(loaded(x), want)
        _same(again(x), want)
        _same(load_encoder(folder).eval()(x), want)


def test_named_bit_resnet_is_exported_under_timms_name():
    """ResNet-v2 at a depth and width timm names (50x1) takes that name; model_args then must not repeat
    what the entry point fixes (timm refuses a second 'layers')."""
    with torch.device("meta"):
        encoder = create_encoder("resnetv2_50")
    architecture, args = timm_architecture(encoder)
    assert architecture == "resnetv2_50x1_bit" and "layers" not in args and "width_factor" not in args
    with torch.device("meta"):
        assert timm.create_model(architecture, num_classes=0, **args).num_features == encoder.num_features


@pytest.mark.parametrize("arch,kwargs", [
    ("vit_tiny_patch16_224", dict(img_size=64, embed_dim=32, depth=2, num_heads=2)),
    ("resnetv2_101x1_bit", dict(channels=(128, 256, 512, 1024), stem_chs=32)),  # depth only in the name
])
def test_a_folder_timm_wrote_reads_into_this_project(arch, kwargs, tmp_path):
    """timm's own exporter (save_for_hf) writes no "mixmim" block: the family and arguments come from
    architecture + model_args (+ the depth in a BiT name), and the features are timm's."""
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    source = timm.create_model(arch, num_classes=0, **kwargs).eval()
    save_for_hf(source, str(tmp_path / "timm"), safe_serialization=True)
    pretrained = open_weights(tmp_path / "timm")
    ours = build_encoder(pretrained).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _same(ours(x), source(x))


def _fake_run(root, encoder, step=30, batch=16):
    """A run folder as the pretraining loop leaves it: a checkpoint, metrics.csv with monitor columns,
    config.yaml."""
    run = root / "run"
    config = {"name": "run", "method": {"name": "simmim"},
              "model": {"name": "mixmim_tiny", "img_size": 64, "window_size": [8, 8, 4, 2]},
              "data": {"source": "fashion_mnist", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]},
              "train": {"batch_size": batch, "monitor": {"data": "fashion_mnist"}}}
    CheckpointManager(run / "checkpoints").save(
        {"model": {f"encoder.{k}": v for k, v in encoder.state_dict().items()}, "config": config, "step": step,
         "method": "simmim", "model_name": "mixmim_tiny"}, step)
    (run / "metrics.csv").write_text("step,epoch,loss,lr,img_per_s,knn,linprobe\n"
                                     "0,0.0,,,,12.5,\n10,1.0,0.9,1e-3,50.0,30.0,40.0\n"
                                     "20,2.0,0.8,1e-3,50.0,41.25,\n30,3.0,0.7,1e-3,50.0,,\n")
    (run / "config.yaml").write_text("name: run\n")
    return run


def test_export_cli_writes_the_hub_folder_and_a_card_of_the_run(tmp_path, capsys):
    torch.manual_seed(0)
    encoder = create_encoder("mixmim_tiny", **SMALL).eval()
    run = _fake_run(tmp_path, encoder)
    out = tmp_path / "mixmim_fm"
    assert main(["export", "--checkpoint", str(run), "--output", str(out)]) == 0  # --format hub is the default
    assert "local-dir:" in capsys.readouterr().out

    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: timm" in card and "- simmim" in card
    for fact in ("SimMIM", "mixmim_tiny", "64 x 64", "fashion_mnist", "30, 480 images seen (batch 16)",
                 "k-NN top-1 (%): 41.25 at step 20", "linear probe top-1 (%): 40.00 at step 10",
                 f"mixmim pretrain -c {run / 'config.yaml'}", f"mixmim export --checkpoint {run} --output {out}",
                 "local-dir:mixmim_fm", "import mixmim", "SimMIM: a Simple Framework for Masked Image Modeling"):
        assert fact in card, fact
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["mean"] == [0.5, 0.4, 0.3] and config["pretrained_cfg"]["std"] == [0.2, 0.25, 0.3]
    assert config["mixmim"]["card"]["step"] == 30

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _same(timm.create_model(f"local-dir:{out}", pretrained=True).eval()(x), encoder(x))


def test_reexport_resizes_keeps_the_card_and_replaces_the_folder(tmp_path):
    torch.manual_seed(0)
    encoder = create_encoder("mixmim_tiny", **SMALL).eval()
    first = save_hub_folder(encoder, tmp_path / "a", card={"model": "mixmim_tiny", "method": "mae", "step": 7})
    assert main(["export", "--checkpoint", str(first), "--output", str(tmp_path / "b"), "--img-size", "128",
                 "--window-size", "16,8,8,4"]) == 0
    config = open_weights(tmp_path / "b").config
    assert config["img_size"] == [128, 128] and config["window_size"] == [16, 8, 8, 4]
    card = (tmp_path / "b" / "README.md").read_text()
    assert "MAE" in card and "Pretraining steps:** 7" in card and "Resized" in card
    # Writing over an export needs overwrite=True, replaces its three files, keeps what the user added
    # and leaves nothing beside it.
    (first / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds an export; pass --overwrite"):
        save_hub_folder(create_encoder("mixmim_tiny", **SMALL), first, card={"model": "mixmim_tiny"})
    save_hub_folder(create_encoder("mixmim_tiny", **SMALL), first, card={"model": "mixmim_tiny"}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert (first / "notes.txt").read_text() == "mine"
    (first / "notes.txt").unlink()
    umask = os.umask(0)
    os.umask(umask)
    assert first.stat().st_mode & 0o777 == 0o777 & ~umask  # as readable as any folder the user makes
    assert {p.stat().st_mode & 0o777 for p in first.iterdir()} == {0o666 & ~umask}
    assert "mae" not in json.dumps(json.loads((first / "config.json").read_text())["mixmim"]["card"])


def test_hub_folder_feeds_the_transfer_verbs(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "classes"
    for name, colour in {"red": (200, 30, 30), "blue": (30, 30, 200)}.items():
        (data / name).mkdir(parents=True)
        for i in range(4):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(data / name / f"{i}.png")
    folder = save_hub_folder(create_encoder("mixmim_tiny", **SMALL), tmp_path / "enc", card={"model": "mixmim_tiny"})
    assert main(["knn", "--checkpoint", str(folder), "--data", str(data), "--num-workers", "0", "--no-progress",
                 "--val-fraction", "0.5", "--batch-size", "4", "--output", str(tmp_path / "knn")]) == 0
    assert 0.0 <= json.loads((tmp_path / "knn" / "results.json").read_text())["acc1"] <= 100.0


def test_bad_folders_are_one_line(tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an export folder"):
        save_hub_folder(create_encoder("mixmim_tiny", **SMALL), tmp_path / "busy")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"architecture": "convnext_tiny", "model_args": {}}))
    (foreign / "model.safetensors").write_bytes(b"")
    assert main(["export", "--checkpoint", str(foreign), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "convnext_tiny" in err and "config.json" in err


def test_mixmim_architectures_need_only_import_mixmim(tmp_path):
    """A fresh interpreter: ``import mixmim`` (no mixmim.interop import) is enough for local-dir: to
    know mixmim_* and the generic BiT entry."""
    import subprocess
    import sys

    for name in ("mixmim_tiny", "resnetv2_50"):
        save_hub_folder(create_encoder(name, **TINY_ENCODERS[name]), tmp_path / name, card={"model": name})
    code = ("import mixmim, timm\n"
            f"for n in ('mixmim_tiny', 'resnetv2_50'):\n"
            f"    timm.create_model('local-dir:{tmp_path}/' + n, pretrained=True)\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    assert mixmim.__version__
