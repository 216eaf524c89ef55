"""``--sweep`` on the transfer verbs: a grid of runs in one folder, every cell cached and resumed, the
best cell reported with the split it was chosen on."""

from __future__ import annotations

import json

import pytest
import torch

import mixmim
from conftest import stop_with_sigterm
from mixmim.cli import main
from mixmim.config import ConfigError
from mixmim.interop.export import save_encoder
from mixmim.transfer.sweep import cell_name, parse_axes


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sweep") / "encoder"
    save_encoder(mixmim.create_encoder("vit_base", img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2),
                 path)
    return path.with_suffix(".safetensors")


def _argv(export, data, out, verb="finetune"):
    return [verb, "--checkpoint", str(export), "--data", str(data), "--output", str(out), "--no-progress",
            "--num-workers", "0", "--batch-size", "4", "--epochs", "1", "train.max_steps=4", "eval.every_epochs=1",
            "--sweep", "optim.lr=1e-3,3e-2", "--sweep", "optim.layer_decay=[0.65, 0.75]"]


def test_parse_axes_and_cell_names():
    axes = parse_axes(["optim.lr=1e-3,3e-3", "model.window_size=[[4, 4], [8, 8]]"])
    assert axes == [("optim.lr", ["1e-3", "3e-3"]), ("model.window_size", ["[4, 4]", "[8, 8]"])]
    assert cell_name([("optim.lr", "1e-3"), ("model.window_size", "[4, 4]")]) == "lr_1e-3__window_size_4_4"
    for bad in (["optim.lr"], ["optim.lr=1,1"], ["optim.lr=1", "optim.lr=2"]):
        with pytest.raises(ConfigError):
            parse_axes(bad)


def test_a_two_by_two_sweep_runs_caches_and_reports_the_best(vit_export, class_folder, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(_argv(vit_export, class_folder, out)) == 0
    report = json.loads((out / "sweep.json").read_text())
    assert len(report["cells"]) == 4 and {c["status"] for c in report["cells"]} == {"run"}
    assert {tuple(c["settings"].values()) for c in report["cells"]} == {
        ("1e-3", "0.65"), ("1e-3", "0.75"), ("3e-2", "0.65"), ("3e-2", "0.75")}
    for c in report["cells"]:
        results = json.loads((out / c["cell"] / "results.json").read_text())
        assert c["acc1"] == results["acc1"]
        config = (out / c["cell"] / "config.yaml").read_text()
        assert f"layer_decay: {c['settings']['optim.layer_decay']}" in config
    assert report["best"]["acc1"] == max(c["acc1"] for c in report["cells"])
    assert "held-out" in report["chosen_on"] and "(best)" in (out / "sweep.md").read_text()
    capsys.readouterr()
    assert main(_argv(vit_export, class_folder, out)) == 0  # again: nothing runs
    again = json.loads((out / "sweep.json").read_text())
    assert {c["status"] for c in again["cells"]} == {"cached"} and again["best"]["cell"] == report["best"]["cell"]
    assert "sweep 1/4" not in capsys.readouterr().out


def test_an_interrupted_sweep_goes_on_where_it_stopped(vit_export, class_folder, tmp_path):
    out = tmp_path / "sweep"
    argv = _argv(vit_export, class_folder, out)
    argv[argv.index("train.max_steps=4")] = "train.max_steps=12"
    argv[argv.index("--epochs") + 1] = "10"
    argv.append("train.log_every=1")
    code, stdout, _ = stop_with_sigterm(argv[0], argv[1:], out / "lr_1e-3__layer_decay_0.75" / "metrics.csv", rows=3)
    assert code == 0 and "run the same command again" in stdout
    assert main(argv) == 0
    report = json.loads((out / "sweep.json").read_text())
    assert [c["status"] for c in report["cells"]] == ["cached", "resumed", "run", "run"]


def test_a_cell_of_another_config_is_not_overwritten_silently(vit_export, class_folder, tmp_path):
    out = tmp_path / "sweep"
    argv = _argv(vit_export, class_folder, out, verb="linprobe")[:-4] + ["--sweep", "optim.lr=1e-3"]
    argv[argv.index("train.max_steps=4")] = "train.max_steps=2"
    assert main(argv) == 0
    changed = [a if a != "train.max_steps=2" else "train.max_steps=3" for a in argv]
    assert main(changed) == 2  # the cell's folder holds the run of another config: one line, nothing deleted
    assert (out / "lr_1e-3" / "results.json").is_file()
    assert main(changed + ["--overwrite"]) == 0
