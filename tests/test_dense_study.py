"""The dense benchmark and the dense study (issue 32): canvases whose COCO instances, boxes and ADE20K
map agree with each other, and `mixmim study --profile dense_quick` end to end (box AP, mask AP, mIoU,
the report and its pictures)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pycocotools")

from mixmim.cli import main as cli  # noqa: E402
from mixmim.data.coco import CocoDetection  # noqa: E402
from mixmim.data.segmentation import ade20k_pairs, ade20k_root, read_mask  # noqa: E402
from mixmim.study.dense_benchmark import write_dense_benchmark  # noqa: E402


def test_benchmark_instances_boxes_and_semantic_map_agree(fake_fashion_mnist, tmp_path):
    out = write_dense_benchmark(tmp_path / "bench", train=12, val=4, size=48)
    coco = CocoDetection(out / "coco/annotations/instances_train2017.json", out / "coco/train2017")
    assert len(coco) == 12 and coco.classes[0] == "t-shirt" and len(coco.classes) == 10
    pairs = ade20k_pairs(ade20k_root(out / "ade"), "training")
    assert [p[0].name for p in pairs] == [coco.image_info(i)["file_name"] for i in range(12)]
    for index in range(12):
        target = coco.target(index, 48, 48)
        semantic = np.array(Image.open(pairs[index][1]))
        assert set(np.unique(semantic)) <= set(range(11))
        covered = np.zeros((48, 48), dtype=bool)
        for box, label, mask in zip(target["boxes"], target["labels"], target["masks"].bool().numpy()):
            ys, xs = np.nonzero(mask)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert (semantic[mask] == int(label)).all()  # COCO label 1..10 = the map's class
            assert not (covered & mask).any()  # an item's mask loses what later items cover
            covered |= mask
        assert (semantic[~covered] == 0).all()
    reduced = read_mask(pairs[0][1], reduce_zero_label=True)
    assert (reduced[np.array(Image.open(pairs[0][1])) == 0] == 255).all()
    again = write_dense_benchmark(tmp_path / "again", train=12, val=4, size=48)
    assert (again / "coco/annotations/instances_val2017.json").read_text() == (
        out / "coco/annotations/instances_val2017.json").read_text()


def test_a_small_patch_vit_gives_the_pyramids_strides_4_to_32():
    from mixmim.models.dense import MixMIMBackbone
    from mixmim.models.registry import create_encoder

    vit = create_encoder("vit_tiny", img_size=64, patch_size=4, embed_dim=32, depth=6, num_heads=2)
    for multi_level in (False, True):
        backbone = MixMIMBackbone(vit, multi_level=multi_level)
        feats = backbone(torch.randn(1, 3, 64, 64))
        assert backbone.strides == [4, 8, 16, 32]
        assert [tuple(f.shape[-2:]) for f in feats.values()] == [(16, 16), (8, 8), (4, 4), (2, 2)]
        grid = torch.randn(1, 32, 16, 16)  # the stride-4 map itself: no level may be cropped into shape
        levels = backbone.pyramid([grid] * 4 if multi_level else grid)
        assert [tuple(f.shape[-2:]) for f in levels] == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_dense_quick_study_runs_end_to_end_and_reports(fake_fashion_mnist, tmp_path):
    out, report = tmp_path / "study", tmp_path / "report"
    assert cli(["study", "--profile", "dense_quick", "--output", str(out), "--report", str(report)]) == 0
    rows = json.loads((report / "results.json").read_text())["results"]
    assert sorted((r["arm"], r["metric"]) for r in rows) == sorted(
        (arm, m) for arm in ("random", "mixmim") for m in ("box_ap", "mask_ap", "miou"))
    assert all(0.0 <= r["value"] <= 1.0 for r in rows)
    text = (report / "results.md").read_text()
    assert "| arm | n | box_ap | mask_ap | miou |" in text and "knn" not in text
    assert "pretraining pays | miou | mixmim > random" in text
    for picture in ("detections_random.png", "detections_mixmim.png", "segmentation_mixmim.png"):
        assert (report / picture).is_file() and f"]({picture})" in text
    # Cached: a second run computes nothing and gives the same rows.
    assert cli(["study", "--profile", "dense_quick", "--output", str(out), "--report", str(report)]) == 0
    assert json.loads((report / "results.json").read_text())["results"] == rows
