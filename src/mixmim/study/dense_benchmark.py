"""A dense benchmark made of real images at a scale a CPU runs (issue 32): Fashion-MNIST items pasted at
random sizes and positions on dark canvases, written both as COCO (instances with boxes and masks from
the items' own pixels, one category per Fashion-MNIST class) and as ADE20K (a semantic map with 0 =
background, which ``reduce_zero_label`` leaves out as ADE20K's "other", and 1-10 the classes).

It keeps what the dense protocols measure (localising objects, drawing their outlines, labelling
pixels) and drops what makes COCO and ADE20K hard (clutter, scale range, 80 and 150 classes, real
scenes): numbers on it say whether an encoder's pretraining carries to dense tasks on the same engine,
not what COCO AP or ADE20K mIoU the encoder would reach.

    python -m mixmim.study.dense_benchmark --out data/dense_fmnist   # train 2000 / val 300 canvases

Training canvases take items from Fashion-MNIST's training split, validation canvases from its test
split; everything is a function of ``seed``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from mixmim.data.fashion_mnist import read_fashion_mnist

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
THRESHOLD = 40  # an item's pixel belongs to its mask above this grey level (the background is 0)


def _canvas(items: np.ndarray, labels: np.ndarray, rng: np.random.Generator, size: int, sides: tuple[int, int]):
    """One canvas: (RGB image, [(class 0-9, mask)], semantic map 0-10). Later items cover earlier ones."""
    image = rng.integers(0, 24, (size, size, 3)).astype(np.uint8)  # dark noise, not a flat black
    semantic = np.zeros((size, size), dtype=np.uint8)
    owner = np.full((size, size), -1, dtype=np.int64)
    tint = rng.uniform(0.6, 1.0, (len(items), 3))
    placed = []
    for k, (item, label) in enumerate(zip(items, labels)):
        side = int(rng.integers(sides[0], sides[1] + 1))
        grey = np.asarray(Image.fromarray(item).resize((side, side), Image.Resampling.BILINEAR))
        y, x = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
        mask = grey > THRESHOLD
        region = image[y:y + side, x:x + side]
        region[mask] = (grey[mask, None] * tint[k]).astype(np.uint8)
        semantic[y:y + side, x:x + side][mask] = int(label) + 1
        owner[y:y + side, x:x + side][mask] = k
        placed.append(int(label))
    instances = [(label, owner == k) for k, label in enumerate(placed)]
    return image, [(label, m) for label, m in instances if m.sum() >= 16], semantic


def write_dense_benchmark(out: str | Path, train: int = 2000, val: int = 300, size: int = 64,
                          sides: tuple[int, int] | None = None, per_image: tuple[int, int] = (1, 3), seed: int = 0,
                          fashion_mnist: str | Path | None = None) -> Path:
    """``out/coco`` (COCO 2017 layout) and ``out/ade`` (ADE20K layout) of the same canvases; returns
    ``out``. Items are ``sides`` pixels square (default a quarter to 9/16 of the canvas: 16-36 px on 64). A
    finished benchmark (``out/benchmark.json`` of the same arguments) is left as it is."""
    from pycocotools import mask as mask_util

    out = Path(out)
    sides = sides or (size // 4, size * 9 // 16)
    spec = {"train": train, "val": val, "size": size, "sides": list(sides), "per_image": list(per_image),
            "seed": seed, "format": 1}
    marker = out / "benchmark.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    rng = np.random.default_rng(seed)
    for split, count, source, ade_split in (("train", train, "train", "training"), ("val", val, "test", "validation")):
        pixels, labels = read_fashion_mnist(source, fashion_mnist)
        (out / "coco" / f"{split}2017").mkdir(parents=True, exist_ok=True)
        (out / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
        (out / "ade" / "images" / ade_split).mkdir(parents=True, exist_ok=True)
        (out / "ade" / "annotations" / ade_split).mkdir(parents=True, exist_ok=True)
        images: list[dict] = []
        annotations: list[dict] = []
        for i in range(count):
            picks = rng.choice(len(pixels), int(rng.integers(per_image[0], per_image[1] + 1)), replace=False)
            image, instances, semantic = _canvas(pixels[picks], labels[picks], rng, size, sides)
            name = f"{split}_{i:06d}"
            Image.fromarray(image).save(out / "coco" / f"{split}2017" / f"{name}.png")
            Image.fromarray(image).save(out / "ade" / "images" / ade_split / f"{name}.png")
            Image.fromarray(semantic).save(out / "ade" / "annotations" / ade_split / f"{name}.png")
            images.append({"id": i + 1, "file_name": f"{name}.png", "height": size, "width": size})
            for label, mask in instances:
                ys, xs = np.nonzero(mask)
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1, "iscrowd": 0,
                    "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                             float(ys.max() - ys.min() + 1)],
                    "area": float(mask.sum()), "segmentation": {"size": rle["size"],
                                                                "counts": rle["counts"].decode("ascii")}})
        tree = {"images": images, "annotations": annotations, "categories": categories,
                "info": {"description": "Fashion-MNIST items on canvases (mixmim.study.dense_benchmark)"}}
        (out / "coco" / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(tree))
    marker.write_text(json.dumps(spec) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for coco/ and ade/")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=300)
    parser.add_argument("--size", type=int, default=64, help="canvas side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_dense_benchmark(args.out, args.train, args.val, args.size, seed=args.seed)
    print(f"dense benchmark: {args.train} training / {args.val} validation canvases in {out}/coco and {out}/ade")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
