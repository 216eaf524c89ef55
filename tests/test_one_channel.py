"""One-channel data end to end (issue 23): a folder of grey images pretrains with every method
(``data.channels=1``: the encoder takes one channel, SimMIM undoes the grey normalisation) and the
checkpoint fine-tunes on the same grey classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mixmim.cli import main
from mixmim.interop.checkpoint import CheckpointManager, load_checkpoint

VIT = ["model.name=vit_tiny", "model.img_size=32", "model.patch_size=8", "model.embed_dim=32",
       "model.options={depth: 2, num_heads: 2}"]
DECODER = {"mixmim": ["method.mask_cell=16"], "simmim": ["method.mask_cell=16"],
           "mae": [], "mixedae": ["method.mask_cell=16"]}
SMALL_DECODER = ["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_num_heads=2"]


@pytest.fixture(scope="module")
def grey_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("grey")
    rng = np.random.default_rng(0)
    for name, level in {"dark": 60, "light": 190}.items():
        (root / name).mkdir()
        for i in range(8):
            pixels = np.clip(level + rng.normal(0, 30, (40, 40)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("method", ["mixmim", "simmim", "mae", "mixedae"])
def test_a_grey_folder_pretrains_and_fine_tunes(method, grey_folder, tmp_path):
    decoder = SMALL_DECODER if method != "simmim" else []
    assert main(["pretrain", "--data", str(grey_folder), f"output_dir={tmp_path}", "name=grey", f"method.name={method}",
                 "data.channels=1", *VIT, *DECODER[method], *decoder, "train.batch_size=8", "train.max_steps=2",
                 "train.num_workers=0", "train.progress=false", "train.device=cpu", "optim.lr=1e-3",
                 "optim.warmup_steps=1"]) == 0
    state = load_checkpoint(CheckpointManager(tmp_path / "grey" / "checkpoints").latest())
    assert state["model"]["encoder.patch_embed.proj.weight"].shape[1] == 1  # one input channel
    out = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", str(tmp_path / "grey"), "--data", str(grey_folder), "--output", str(out),
                 "data.channels=1", "train.batch_size=4", "train.max_steps=2", "train.num_workers=0",
                 "--no-progress", "train.device=cpu", "finetune.head_init=trunc_normal"]) == 0
    assert 0.0 <= json.loads((out / "results.json").read_text())["acc1"] <= 100.0
    # reconstruct builds the method as pretraining did (one channel; SimMIM's grey statistics)
    grid = tmp_path / "grid.png"
    assert main(["reconstruct", "--checkpoint", str(tmp_path / "grey"), "--images", str(grey_folder),
                 "--max-images", "4", "--output", str(grid)]) == 0
    assert grid.stat().st_size > 1000


def test_dataset_statistics_are_measured_once_and_kept_in_the_run_config(grey_folder, tmp_path, monkeypatch):
    import yaml

    import mixmim.data.stats as stats
    from mixmim.config import load_config
    from mixmim.training.pretrain import run_pretraining

    calls = []
    real = stats.dataset_stats
    monkeypatch.setattr(stats, "dataset_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    overrides = [f"output_dir={tmp_path}", "name=g", "data.source=folder", f"data.path={grey_folder}",
                 "data.channels=1", "data.normalize=dataset", "data.stats_samples=16", *VIT, *DECODER["mae"],
                 *SMALL_DECODER, "method.name=mae", "train.batch_size=8", "train.max_steps=2", "train.num_workers=0",
                 "train.progress=false", "train.device=cpu", "optim.lr=1e-3", "optim.warmup_steps=1"]
    run_pretraining(load_config(None, overrides))
    saved = yaml.safe_load((tmp_path / "g" / "config.yaml").read_text())["data"]
    assert calls == [1] and len(saved["mean"]) == 1 and 0.2 < saved["mean"][0] < 0.8 and saved["normalize"] == "dataset"
    again = load_config(tmp_path / "g" / "config.yaml", ["train.max_steps=3"])
    run_pretraining(again, resume=True, allow_changes=True)  # a longer schedule: --resume-with-changes
    assert calls == [1]  # the resumed run takes the stored numbers
