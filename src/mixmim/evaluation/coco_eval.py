"""COCO's box and mask AP (pycocotools' ``COCOeval``, the numbers every detection paper reports): the
detector's outputs turned into COCO results (xywh boxes in the original image's pixels, masks as RLE,
the file's own category ids), scored against the annotation file.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch
from torch import Tensor

# COCOeval's twelve numbers, in the order of ``stats``.
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(output: dict[str, Tensor], image_id: int, category_of: dict[int, int],
                    masks: bool = True, mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """torchvision's prediction for one image (``boxes`` xyxy, ``labels`` 1..K, ``scores``, ``masks``
    (N, 1, H, W) probabilities) as COCO result entries."""
    boxes = output["boxes"].detach().float().cpu()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    results = [{"image_id": int(image_id), "category_id": int(category_of[int(label)]), "bbox": [float(v) for v in box],
                "score": float(score)} for box, label, score in zip(xywh, labels, scores)]
    if masks and "masks" in output:
        from pycocotools import mask as mask_util

        binary = (output["masks"].detach().float().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)
        for entry, m in zip(results, binary):
            rle = mask_util.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            entry["segmentation"] = rle
    return results


def coco_evaluate(coco_gt: Any, results: list[dict[str, Any]], image_ids: list[int],
                  iou_types: tuple[str, ...] = ("bbox", "segm")) -> dict[str, float]:
    """``{"box_AP": ..., "box_AP50": ..., "mask_AP": ...}`` (percent) of ``results`` on ``image_ids`` of
    ``coco_gt``. No result at all scores 0 (pycocotools refuses an empty result list)."""
    from pycocotools.cocoeval import COCOeval

    out: dict[str, float] = {}
    for iou_type in iou_types:
        prefix = "box" if iou_type == "bbox" else "mask"
        entries = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if not entries:
            out.update({f"{prefix}_{name}": 0.0 for name in STATS})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(entries)
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.params.imgIds = sorted(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        # -1: no ground truth of that size in these images (COCOeval's way of saying "not applicable")
        out.update({f"{prefix}_{name}": float(v) * 100.0 if v >= 0 else float("nan") for name, v in
                    zip(STATS, evaluator.stats)})
    return out
