"""``mixmim detect`` (issue 32): COCO-format data read as COCO defines it, large-scale jitter, COCOeval
through the verb equal to pycocotools called directly (and catching planted box-format and class-id
bugs), layer decay over the detector's backbone, two training steps, resume after SIGTERM, and the same
AP on one and two gloo processes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")

from conftest import TINY_ENCODER, stop_with_sigterm, torchrun_verb  # noqa: E402
from dense_data import CATEGORIES, write_coco  # noqa: E402
from mixmim.data.coco import CocoDetection, CocoError, large_scale_jitter  # noqa: E402
from mixmim.evaluation.coco_eval import coco_evaluate, to_coco_results  # noqa: E402
from mixmim.interop.export import save_encoder  # noqa: E402
from mixmim.transfer.run import load_transfer_config, run_transfer  # noqa: E402

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """A COCO 2017 layout (6 training images, 5 validation images: odd, so two processes split it
    unevenly) and a tiny MixMIM export to start from."""
    root = tmp_path_factory.mktemp("coco")
    write_coco(root / "coco", "train", 6, seed=0)
    write_coco(root / "coco", "val", 5, seed=1)
    torch.manual_seed(0)
    from mixmim.models.registry import create_encoder

    save_encoder(create_encoder("mixmim_tiny", **{**TINY_ENCODER, "img_size": 64, "window_size": (8, 8, 4, 2)}),
                 root / "mixmim")
    return root


def detect_overrides(root: Path, name: str, *extra: str) -> list[str]:
    """A detection run of a few seconds: 64-pixel LSJ crops, narrow heads, few sampled RoIs."""
    return [f"checkpoint={root / 'mixmim.safetensors'}", f"data.path={root / 'coco'}", f"output_dir={root}",
            f"name={name}", "detect.size=64", "detect.fpn_channels=32", "detect.rois_per_image=32",
            "train.batch_size=2", "train.epochs=1", "train.num_workers=0", "train.progress=false",
            "train.log_every=1", "train.trackers=[csv]", "optim.lr=1e-4", "optim.warmup_steps=1", *extra]


def _losses(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as handle:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(handle) if r.get("loss")}


# ---------------------------------------------------------------------------------------------- data
def test_coco_targets_read_polygons_rle_and_leave_out_crowds(coco):
    ds = CocoDetection(coco / "coco/annotations/instances_train2017.json", coco / "coco/train2017")
    assert ds.classes == ["square", "disc"] and ds.label_of == {3: 1, 7: 2}
    item = ds[0]
    target = item["target"]
    raw = [a for a in ds.coco.imgToAnns[ds.ids[0]] if not a["iscrowd"]]
    assert len(target["boxes"]) == len(raw) == 2  # the crowd region is not a training instance
    for box, mask, ann in zip(target["boxes"], target["masks"], raw):
        x, y, w, h = ann["bbox"]
        assert box.tolist() == pytest.approx([x, y, x + w, y + h])
        ys, xs = torch.nonzero(mask, as_tuple=True)  # the mask lies inside its box
        assert xs.min() >= x - 1 and xs.max() <= x + w and ys.min() >= y - 1 and ys.max() <= y + h
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32


def test_large_scale_jitter_keeps_boxes_on_their_masks_and_is_a_function_of_the_seed(coco):
    ds = CocoDetection(coco / "coco/annotations/instances_train2017.json", coco / "coco/train2017", "lsj", 64)
    a, b, c = ds[(1, 5)], ds[(1, 5)], ds[(1, 6)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"]["boxes"], b["target"]["boxes"])
    assert a["image"].shape == (3, 64, 64) and not torch.equal(a["image"], c["image"])
    # Every kept instance's mask lies within its jittered box (up to a pixel of nearest-neighbour rounding).
    for seed in range(8):
        t = ds[(0, seed)]["target"]
        for box, mask in zip(t["boxes"], t["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            if len(xs):
                assert xs.min() >= box[0] - 1.5 and xs.max() <= box[2] + 0.5
                assert ys.min() >= box[1] - 1.5 and ys.max() <= box[3] + 0.5
    # The scale is drawn from the range: a factor of exactly 2 doubles a 32-pixel box to 64 then crops.
    image = torch.zeros(3, 32, 32)
    target = {"boxes": torch.tensor([[0.0, 0.0, 32.0, 32.0]]), "labels": torch.tensor([1]),
              "masks": torch.ones(1, 32, 32, dtype=torch.uint8)}
    out_image, out = large_scale_jitter(image, target, 32, (2.0, 2.0), torch.Generator().manual_seed(0))
    assert out_image.shape == (3, 32, 32) and out["boxes"].tolist() == [[0.0, 0.0, 32.0, 32.0]]


def test_multiscale_draws_the_shorter_side_from_the_protocols_sides_under_the_longer_cap(coco):
    ds = CocoDetection(coco / "coco/annotations/instances_train2017.json", coco / "coco/train2017", "multiscale",
                       max_size=90, sides=(48, 64, 80))
    seen = set()
    for seed in range(12):
        item = ds[(1, seed)]  # image 1 is 56 x 64
        h, w = item["image"].shape[-2:]
        assert max(h, w) <= 90 and (min(h, w) in (48, 64, 80) or max(h, w) >= 89)
        seen.add(min(h, w))
        boxes, masks = item["target"]["boxes"], item["target"]["masks"]
        assert masks.shape[-2:] == (h, w) and float(boxes[:, 2].max()) <= w and float(boxes[:, 3].max()) <= h
    assert len(seen) >= 2 and torch.equal(ds[(1, 3)]["image"], ds[(1, 3)]["image"])


# ---------------------------------------------------------------------------------------------- COCOeval
def _ground_truth_outputs(ds: CocoDetection) -> list[tuple[int, dict]]:
    """The validation images' ground truth as the detector's outputs (xyxy boxes, labels 1..K, mask
    probabilities at the image's size), a score per instance."""
    outputs = []
    for index in range(len(ds)):
        info = ds.image_info(index)
        t = ds.target(index, info["height"], info["width"])
        n = len(t["boxes"])
        outputs.append((int(t["image_id"]), {"boxes": t["boxes"], "labels": t["labels"],
                                             "scores": torch.linspace(0.9, 0.5, n),
                                             "masks": t["masks"][:, None].float()}))
    return outputs


def test_ground_truth_as_predictions_scores_100_and_planted_bugs_are_caught(coco, monkeypatch):
    ds = CocoDetection(coco / "coco/annotations/instances_val2017.json", coco / "coco/val2017")
    outputs = _ground_truth_outputs(ds)

    def score() -> dict:
        results = [r for image_id, out in outputs for r in to_coco_results(out, image_id, ds.category_of)]
        return coco_evaluate(ds.coco, results, ds.ids)

    right = score()
    assert right["box_AP"] == pytest.approx(100.0) and right["mask_AP"] == pytest.approx(100.0)
    # Planted: the class ids shifted by one (labels 1..K read as 0..K-1 of the file's ids).
    shifted = {label: ds.category_of.get(label + 1, CATEGORIES[0]["id"]) for label in ds.category_of}
    monkeypatch.setattr(ds, "category_of", shifted)
    assert score()["box_AP"] < 60
    monkeypatch.undo()
    # Planted: boxes left as xyxy where COCO wants xywh, and x and y swapped.
    for plant in ("xyxy", "swap"):
        results = []
        for image_id, out in outputs:
            boxes = out["boxes"]
            planted = (torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1) if plant == "xyxy" else
                       boxes[:, [1, 0, 3, 2]])  # xyxy read back as xywh, or x and y exchanged
            results += to_coco_results({**out, "boxes": planted}, image_id, ds.category_of)
        assert coco_evaluate(ds.coco, results, ds.ids)["box_AP"] < 60, plant


def test_coco_evaluate_equals_pycocotools_called_directly(coco):
    """Noisy predictions, converted by hand as COCO's results format says, scored by COCOeval directly."""
    from pycocotools.cocoeval import COCOeval

    ds = CocoDetection(coco / "coco/annotations/instances_val2017.json", coco / "coco/val2017")
    rng = np.random.default_rng(3)
    ours, direct = [], []
    for image_id, out in _ground_truth_outputs(ds):
        boxes = out["boxes"] + torch.from_numpy(rng.normal(0, 3, out["boxes"].shape)).float()
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        scores = torch.from_numpy(rng.uniform(0.1, 1.0, len(boxes))).float()
        labels = out["labels"].clone()
        labels[0] = 3 - labels[0]  # one wrong class
        noisy = {"boxes": boxes, "labels": labels, "scores": scores, "masks": out["masks"]}
        ours += to_coco_results(noisy, image_id, ds.category_of)
        for box, label, s in zip(boxes.tolist(), labels.tolist(), scores.tolist()):
            direct.append({"image_id": image_id, "category_id": {1: 3, 2: 7}[label], "score": s,
                           "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    got = coco_evaluate(ds.coco, ours, ds.ids, ("bbox",))
    evaluator = COCOeval(ds.coco, ds.coco.loadRes(direct), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert 5 < got["box_AP"] < 95
    assert got["box_AP"] == pytest.approx(100 * evaluator.stats[0], abs=1e-9)
    assert got["box_AP75"] == pytest.approx(100 * evaluator.stats[2], abs=1e-9)
    assert coco_evaluate(ds.coco, [], ds.ids)["box_AP"] == 0.0  # no detection at all: 0, not an error


# ---------------------------------------------------------------------------------------------- layer decay
@pytest.mark.parametrize("detector", ["mask_rcnn", "cascade_mask_rcnn"])
def test_layer_decay_scales_the_backbone_blocks_and_leaves_the_heads_at_one(coco, detector):
    from mixmim.transfer.detection import DetectTask

    config = load_transfer_config("detect", None, detect_overrides(coco, "groups", f"detect.detector={detector}",
                                                                   "optim.layer_decay=0.5"))
    task = DetectTask(config)
    model = task.build_model()
    groups = task.param_groups(model)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert len(scale_of) == sum(1 for p in model.parameters() if p.requires_grad)  # each parameter once
    named = dict(model.named_parameters())
    layers = 1 + sum(TINY_ENCODER["depths"])  # the patch embedding, then every block (MixMIM release ids)
    embed = [n for n in named if "patch_embed" in n]
    assert embed and all(scale_of[id(named[n])] == pytest.approx(0.5 ** layers) for n in embed)
    last_block = [n for n in named if ".layers.3.blocks.0." in n]
    assert last_block and all(scale_of[id(named[n])] == pytest.approx(0.5) for n in last_block)
    heads = [n for n in named if not n.startswith("backbone.body.encoder.")]
    assert any(n.startswith("roi_heads.") for n in heads) and any(n.startswith("rpn.") for n in heads)
    assert all(scale_of[id(named[n])] == 1.0 for n in heads)


# ---------------------------------------------------------------------------------------------- the verb
def test_detect_trains_evaluates_and_writes_its_files(coco):
    summary = run_transfer(load_transfer_config("detect", None, detect_overrides(coco, "two")))
    run = coco / "two"
    r = json.loads((run / "results.json").read_text())
    assert summary["step"] == 3 and r["val_images"] == 5 and r["classes"] == ["square", "disc"]
    assert all(np.isfinite(list(_losses(run).values())))
    for key in ("box_AP", "box_AP50", "mask_AP", "mask_AP50"):
        assert 0.0 <= r[key] <= 100.0
    predictions = json.loads((run / "predictions.json").read_text())
    assert {p["category_id"] for p in predictions} <= {3, 7} and all(len(p["bbox"]) == 4 for p in predictions)
    from mixmim.interop.torch_files import load_torch_file

    saved = load_torch_file(run / "model.pt")
    assert saved["format"] == "mixmim-detector/1" and [c["id"] for c in saved["categories"]] == [3, 7]


def test_detect_resumes_after_sigterm_to_the_uninterrupted_losses(coco):
    stopped = detect_overrides(coco, "stopped", "train.epochs=4", "train.checkpoint_every=100", "eval.every_epochs=0",
                               "detect.detector=cascade_mask_rcnn")
    code, out, err = stop_with_sigterm("detect", stopped, coco / "stopped" / "metrics.csv")
    assert code == 0, err[-2000:]
    assert "--resume" in out
    run_transfer(load_transfer_config("detect", None, stopped), resume=True)
    straight = [o.replace("name=stopped", "name=straight") for o in stopped]
    run_transfer(load_transfer_config("detect", None, straight))
    a, b = _losses(coco / "straight"), _losses(coco / "stopped")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-5


def test_detect_bad_inputs_stop_in_one_line_or_are_counted(coco, tmp_path):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(coco / "coco", root)
    notes = root / "annotations" / "instances_train2017.json"
    good = json.loads(notes.read_text())

    def with_tree(tree) -> str:
        notes.write_text(json.dumps(tree))
        with pytest.raises((CocoError, FileNotFoundError)) as info:
            CocoDetection(notes, root / "train2017")
        assert "\n" not in str(info.value) and str(notes) in str(info.value)
        return str(info.value)

    assert "not a COCO annotation file" in with_tree({"images": []})
    assert "category_id 99" in with_tree({**good, "annotations": [{**good["annotations"][0], "category_id": 99}]})
    wrong_size = {**good["annotations"][1], "segmentation": {"size": [10, 10], "counts": [100]}}
    assert "mask of size [10, 10]" in with_tree({**good, "annotations": [wrong_size]})
    h, w = good["images"][0]["height"], good["images"][0]["width"]
    short_rle = {**good["annotations"][1], "segmentation": {"size": [h, w], "counts": [0, 5]}}
    assert "run lengths add up to 5" in with_tree({**good, "annotations": [short_rle]})
    assert "'bbox' is" in with_tree({**good, "annotations": [{**good["annotations"][0], "bbox": [1, 2]}]})
    notes.write_text("not json")
    with pytest.raises(CocoError, match="not a JSON file"):
        CocoDetection(notes, root / "train2017")
    # Boxes outside the image or of zero area are dropped and counted; a missing image is skipped and listed.
    outside = [{**good["annotations"][0], "id": 900, "bbox": [500.0, 500.0, 10.0, 10.0]},
               {**good["annotations"][0], "id": 901, "bbox": [5.0, 5.0, 0.0, 4.0]}]
    notes.write_text(json.dumps({**good, "annotations": good["annotations"] + outside}))
    (root / "train2017" / good["images"][1]["file_name"]).unlink()
    ds = CocoDetection(notes, root / "train2017")
    assert ds.dropped_boxes == 2
    item = ds[1]
    assert item["index"] == 2 and len(item["skipped"]) == 1 and good["images"][1]["file_name"] in item["skipped"][0][0]
    assert len(ds[0]["target"]["boxes"]) == 2  # the two bad boxes of image 0 are not in its target


def test_detect_without_a_coco_layout_says_what_it_expects(coco, tmp_path):
    (tmp_path / "empty").mkdir()
    process = subprocess.run([sys.executable, "-m", "mixmim", "detect", *detect_overrides(
        coco, "nothing", f"data.path={tmp_path / 'empty'}")], capture_output=True, text=True)
    assert process.returncode != 0 and "Traceback" not in process.stderr
    assert "instances_train2017.json" in process.stderr and len(process.stderr.strip().splitlines()) == 1


def test_detect_scores_the_same_on_one_and_two_gloo_processes(coco):
    """Five validation images on two processes (3 + 2): every image predicted once, gathered, scored once.
    The weights stay at their seeded start (lr 1e-12) so that both runs evaluate the same detector."""

    frozen = ("optim.lr=1e-12", "optim.warmup_steps=0", "eval.batch_size=2", "train.batch_size=2")
    run_transfer(load_transfer_config("detect", None, detect_overrides(coco, "one", *frozen)))
    done = torchrun_verb(2, "detect", detect_overrides(coco, "two_processes", *frozen, "train.distributed=ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((coco / "one" / "results.json").read_text())
    two = json.loads((coco / "two_processes" / "results.json").read_text())
    assert one["val_images"] == two["val_images"] == 5
    for key in ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    a = sorted((p["image_id"], p["category_id"], round(p["score"], 4)) for p in
               json.loads((coco / "one" / "predictions.json").read_text()))
    b = sorted((p["image_id"], p["category_id"], round(p["score"], 4)) for p in
               json.loads((coco / "two_processes" / "predictions.json").read_text()))
    assert a == b and len({p[0] for p in a}) >= 1


def test_the_verbs_evaluation_of_fixed_detections_equals_pycocotools(coco, tmp_path):
    """DetectTask.evaluate on a model whose detections are fixed (the ground truth with one box shifted
    per image): the verb's AP is COCOeval's on the same detections written by hand."""
    import contextlib

    from pycocotools.cocoeval import COCOeval

    from mixmim.transfer.detection import DetectTask

    task = DetectTask(load_transfer_config("detect", None, detect_overrides(coco, "fixed")))
    fixed = {}
    for image_id, out in _ground_truth_outputs(task.val_set):
        out = {k: v.clone() for k, v in out.items()}
        out["boxes"][0] += torch.tensor([6.0, 3.0, 6.0, 3.0])
        fixed[image_id] = out
    order = iter(sorted(fixed))  # the task predicts its images in index order, which is id order here

    class Fixed(torch.nn.Module):
        def forward(self, images):
            return [fixed[next(order)] for _ in images]

    class Run:
        device, rank, world_size, is_main, micro_batch, run_dir, step = torch.device("cpu"), 0, 1, True, 2, tmp_path, 0

        def autocast(self):
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def full_module(self):
            yield Fixed()

    got = task.evaluate(Run(), 1)
    direct = [{"image_id": i, "category_id": task.val_set.category_of[int(label)], "score": float(score),
               "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
              for i, out in fixed.items() for b, label, score in zip(out["boxes"].tolist(), out["labels"],
                                                                     out["scores"])]
    evaluator = COCOeval(task.val_set.coco, task.val_set.coco.loadRes(direct), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert 20 < got["box_AP"] < 100
    assert got["box_AP"] == pytest.approx(100 * evaluator.stats[0], abs=1e-9)
