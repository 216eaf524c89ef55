"""Probes of intermediate layers (SimMIM Table 6, BEiT's linear probe): ``probe.layers`` trains one MAE
probe head per layer in one feature pass and reports one accuracy per layer and the best."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import mixmim
from mixmim.cli import main
from mixmim.interop.export import save_encoder
from mixmim.transfer.linprobe import LayerFeatures

VIT = dict(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2)


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit") / "encoder"
    save_encoder(mixmim.create_encoder("vit_base", **VIT), path)
    return path.with_suffix(".safetensors")


def test_layer_features_are_the_mean_patch_token_of_each_block():
    """Block l's output tokens, class token left out, averaged; no final norm (BEiT's probe reads the
    block's output)."""
    torch.manual_seed(0)
    encoder = mixmim.create_encoder("vit_base", **VIT).eval()
    features = LayerFeatures(encoder, [1, 3], 32)
    assert features.widths == [16, 16]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = encoder._pos_embed(encoder.patch_embed(x))
        outs = []
        for blk in encoder.blocks:
            tokens = blk(tokens)
            outs.append(tokens[:, encoder.num_prefix_tokens:].mean(1))
        torch.testing.assert_close(features.pooled_features(x), torch.cat([outs[0], outs[2]], 1))


@pytest.mark.parametrize("features", ["cached", "augmented"])
def test_per_layer_probe_reports_every_layer_and_the_best(features, vit_export, class_folder, tmp_path):
    out = tmp_path / "lp"
    assert main(["linprobe", "--checkpoint", str(vit_export), "--data", str(class_folder), "--output", str(out),
                 "--no-progress", "--num-workers", "0", "--epochs", "2", "--batch-size", "4",
                 f"probe.features={features}", "probe.layers=[1,3]"]) == 0
    results = json.loads((out / "results.json").read_text())
    layers = {int(k): v for k, v in results["layers"].items()}
    assert set(layers) == {1, 3} and all(0.0 <= v <= 100.0 for v in layers.values())
    assert results["best_layer"] in (1, 3) and results["acc1"] == pytest.approx(layers[results["best_layer"]])
    with open(out / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("acc1_layer1")]
    assert rows and {"acc1_layer1", "acc1_layer3"} <= set(rows[-1])
    payload = torch.load(out / "model.pt", weights_only=True)
    assert payload["layers"] == [1, 3] and any(k.startswith("heads.1.") for k in payload["head"])


@pytest.mark.parametrize("value, message", [("[0,2]", "distinct layer numbers from 1"),
                                            ("[2,2]", "distinct layer numbers from 1"),
                                            ("[1,9]", "has 3 intermediate outputs")])
def test_bad_layers_get_one_line(value, message, vit_export, class_folder, tmp_path, capsys):
    code = main(["linprobe", "--checkpoint", str(vit_export), "--data", str(class_folder), "--output",
                 str(tmp_path / "lp"), "--no-progress", "--num-workers", "0", "--epochs", "1", f"probe.layers={value}"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "probe.layers" in err and "Traceback" not in err
