"""The dense recipes (configs/detect, configs/segment; issue 32): one per paper row, each resolving with
--print-config to its paper's values, and each header's "Run it small" command training two steps on a
generated COCO or ADE20K layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("pycocotools")

from conftest import header_command  # noqa: E402
from dense_data import write_ade20k, write_coco  # noqa: E402
from mixmim.cli import main  # noqa: E402
from mixmim.config import list_recipes, recipe_path, recipe_verb  # noqa: E402

DENSE = list_recipes(verb="detect") + list_recipes(verb="segment")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense_recipes")
    write_coco(root / "coco", "train", 4, seed=0)
    write_coco(root / "coco", "val", 3, seed=1)
    write_ade20k(root / "ade", 4, 3)
    return {"detect": root / "coco", "segment": root / "ade"}


def test_there_is_a_recipe_per_row():
    assert set(DENSE) == {
        "detect/mixmim_base_maskrcnn_55ep", "detect/mixmim_large_maskrcnn_80ep", "detect/simmim_swin_base_maskrcnn_3x",
        "detect/mixedae_vit_base_cascade_1x", "segment/mixmim_base_upernet_16k", "segment/mixmim_large_upernet_16k",
        "segment/simmim_swin_base_upernet_80k", "segment/mixedae_vit_base_upernet_160k",
        "segment/mixedae_vit_large_upernet_160k"}


@pytest.mark.parametrize("name, expected", [
    ("detect/mixmim_base_maskrcnn_55ep", {"model.name": "mixmim_base", "train.epochs": 55, "optim.layer_decay": 0.85,
                                          "detect.augment": "lsj", "detect.size": 1024, "optim.warmup_epochs": 0.25,
                                          "optim.schedule": "step", "detect.detector": "mask_rcnn"}),
    ("detect/mixmim_large_maskrcnn_80ep", {"model.name": "mixmim_large", "train.epochs": 80, "optim.layer_decay": 0.9}),
    ("detect/simmim_swin_base_maskrcnn_3x", {"model.name": "swin_base", "train.epochs": 36, "optim.lr": 6e-5,
                                             "train.batch_size": 32, "model.window_size": 7}),
    ("detect/mixedae_vit_base_cascade_1x", {"detect.detector": "cascade_mask_rcnn", "detect.augment": "multiscale",
                                            "train.epochs": 12, "optim.layer_decay": 0.75, "train.batch_size": 16}),
    ("segment/mixmim_base_upernet_16k", {"train.max_steps": 16000, "train.batch_size": 16, "optim.lr": 1e-4,
                                         "optim.layer_decay": 0.85, "segment.crop_size": 512,
                                         "segment.aux_weight": 0.4, "optim.schedule": "poly"}),
    ("segment/mixmim_large_upernet_16k", {"model.name": "mixmim_large", "optim.layer_decay": 0.9}),
    ("segment/simmim_swin_base_upernet_80k", {"train.max_steps": 80000, "train.batch_size": 32,
                                              "optim.layer_decay": 0.9, "model.window_size": 20}),
    ("segment/mixedae_vit_base_upernet_160k", {"train.max_steps": 160000, "optim.lr": 3e-4, "optim.layer_decay": 0.65,
                                               "segment.vit_levels": True}),
    ("segment/mixedae_vit_large_upernet_160k", {"model.name": "vit_large", "optim.layer_decay": 0.75}),
])
def test_recipe_resolves_to_its_papers_values(name, expected, layouts, capsys):
    verb = recipe_verb(name)
    assert main([verb, "-c", name, "--data", str(layouts[verb]), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["name"] == Path(name).name
    for key, value in expected.items():
        section, field = key.split(".")
        assert printed[section][field] == pytest.approx(value) if isinstance(value, float) else (
            printed[section][field] == value), key
    assert recipe_path(name).read_text().splitlines()[0].startswith("# ")


@pytest.mark.parametrize("name", DENSE)
def test_recipe_small_command_trains(name, layouts, tmp_path):
    words = header_command(recipe_path(name))
    assert words[:4] == ["mixmim", recipe_verb(name), "-c", name]
    argv = [str(layouts[recipe_verb(name)]) if w == "DIR" else w for w in words[1:]]
    assert main([*argv, "--output", str(tmp_path / "run"), "--no-progress"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["step"] == 2
