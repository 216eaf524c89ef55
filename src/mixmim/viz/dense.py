"""Pictures of dense predictions, drawn with PIL: what a detector found (boxes with class and score, masks
tinted over the image, the ground truth's boxes in white) and what a segmenter labelled (image, true
map, predicted map side by side). The tasks write them at the end of a run (``predictions.png``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# Distinct colours for up to 20 classes (tab20-like), then repeated.
PALETTE = np.array([(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232),
                    (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148),
                    (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229)], dtype=np.uint8)


def _colour(k: int) -> tuple[int, int, int]:
    r, g, b = PALETTE[k % len(PALETTE)]
    return int(r), int(g), int(b)


def draw_detections(image: np.ndarray, detections: Sequence[dict[str, Any]], names: dict[int, str],
                    truth: Sequence[Sequence[float]] = (), scale: int = 4, min_score: float = 0.5) -> Image.Image:
    """One image (H, W, 3 uint8) with its COCO-format detections of score >= ``min_score`` (``bbox`` xywh,
    ``category_id``, ``score``, optional RLE ``segmentation``), enlarged ``scale`` times; ``truth``:
    ground-truth boxes (xywh) drawn in white."""
    from pycocotools import mask as mask_util

    canvas = image.astype(np.float32)
    kept = [d for d in detections if d["score"] >= min_score]
    for d in kept:
        if "segmentation" in d:
            m = mask_util.decode(d["segmentation"]).astype(bool)
            canvas[m] = 0.5 * canvas[m] + 0.5 * np.array(_colour(d["category_id"]), dtype=np.float32)
    big = Image.fromarray(canvas.clip(0, 255).astype(np.uint8)).resize(
        (image.shape[1] * scale, image.shape[0] * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(big)
    for x, y, w, h in truth:
        draw.rectangle([x * scale, y * scale, (x + w) * scale, (y + h) * scale], outline=(255, 255, 255))
    for d in kept:
        x, y, w, h = d["bbox"]
        colour = _colour(d["category_id"])
        draw.rectangle([x * scale, y * scale, (x + w) * scale, (y + h) * scale], outline=colour, width=2)
        draw.text((x * scale + 2, y * scale + 1), f"{names.get(d['category_id'], d['category_id'])} "
                  f"{d['score']:.2f}", fill=colour)
    return big


def label_map(labels: np.ndarray, ignore: int = 255) -> np.ndarray:
    """(H, W) labels as colours; ``ignore`` black."""
    out = PALETTE[labels % len(PALETTE)].copy()
    out[labels == ignore] = 0
    return out


def grid(rows: Sequence[Sequence[Image.Image]], path: str | Path, gap: int = 4) -> Path:
    """Pictures in rows (each row's pictures left to right), written as one PNG."""
    widths = [sum(p.width for p in row) + gap * (len(row) - 1) for row in rows]
    heights = [max(p.height for p in row) for row in rows]
    sheet = Image.new("RGB", (max(widths), sum(heights) + gap * (len(rows) - 1)), (255, 255, 255))
    y = 0
    for row, height in zip(rows, heights):
        x = 0
        for picture in row:
            sheet.paste(picture, (x, y))
            x += picture.width + gap
        y += height + gap
    path = Path(path)
    sheet.save(path)
    return path


def segmentation_row(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, scale: int = 4,
                     ignore: int = 255) -> list[Image.Image]:
    """Image, true map, predicted map (the prediction black where the truth is ignored), enlarged."""
    shown = prediction.copy()
    shown[truth == ignore] = ignore
    size = (image.shape[1] * scale, image.shape[0] * scale)
    return [Image.fromarray(a).resize(size, Image.Resampling.NEAREST)
            for a in (image, label_map(truth, ignore), label_map(shown, ignore))]
