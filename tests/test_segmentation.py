"""``mixmim segment`` to the ADE20K protocol (issue 32): the layout found from the folder, reduce_zero_label,
the training pipeline as a function of the seed, sliding windows that cover every pixel and average
overlaps, mIoU counted at the original resolution, layer decay over the segmentor's backbone, BEiT's
ViT levels, two training steps, resume after SIGTERM, one against two gloo processes, and the starting
points a user holds (a fine-tuned classifier's model.pt and run folder, random initialisation)."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_ENCODER, stop_with_sigterm, torchrun_verb
from dense_data import write_ade20k
from mixmim.data.segmentation import (
    IGNORE,
    Protocol,
    SegmentationData,
    SegmentationError,
    ade20k_pairs,
    ade20k_root,
    infer_num_classes,
    read_mask,
    rescale_size,
)
from mixmim.evaluation.sliding import slide_logits, window_corners
from mixmim.interop.export import save_encoder
from mixmim.transfer.run import load_transfer_config, run_transfer

HERE = Path(__file__).resolve().parent
SMALL = Protocol(crop=64, scale=(256, 64), ratio_range=(0.5, 2.0), cat_max_ratio=0.75, photometric=True)


@pytest.fixture(scope="module")
def ade(tmp_path_factory) -> Path:
    """ADE20K's layout (6 training images, 5 validation images: odd on purpose) and a tiny MixMIM export."""
    root = tmp_path_factory.mktemp("ade")
    write_ade20k(root, 6, 5)
    torch.manual_seed(0)
    from mixmim.models.registry import create_encoder

    save_encoder(create_encoder("mixmim_tiny", **{**TINY_ENCODER, "img_size": 64, "window_size": (8, 8, 4, 2)}),
                 root / "mixmim")
    return root


def segment_overrides(root: Path, name: str, *extra: str) -> list[str]:
    return [f"checkpoint={root / 'mixmim.safetensors'}", f"data.path={root}", f"output_dir={root}", f"name={name}",
            "segment.crop_size=64", "segment.stride=43", "segment.scale=[256,64]", "segment.channels=16",
            "segment.aux_channels=8", "train.batch_size=2", "train.max_steps=3", "train.num_workers=0",
            "train.progress=false", "train.log_every=1", "train.trackers=[csv]", "optim.warmup_steps=1",
            "eval.every_steps=0", *extra]


def _losses(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as handle:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(handle) if r.get("loss")}


# ---------------------------------------------------------------------------------------------- data
def test_ade20k_layout_reduce_zero_label_and_classes(ade):
    root = ade_root = ade20k_root(ade)
    assert root is not None and root.name == "ADEChallengeData2016" and ade20k_root(ade_root) == root
    pairs = ade20k_pairs(root, "training")
    assert len(pairs) == 6 and all(i.stem == m.stem for i, m in pairs)
    raw = np.array(Image.open(pairs[0][1]))
    reduced = read_mask(pairs[0][1], reduce_zero_label=True)
    assert set(np.unique(raw)) <= {0, 1, 2, 3}
    assert (reduced[raw == 0] == IGNORE).all() and (reduced[raw > 0] == raw[raw > 0] - 1).all()
    assert infer_num_classes(SegmentationData(pairs, SMALL, reduce_zero_label=True)) == 3
    assert infer_num_classes(SegmentationData(pairs, SMALL, reduce_zero_label=False)) == 4


def test_training_items_follow_the_protocol_and_the_seed(ade):
    data = SegmentationData(ade20k_pairs(ade20k_root(ade), "training"), SMALL, True, num_classes=3)
    a, b, c = data[(2, 7)], data[(2, 7)], data[(2, 8)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], c["image"])
    assert a["image"].shape == (3, 64, 64) and a["label"].shape == (64, 64) and a["label"].dtype == torch.int64
    # Small scales leave the crop partly empty: padded with 0 (image) and 255 (label).
    small = SegmentationData(data.pairs, Protocol(crop=64, scale=(64, 16), ratio_range=(1.0, 1.0)), True, 3)
    item = small[(0, 0)]
    assert (item["label"][-10:] == IGNORE).all() and (item["image"][:, -10:] == 0).all()
    assert rescale_size(512, 683, (2048, 512)) == (512, 683) and rescale_size(100, 1000, (2048, 512)) == (205, 2048)


def test_the_category_ratio_rule_redraws_crops_one_class_dominates():
    mask = np.zeros((64, 160), dtype=np.int64)
    mask[:, 120:] = 1  # one class everywhere but a strip at the right: a quarter of the crops pass
    data = SegmentationData([(Path("x"), Path("y"))], Protocol(crop=64, cat_max_ratio=0.75))
    rng = np.random.default_rng(0)
    lefts = [data._crop_offsets(mask, rng)[1] for _ in range(50)]
    # A crop passes only where class 1 covers more than a quarter of it; with ten redraws nearly all find one.
    assert sum(left + 64 - 120 > 16 for left in lefts) >= 40
    off = SegmentationData([(Path("x"), Path("y"))], Protocol(crop=64, cat_max_ratio=1.0))
    assert sum(off._crop_offsets(mask, rng)[1] + 64 - 120 > 16 for _ in range(50)) <= 22


# ---------------------------------------------------------------------------------------------- sliding windows
def test_window_grid_is_mmsegmentations_and_covers_every_pixel():
    assert window_corners(512, 683, 512, 341) == [(0, 0, 512, 512), (0, 171, 512, 683)]
    corners = window_corners(100, 37, 32, 21)
    covered = torch.zeros(100, 37)
    for t, le, b, r in corners:
        assert b - t == 32 and r - le == 32 or r - le == 32 and b - t <= 32
        covered[t:b, le:r] += 1
    assert covered.min() >= 1


def test_sliding_window_averages_overlaps():
    """A model whose logit is each pixel's column within its window: the slide's output at a pixel is the
    mean of that column over the windows covering it (and the image's own values pass through intact)."""
    crop, stride = 16, 10
    image = torch.randn(3, 23, 41)

    def local_column(windows):
        n = windows.shape[0]
        cols = torch.arange(crop, dtype=torch.float32).expand(n, 1, crop, crop)
        return torch.cat([windows[:, :1], cols], dim=1)

    out = slide_logits(local_column, image, 2, crop, stride, batch=3)
    assert torch.allclose(out[0], image[0])  # identity where windows overlap: averaging, not summing
    total, count = torch.zeros(23, 41), torch.zeros(23, 41)
    for t, le, b, r in window_corners(23, 41, crop, stride):
        total[t:b, le:r] += torch.arange(r - le, dtype=torch.float32)
        count[t:b, le:r] += 1
    assert torch.allclose(out[1], total / count)
    small = slide_logits(local_column, torch.randn(3, 9, 12), 2, crop, stride)  # smaller than one window
    assert small.shape == (2, 9, 12) and torch.equal(small[1][0], torch.arange(12, dtype=torch.float32))


class _Run:
    """The RunContext a task's evaluation reads, for one CPU process."""

    device, rank, world_size, is_main, micro_batch = torch.device("cpu"), 0, 1, True, 2

    def __init__(self, model, run_dir):
        self.model, self.run_dir, self.step = model, run_dir, 0

    def autocast(self):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def full_module(self):
        yield self.model


def test_miou_is_counted_at_each_images_original_resolution(ade, tmp_path, monkeypatch):
    from mixmim.transfer import segmentation as seg

    task = seg.SegmentTask(load_transfer_config("segment", None, segment_overrides(ade, "count")))
    constant = lambda x: torch.nn.functional.one_hot(torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.long),
                                                     3).permute(0, 3, 1, 2).float()  # noqa: E731
    model = torch.nn.Module()
    model.forward = constant
    seen = {}
    monkeypatch.setattr(seg, "segmentation_scores", lambda m: seen.setdefault("m", m) is not None and {
        "miou": 0.0, "pixel_acc": 0.0})
    monkeypatch.setattr(seg, "sum_over_processes", lambda m: m)
    task.evaluate(_Run(model, tmp_path), 1)
    expected = np.zeros(3, dtype=np.int64)
    for _, mask_path in task.val_set.pairs:
        mask = read_mask(mask_path, True)
        expected += np.bincount(mask[mask != IGNORE], minlength=3)
    matrix = seen["m"]
    assert matrix[:, 0].tolist() == expected.tolist() and matrix[:, 1:].sum() == 0


# ---------------------------------------------------------------------------------------------- models
def test_vit_levels_are_blocks_4_6_8_12_and_layer_decay_spares_the_heads():
    from mixmim.evaluation.layer_decay import dense_param_groups
    from mixmim.models.registry import create_encoder
    from mixmim.models.segmentation import UperNet

    vit = create_encoder("vit_tiny", img_size=64, patch_size=16, embed_dim=32, depth=12, num_heads=2)
    model = UperNet(vit, 3, channels=16, aux_channels=8)
    assert model.backbone.taps == [3, 5, 7, 11]
    feats = model.backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    groups = dense_param_groups(model, model.encoder, 0.05, 0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["backbone.encoder.blocks.11.mlp.fc1.weight"])] == pytest.approx(0.5)
    assert scale[id(named["backbone.encoder.blocks.0.mlp.fc1.weight"])] == pytest.approx(0.5**12)
    assert scale[id(named["backbone.encoder.patch_embed.proj.weight"])] == pytest.approx(0.5**13)
    outside = [n for n in named if not n.startswith("backbone.encoder.")]
    assert any(n.startswith("aux_head.") for n in outside) and any(n.startswith("backbone.pyramid.") for n in outside)
    assert all(scale[id(named[n])] == 1.0 for n in outside)


# ---------------------------------------------------------------------------------------------- the verb
def test_segment_trains_evaluates_and_writes_its_files(ade):
    summary = run_transfer(load_transfer_config("segment", None, segment_overrides(ade, "two")))
    r = json.loads((ade / "two" / "results.json").read_text())
    assert summary["step"] == 3 and r["layout"] == "ade20k" and r["reduce_zero_label"] and r["num_classes"] == 3
    assert r["val_images"] == 5 and 0.0 <= r["miou"] <= 1.0
    rows = list(csv.DictReader(open(ade / "two" / "metrics.csv", newline="")))
    assert {"loss_main", "loss_aux"} <= set(rows[0]) and all(np.isfinite(list(_losses(ade / "two").values())))
    for row in rows:  # one micro-batch per step, logged every step: the loss is main + 0.4 x auxiliary
        assert float(row["loss"]) == pytest.approx(float(row["loss_main"]) + 0.4 * float(row["loss_aux"]), rel=1e-5)


def test_segment_resumes_after_sigterm_to_the_uninterrupted_losses(ade):
    stopped = segment_overrides(ade, "stopped", "train.max_steps=12", "train.checkpoint_every=100")
    code, out, err = stop_with_sigterm("segment", stopped, ade / "stopped" / "metrics.csv")
    assert code == 0, err[-2000:]
    assert "--resume" in out
    run_transfer(load_transfer_config("segment", None, stopped), resume=True)
    run_transfer(load_transfer_config("segment", None, [o.replace("name=stopped", "name=straight") for o in stopped]))
    a, b = _losses(ade / "straight"), _losses(ade / "stopped")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-5


def test_segment_scores_the_same_on_one_and_two_gloo_processes(ade):
    frozen = ("optim.lr=1e-12", "optim.warmup_steps=0")
    run_transfer(load_transfer_config("segment", None, segment_overrides(ade, "one", *frozen)))
    done = torchrun_verb(2, "segment", segment_overrides(ade, "two_processes", *frozen, "train.distributed=ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((ade / "one" / "results.json").read_text())
    two = json.loads((ade / "two_processes" / "results.json").read_text())
    assert one["val_images"] == two["val_images"] == 5
    assert two["miou"] == pytest.approx(one["miou"], abs=1e-9) and two["pixel_acc"] == pytest.approx(
        one["pixel_acc"], abs=1e-9)


def test_segment_starts_from_a_fine_tuned_classifier_and_from_random_weights(ade, tmp_path):
    """SimMIM's ADE20K protocol starts from ImageNet fine-tuned weights: a classifier's model.pt and its
    run folder (the weights it reports); ``--model`` alone is the random floor."""
    from mixmim.interop.torch_files import load_torch_file

    classes = tmp_path / "classes"
    rng = np.random.default_rng(0)
    for k, colour in enumerate(((200, 40, 40), (40, 200, 40))):
        (classes / str(k)).mkdir(parents=True)
        for i in range(6):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(classes / str(k) / f"{i}.png")
    run_transfer(load_transfer_config("finetune", None, [
        f"checkpoint={ade / 'mixmim.safetensors'}", "data.source=folder", f"data.path={classes}",
        f"output_dir={tmp_path}", "name=ft", "train.batch_size=4", "train.epochs=1", "train.num_workers=0",
        "train.progress=false", "model.img_size=64", "finetune.mixup=0", "finetune.cutmix=0"]))
    classifier = load_torch_file(tmp_path / "ft" / "model.pt")
    assert classifier["format"].startswith("mixmim-classifier")
    for start in (tmp_path / "ft" / "model.pt", tmp_path / "ft"):
        r = run_transfer(load_transfer_config("segment", None, segment_overrides(
            ade, f"from_{start.name}", f"checkpoint={start}", "train.max_steps=1")))["results"]
        assert r["weights"] == "classifier"
    r = run_transfer(load_transfer_config("segment", None, [
        *segment_overrides(ade, "random", "train.max_steps=1")[1:], "model.name=mixmim_tiny"]))["results"]
    assert r["weights"] == "random"


def test_segment_bad_masks_stop_in_one_line(ade, tmp_path):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(ade20k_root(ade), root)
    note = sorted((root / "annotations" / "training").iterdir())[0]
    mask = np.array(Image.open(note))
    Image.fromarray(np.where(mask == 3, 7, mask).astype(np.uint8)).save(note)
    with pytest.raises(SegmentationError, match="holds label 7, above the 3 classes") as info:
        run_transfer(load_transfer_config("segment", None, segment_overrides(
            ade, "bad_label", f"data.path={root}", "segment.num_classes=3")))
    assert "\n" not in str(info.value) and note.name in str(info.value)
    Image.fromarray(mask[:-3]).save(note)
    data = SegmentationData(ade20k_pairs(root, "training"), SMALL, True, 3)
    with pytest.raises(SegmentationError, match="its image"):
        data[(0, 0)]
    (root / "annotations" / "validation").rename(root / "elsewhere")
    with pytest.raises(SegmentationError, match="annotations/validation"):
        ade20k_pairs(root, "validation")
