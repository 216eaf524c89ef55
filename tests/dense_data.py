"""Small generated data in the COCO layout for the detection tests: coloured rectangles and ellipses on
noise, each an instance of its shape's class, written as polygons, RLE and one crowd region."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "disc"}]  # non-contiguous ids, as COCO's


def write_coco(root: Path, split: str, count: int, size: int = 64, seed: int = 0, crowd: bool = True) -> Path:
    """``root/annotations/instances_{split}2017.json`` and ``root/{split}2017/*.png``; returns ``root``."""
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        height, width = size, size - 8 * (i % 2)  # two sizes: resizing must map boxes back to each
        pixels = rng.integers(0, 60, (height, width, 3)).astype(np.uint8)
        canvas = Image.fromarray(pixels)
        draw = ImageDraw.Draw(canvas)
        for k in range(2):
            cat = CATEGORIES[(i + k) % 2]
            w, h = int(rng.integers(size // 5, size // 2)), int(rng.integers(size // 5, size // 2))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            colour = (220, 60, 60) if cat["id"] == 3 else (60, 200, 90)
            mask = Image.new("L", (width, height))
            shape = [x, y, x + w - 1, y + h - 1]
            (ImageDraw.Draw(mask).rectangle if cat["id"] == 3 else ImageDraw.Draw(mask).ellipse)(shape, fill=1)
            (draw.rectangle if cat["id"] == 3 else draw.ellipse)(shape, fill=colour)
            binary = np.asarray(mask, dtype=np.uint8)
            ys, xs = np.nonzero(binary)
            bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
            if k == 0:  # a polygon, as most COCO annotations
                segmentation: object = [[float(v) for p in ((x, y), (x + w, y), (x + w, y + h), (x, y + h)) for v in p]]
                if cat["id"] == 7:
                    rle = mask_util.encode(np.asfortranarray(binary))
                    segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            else:
                rle = mask_util.encode(np.asfortranarray(binary))
                segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, "category_id": cat["id"],
                                "bbox": bbox, "area": float(binary.sum()), "iscrowd": 0,
                                "segmentation": segmentation})
        if crowd and i == 0:
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, "category_id": 3,
                                "bbox": [0.0, 0.0, 4.0, 4.0], "area": 16.0, "iscrowd": 1,
                                "segmentation": {"size": [height, width],
                                                 "counts": [0, 4, height - 4, 4, height - 4, 4, height - 4, 4,
                                                            height * width - 3 * height - 4]}})
        name = f"{i:06d}.png"
        canvas.save(folder / name)
        images.append({"id": 100 + i, "file_name": name, "height": height, "width": width})
    tree = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(tree))
    return root


ADE_COLOURS = {1: (220, 60, 60), 2: (60, 200, 90), 3: (70, 90, 230)}  # 0 is ADE20K's "other"


def write_ade20k(root: Path, train: int, val: int, seed: int = 0) -> Path:
    """``root/ADEChallengeData2016/{images,annotations}/{training,validation}``: images of several sizes
    (none square) with rectangles and ellipses of classes 1-3 on "other" (0); returns the ADE folder."""
    rng = np.random.default_rng(seed)
    ade = root / "ADEChallengeData2016"
    for split, count in (("training", train), ("validation", val)):
        (ade / "images" / split).mkdir(parents=True, exist_ok=True)
        (ade / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            height, width = int(rng.integers(40, 72)), int(rng.integers(56, 100))
            canvas = Image.fromarray(rng.integers(0, 60, (height, width, 3)).astype(np.uint8))
            labels = Image.new("L", (width, height))
            for k in range(3):
                cls = 1 + (i + k) % 3
                w, h = int(rng.integers(width // 5, width // 2)), int(rng.integers(height // 5, height // 2))
                x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
                shape = [x, y, x + w - 1, y + h - 1]
                draw = ImageDraw.Draw(canvas).rectangle if cls != 2 else ImageDraw.Draw(canvas).ellipse
                draw(shape, fill=ADE_COLOURS[cls])
                (ImageDraw.Draw(labels).rectangle if cls != 2 else ImageDraw.Draw(labels).ellipse)(shape, fill=cls)
            stem = f"ADE_{split[:3]}_{i:08d}"
            canvas.save(ade / "images" / split / f"{stem}.jpg", quality=95)
            labels.save(ade / "annotations" / split / f"{stem}.png")
    return ade
