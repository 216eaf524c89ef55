"""Detection and instance segmentation data in the COCO format, read with pycocotools (MixMIM section 3
and section 8: Mask R-CNN on COCO; MixedAE Table 1: Cascade Mask R-CNN).

Any COCO-format set works the same way: COCO 2017 as it is on disk (``DIR/annotations/
instances_{train,val}2017.json`` with ``DIR/{train,val}2017/``) or a user's own export (CVAT, Label Studio)
named by its JSON and image folder. Polygons, RLE and crowd regions are read as COCO defines them
(pycocotools' ``annToMask``); crowd regions are left out of training, as torchvision's and detectron2's
references do, and kept for evaluation (COCOeval ignores detections matched to them).

Items are seeded like every data set of this project: ``ds[(index, seed)]`` is ``{"image", "target",
"index", "skipped"}``, the augmentation a pure function of (index, seed):

- ``lsj``: large-scale jitter (Ghiasi et al., the ViTDet/MAE protocol MixMIM follows): the image scaled
  by a factor drawn from ``scale_range`` times ``size / max(h, w)``, a random ``size x size`` crop of the
  result, padded to ``size x size``, flipped with probability 1/2;
- ``multiscale`` (MixedAE, iBOT; detectron2's ``ResizeShortestEdge``): the shorter side drawn from
  480-800 in steps of 32, the longer at most ``max_size``, flipped with probability 1/2;
- ``none`` (evaluation): the image as it is; the detector resizes it and maps its predictions back to
  the original size.

Targets are torchvision's: ``boxes`` (N, 4) xyxy pixels, ``labels`` (N,) 1..K (0 is background),
``masks`` (N, H, W) uint8, ``image_id``. An unreadable or missing image is replaced by the next
readable one and listed in ``skipped``; boxes of zero area are dropped and counted. A JSON that is not
COCO, an annotation of a category the JSON does not list, or a mask whose size differs from its image
stops the run in one line naming the file and the annotation.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mixmim.data.images import BadImage, load_rgb
from mixmim.utils.errors import UserError

log = logging.getLogger("mixmim")

Augment = Literal["lsj", "multiscale", "none"]
MULTISCALE_SIDES = tuple(range(480, 801, 32))  # MixedAE / iBOT: 480-800 in steps of 32, longer side <= 1333


class CocoError(UserError, ValueError):
    """A COCO annotation file that cannot be used as it is (one line naming the file and the entry)."""


def _pycocotools():
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise CocoError("reading COCO annotations needs pycocotools: pip install \"mixmim[dense]\"") from None
    return COCO


def load_coco(path: str | Path) -> Any:
    """pycocotools' ``COCO`` of an annotation file, checked to be COCO: ``images``, ``annotations`` and
    ``categories`` lists (pycocotools' own progress lines are kept off the console)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotations {path} do not exist")
    try:
        tree = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CocoError(f"{path} is not a JSON file ({exc.__class__.__name__})") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(tree.get(k) if isinstance(
        tree, dict) else None, list)]
    if missing:
        raise CocoError(f"{path} is not a COCO annotation file: no {', '.join(missing)} list")
    coco = _pycocotools()()
    coco.dataset = tree
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@dataclass
class CocoLayout:
    """Where one split's annotations and images are."""

    annotations: Path
    images: Path


def find_coco_layout(root: str | Path, split: str) -> CocoLayout:
    """COCO 2017 as it is on disk: ``root/annotations/instances_{split}2017.json`` (or any
    ``instances_{split}*.json``) and ``root/{split}2017`` (or ``root/{split}``)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"COCO folder {root} does not exist")
    notes = root / "annotations"
    candidates = [notes / f"instances_{split}2017.json", *sorted(notes.glob(f"instances_{split}*.json"))]
    json_file = next((p for p in candidates if p.is_file()), None)
    images = next((p for p in (root / f"{split}2017", root / split) if p.is_dir()), None)
    if json_file is None or images is None:
        raise FileNotFoundError(f"{root} is not a COCO layout for split {split!r}: expected "
                                f"annotations/instances_{split}2017.json and {split}2017/ (or name the files with "
                                f"data.{split}_json and data.{split}_images)")
    return CocoLayout(json_file, images)


class CocoDetection(torch.utils.data.Dataset):
    """The images of one COCO-format split with their instances (see the module docstring)."""

    def __init__(self, annotations: str | Path, images: str | Path, augment: Augment = "none", size: int = 1024,
                 scale_range: tuple[float, float] = (0.1, 2.0), categories: list[dict[str, Any]] | None = None,
                 max_tries: int = 32, max_size: int = 1333, sides: tuple[int, ...] = MULTISCALE_SIDES):
        self.path, self.root = Path(annotations), Path(images).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} (of {self.path}) does not exist")
        self.coco = load_coco(self.path)
        cats = sorted(self.coco.dataset["categories"], key=lambda c: int(c["id"]))
        if categories is not None and [c["id"] for c in categories] != [c["id"] for c in cats]:
            raise CocoError(f"{self.path} has categories {[c['id'] for c in cats][:8]}..., the training set "
                            f"{[c['id'] for c in categories][:8]}...: both splits must list the same categories")
        self.categories = cats
        self.label_of = {int(c["id"]): i + 1 for i, c in enumerate(cats)}  # 0 is torchvision's background
        self.category_of = {label: cid for cid, label in self.label_of.items()}
        self.ids = sorted(int(i) for i in self.coco.imgs)
        if augment not in ("lsj", "multiscale", "none"):
            raise ValueError(f"augment={augment!r}: expected lsj, multiscale or none")
        self.augment, self.size = augment, size
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.max_size, self.sides = max_size, tuple(sides)
        self.max_tries = max_tries
        self.dropped_boxes = 0  # annotations of zero area or outside their image: left out
        self._check_annotations()

    @property
    def classes(self) -> list[str]:
        return [str(c.get("name", c["id"])) for c in self.categories]

    def __len__(self) -> int:
        return len(self.ids)

    def _check_annotations(self) -> None:
        """Categories the file lists and masks the size of their image, checked once before any work;
        boxes of zero area (or outside their image) counted: they are left out."""
        for ann in self.coco.dataset["annotations"]:
            where = f"{self.path}: annotation {ann.get('id')}"
            info = self.coco.imgs.get(ann.get("image_id"))
            if info is None:
                raise CocoError(f"{where} names image_id {ann.get('image_id')}, which 'images' does not list")
            if ann.get("category_id") not in self.label_of:
                raise CocoError(f"{where} has category_id {ann.get('category_id')}, which 'categories' does not list")
            bbox = ann.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
                raise CocoError(f"{where}: 'bbox' is {bbox!r}, expected [x, y, width, height] in pixels")
            x, y, w, h = (float(v) for v in bbox)
            if min(x + w, info["width"]) <= max(x, 0) or min(y + h, info["height"]) <= max(y, 0):
                self.dropped_boxes += 1  # zero area, or outside its image
            _check_segmentation(self.path, ann, info)

    # ------------------------------------------------------------------ items
    def image_info(self, index: int) -> dict[str, Any]:
        return self.coco.imgs[self.ids[index]]

    def name(self, index: int) -> str:
        return str(self.root / self.image_info(index)["file_name"])

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        index, seed = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), int(key))
        skipped = []
        for attempt in range(self.max_tries):
            candidate = (index + attempt) % len(self.ids)
            try:
                image = load_rgb(self.name(candidate))
            except BadImage as exc:
                skipped.append((self.name(candidate), str(exc)))
                continue
            target = self.target(candidate, image.height, image.width)
            tensor = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
            tensor, target = self.transform(tensor, target, seed)
            return {"image": tensor, "target": target, "index": candidate, "skipped": skipped}
        raise CocoError(f"{self.max_tries} consecutive unreadable images in {self.root} from {self.name(index)}")

    def target(self, index: int, height: int, width: int) -> dict[str, Tensor]:
        """torchvision's target of one image: crowd regions left out, boxes clipped to the image, boxes
        of zero area dropped (and counted)."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        if (info["height"], info["width"]) != (height, width):
            raise CocoError(f"{self.path}: image {image_id} is listed as {info['height']}x{info['width']}, the file "
                            f"{self.name(index)} is {height}x{width}")
        boxes, labels, masks = [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
            if x1 - x0 <= 0 or y1 - y0 <= 0:  # counted once, by _check_annotations
                continue
            boxes.append([x0, y0, x1, y1])
            labels.append(self.label_of[int(ann["category_id"])])
            masks.append(self.coco.annToMask(ann) if ann.get("segmentation") else _box_mask(x0, y0, x1, y1, height,
                                                                                              width))
        return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.int64),
                "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, height, width,
                                                                                      dtype=torch.uint8),
                "image_id": torch.tensor(image_id)}

    # ------------------------------------------------------------------ augmentation
    def transform(self, image: Tensor, target: dict[str, Tensor], seed: int) -> tuple[Tensor, dict[str, Tensor]]:
        """``image`` (3, H, W) uint8 -> float in [0, 1], augmented by ``self.augment`` under ``seed``."""
        generator = torch.Generator().manual_seed(int(seed) % 2**63)
        image = image.float().div_(255)
        if self.augment == "lsj":
            image, target = large_scale_jitter(image, target, self.size, self.scale_range, generator)
        elif self.augment == "multiscale":
            side = self.sides[int(torch.randint(len(self.sides), (1,), generator=generator))]
            h, w = image.shape[-2:]
            image, target = resize(image, target, min(side / min(h, w), self.max_size / max(h, w)))
        if self.augment != "none" and float(torch.rand((), generator=generator)) < 0.5:
            image, target = hflip(image, target)
        return image, target


def _check_segmentation(path: Path, ann: dict[str, Any], info: dict[str, Any]) -> None:
    """A polygon list of at least three points each, or an RLE of the image's size whose run lengths (when
    uncompressed) add up to it: pycocotools trusts both and reads past the end of a bad RLE."""
    seg, where = ann.get("segmentation"), f"{path}: annotation {ann.get('id')}"
    if seg is None or seg == []:
        return
    if isinstance(seg, list):
        if not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg):
            raise CocoError(f"{where} has a polygon that is not a list of x, y pairs (at least 3 points)")
        return
    if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
        raise CocoError(f"{where}: 'segmentation' is neither polygons nor an RLE with 'size' and 'counts'")
    if list(seg["size"]) != [info["height"], info["width"]]:
        raise CocoError(f"{where} has a mask of size {seg['size']}, its image {ann.get('image_id')} is "
                        f"{info['height']}x{info['width']}")
    if isinstance(seg["counts"], list) and sum(int(c) for c in seg["counts"]) != info["height"] * info["width"]:
        raise CocoError(f"{where}: its RLE's run lengths add up to {sum(int(c) for c in seg['counts'])} pixels, "
                        f"its image has {info['height'] * info['width']}")


def _box_mask(x0: float, y0: float, x1: float, y1: float, height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[int(y0):int(math.ceil(y1)), int(x0):int(math.ceil(x1))] = 1
    return mask


def resize(image: Tensor, target: dict[str, Tensor], scale: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Image (bilinear), masks (nearest) and boxes scaled by ``scale``."""
    h, w = image.shape[-2:]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)[0]
    out = dict(target)
    out["boxes"] = target["boxes"] * torch.tensor([nw / w, nh / h, nw / w, nh / h])
    if target["masks"].numel():
        out["masks"] = F.interpolate(target["masks"][None].float(), size=(nh, nw), mode="nearest")[0].to(torch.uint8)
    else:
        out["masks"] = torch.zeros(0, nh, nw, dtype=torch.uint8)
    return image, out


def hflip(image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    w = image.shape[-1]
    out = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
    out["boxes"], out["masks"] = boxes, target["masks"].flip(-1)
    return image.flip(-1), out


def large_scale_jitter(image: Tensor, target: dict[str, Tensor], size: int, scale_range: tuple[float, float],
                       generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
    """detectron2's ``ResizeScale`` + ``FixedSizeCrop`` (ViTDet's LSJ): scale by a factor in
    ``scale_range`` of ``size / max(h, w)``, crop a random ``size x size`` window, pad to ``size x size``;
    instances that leave the crop are dropped."""
    h, w = image.shape[-2:]
    low, high = scale_range
    factor = low + (high - low) * float(torch.rand((), generator=generator))
    image, target = resize(image, target, factor * size / max(h, w))
    h, w = image.shape[-2:]
    top = int(torch.randint(max(1, h - size + 1), (1,), generator=generator))
    left = int(torch.randint(max(1, w - size + 1), (1,), generator=generator))
    image = image[:, top:top + size, left:left + size]
    masks = target["masks"][:, top:top + size, left:left + size]
    boxes = (target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32))
    ch, cw = image.shape[-2:]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, cw)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ch)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    image = F.pad(image, (0, size - cw, 0, size - ch))
    masks = F.pad(masks[keep], (0, size - cw, 0, size - ch))
    out = dict(target)
    out.update(boxes=boxes[keep], labels=target["labels"][keep], masks=masks)
    return image, out


def collate_detection(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A list of images (sizes may differ) and their targets; the skipped files."""
    return {"images": [it["image"] for it in items], "targets": [it["target"] for it in items],
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "skipped": [s for it in items for s in it["skipped"]]}
