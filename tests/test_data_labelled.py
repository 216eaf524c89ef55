"""Labelled data sets seeded like pretraining's: (index, seed) -> the same augmented item in any process;
bad images skipped and listed, broken class folders and mismatched splits refused in one line; the
monitor's evaluation images decoded once (cached) and served bit-identical."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mixmim.data.labelled import cached, collate_labelled, eval_transform, load_splits, train_transform
from test_shards import CLASSES, labelled_folder


def test_items_are_a_pure_function_of_index_and_seed_under_timm_augmentation(tmp_path):
    labelled_folder(tmp_path / "data", bad=False)
    tf = train_transform(32)  # RandAugment, RandomResizedCropAndInterpolation, RandomErasing
    ds = load_splits(tmp_path / "data", tf, None, seed=1).train
    random.seed(9)
    np.random.seed(9)
    torch.random.default_generator.manual_seed(9)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    a, c = ds[(2, 77)], ds[(2, 78)]
    assert states[0] == random.getstate() and np.array_equal(states[1], np.random.get_state()[1])
    assert torch.equal(states[2], torch.get_rng_state())
    random.seed(1)  # another worker process: other global states
    np.random.seed(1)
    torch.random.default_generator.manual_seed(1)
    b = ds[(2, 77)]
    assert set(a) == {"image", "label", "index", "skipped"} and a["image"].shape == (3, 32, 32)
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], c["image"])
    image, label = ds[2]  # a plain index: the (image, label) pair, seed = index
    assert torch.equal(image, ds[(2, 2)]["image"]) and label == a["label"] == ds.targets[2]


def test_unreadable_images_are_skipped_and_listed(tmp_path):
    bad = labelled_folder(tmp_path / "data")
    splits = load_splits(tmp_path / "data", eval_transform(32), eval_transform(32), seed=0)
    items = [splits.train[(i, 0)] for i in range(len(splits.train))] + \
        [splits.test[(i, 0)] for i in range(len(splits.test))]
    listed = {name.rsplit("/", 1)[-1]: reason for item in items for name, reason in item["skipped"]}
    assert set(listed) == set(bad)
    for name, fragment in bad.items():
        assert fragment in listed[name]
    assert {n.rsplit("/", 1)[-1] for n in splits.train.skipped | splits.test.skipped} == set(bad)


def test_a_class_without_a_readable_image_and_mismatched_splits_are_one_line_errors(tmp_path):
    labelled_folder(tmp_path / "data", bad=False)
    for f in (tmp_path / "data" / "dog").iterdir():
        f.write_bytes(b"broken")
    with pytest.raises(ValueError, match="class 'dog' .* has no readable image"):
        load_splits(tmp_path / "data", None, None)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir()
    from test_shards import picture

    picture(0).save(tmp_path / "empty" / "a" / "x.png")
    with pytest.raises(ValueError, match=r"class folder .*empty/b holds no images"):
        load_splits(tmp_path / "empty", None, None)
    for split, names in (("train", CLASSES), ("val", CLASSES[:2])):
        for name in names:
            (tmp_path / "split" / split / name).mkdir(parents=True)
            picture(len(name)).save(tmp_path / "split" / split / name / "0.png")
    with pytest.raises(ValueError, match="has classes"):
        load_splits(tmp_path / "split", None, None)


def test_cached_evaluation_set_is_bit_identical_and_kept_as_bytes(tmp_path):
    labelled_folder(tmp_path / "data", bad=False)
    splits = load_splits(tmp_path / "data", eval_transform(32), eval_transform(32), seed=0)
    cache = cached(splits.train, num_workers=1, batch_size=4)
    assert cache.images.dtype == torch.uint8 and len(cache) == len(splits.train)
    assert cache.classes == list(CLASSES) and cache.targets == splits.train.targets
    for i in range(len(cache)):
        image, label = cache[i]
        assert torch.equal(image, splits.train[i][0]) and label == splits.train[i][1]
        assert torch.equal(cache[(i, 123)]["image"], image)




def test_one_collate_for_class_ids_soft_targets_and_masks():
    items = [{"image": torch.zeros(3, 4, 4), "label": k, "index": k, "skipped": [(f"f{k}", "bad")] if k else []}
             for k in range(3)]
    batch = collate_labelled(items)
    assert batch["label"].dtype == torch.long and batch["label"].tolist() == [0, 1, 2]
    assert batch["index"].tolist() == [0, 1, 2] and batch["skipped"] == [("f1", "bad"), ("f2", "bad")]
    masks = [{**it, "label": torch.full((4, 4), it["index"])} for it in items]
    assert collate_labelled(masks)["label"].shape == (3, 4, 4)
