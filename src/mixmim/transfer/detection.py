"""Object detection and instance segmentation on COCO-format data, as a task of the training loop (MixMIM
section 3 and section 8: Mask R-CNN with large-scale jitter, a step schedule with a quarter-epoch
warm-up, layer-wise lr decay 0.85 / 0.9; MixedAE Table 1: Cascade Mask R-CNN with multi-scale training).

The encoder comes from any weights a user holds (a pretraining run, an export, a fine-tuned classifier's
``model.pt``, a release checkpoint) or is randomly initialised (``--model`` alone: the floor every
comparison needs), and runs on the loop's machinery (torchrun DDP, accumulation, resume, NaN skip, bf16,
trackers). Evaluation is COCOeval's box and mask AP over the whole validation split: every process
predicts its share of the images, the predictions are gathered, every image counted once.

Files in the run folder besides the loop's: ``model.pt`` (format ``mixmim-detector/1``: the weights the
run reports, the detector, the categories), ``best.pt`` with ``eval.select=best``, ``results.json``,
``predictions.json`` (COCO results of the reported weights' last evaluation), ``predictions.png`` (the
first evaluation images with those detections).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mixmim.config import ConfigError, DetectRunConfig
from mixmim.data.coco import MULTISCALE_SIDES, CocoDetection, CocoLayout, collate_detection, find_coco_layout
from mixmim.data.images import BadImage
from mixmim.evaluation.coco_eval import coco_evaluate, to_coco_results
from mixmim.evaluation.layer_decay import dense_param_groups
from mixmim.evaluation.metrics import write_json
from mixmim.interop.torch_files import load_torch_file
from mixmim.models.detection import build_detector, detector_encoder
from mixmim.training.task import RunContext, StepOutput, Task, every_epochs
from mixmim.transfer.classifier import dense_encoder, resolve_model
from mixmim.transfer.data import seeded_subset
from mixmim.utils.files import atomic_write, atomic_write_text

log = logging.getLogger("mixmim")

DETECTOR_FORMAT = "mixmim-detector/1"


def coco_splits(config: DetectRunConfig) -> tuple[CocoLayout, CocoLayout]:
    """(train, val) annotation files and image folders: named by ``detect.*_json``/``*_images``, or found
    in ``data.path`` as COCO 2017 is on disk."""
    d = config.detect
    found = {}
    for split in ("train", "val"):
        json_file, images = getattr(d, f"{split}_json"), getattr(d, f"{split}_images")
        if json_file and images:
            found[split] = CocoLayout(Path(json_file).expanduser(), Path(images).expanduser())
        elif config.data.path:
            found[split] = find_coco_layout(config.data.path, split)
        else:
            raise ConfigError(f"config key 'data.path': mixmim detect needs a COCO folder (--data DIR) or "
                              f"detect.{split}_json and detect.{split}_images")
    return found["train"], found["val"]


class DetectTask(Task):
    """``mixmim detect``."""

    name = "detect"

    def __init__(self, config: DetectRunConfig):
        self.config = config
        d = config.detect
        self.pretrained = resolve_model(config)
        train, val = coco_splits(config)
        self.train_set = CocoDetection(train.annotations, train.images, d.augment, d.size,
                                       (d.scale_range[0], d.scale_range[1]),
                                       max_size=d.max_size)
        self.val_set = CocoDetection(val.annotations, val.images, "none", d.size,
                                     categories=self.train_set.categories)
        self.train_indices = seeded_subset(len(self.train_set), config.data.limit_train, config.train.seed)
        self.val_indices = seeded_subset(len(self.val_set), config.data.limit_test, config.train.seed + 1)
        self.classes = self.train_set.classes
        # The encoder's input: LSJ's square crop, or the longest side multi-scale training can reach.
        self.side = d.size if d.augment == "lsj" else 32 * math.ceil(d.max_size / 32)
        config.model.img_size = self.side
        self.best: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.last: dict[str, Any] = {}
        self.predictions: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ what to train
    def build_model(self) -> nn.Module:
        d = self.config.detect
        encoder = dense_encoder(self.pretrained, self.config, self.side, d.mixmim_windows)
        sizes: dict[str, Any] = ({"min_size": d.size, "max_size": d.size} if d.augment == "lsj" else
                                 {"min_size": MULTISCALE_SIDES[-1], "max_size": d.max_size})
        self.model = build_detector(encoder, len(self.classes), d.detector, d.fpn_channels, d.vit_levels,
                                    detections_per_img=d.detections_per_image,
                                    box_batch_size_per_image=d.rois_per_image,
                                    anchor_sizes=tuple(d.anchor_sizes) if d.anchor_sizes else None, **sizes)
        return self.model

    def dataset(self):
        return torch.utils.data.Subset(self.train_set, self.train_indices) if len(self.train_indices) < len(
            self.train_set) else self.train_set

    def collate(self, items: list[dict]) -> dict:
        return collate_detection(items)

    def to_device(self, batch: dict, device: torch.device) -> dict:
        return {"images": [i.to(device, non_blocking=True) for i in batch["images"]],
                "targets": [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch["targets"]],
                "index": batch["index"], "skipped": batch["skipped"]}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        o = self.config.optim
        return dense_param_groups(model, detector_encoder(model), o.weight_decay, o.layer_decay or 1.0)

    def repeated_blocks(self, model: nn.Module) -> list[nn.Module]:
        blocks = getattr(detector_encoder(model), "repeated_blocks", None)
        return list(blocks()) if callable(blocks) else []

    def step(self, model: nn.Module, batch: dict) -> StepOutput:
        losses = model(batch["images"], batch["targets"])
        return StepOutput(sum(losses.values()), {k: float(v.detach()) for k, v in losses.items()})

    # ------------------------------------------------------------------ evaluation
    @property
    def columns(self) -> list[str]:
        return ["box_AP", "box_AP50", "mask_AP", "mask_AP50"]

    def evaluation_steps(self, total_steps: int, steps_per_epoch: int) -> set[int]:
        return every_epochs(self.config.eval.every_epochs, total_steps, steps_per_epoch)

    @torch.no_grad()
    def predict(self, run: RunContext) -> list[dict[str, Any]]:
        """COCO results of this process's share of the validation images (every ``world_size``-th)."""
        batch_size = self.config.eval.batch_size or run.micro_batch
        mine = self.val_indices[run.rank::run.world_size]
        results: list[dict[str, Any]] = []
        with run.full_module() as model:
            was = model.training
            model.eval()
            for start in range(0, len(mine), batch_size):
                items = [self.val_set[(i, i)] for i in mine[start:start + batch_size]]
                items = [it for it, i in zip(items, mine[start:start + batch_size]) if it["index"] == i]  # readable
                if not items:
                    continue
                with run.autocast():
                    outputs = model([it["image"].to(run.device) for it in items])
                for it, out in zip(items, outputs):
                    results += to_coco_results(out, int(it["target"]["image_id"]), self.val_set.category_of)
            model.train(was)
        return results

    def evaluate(self, run: RunContext, step: int) -> dict[str, float]:
        """Box and mask AP of the current weights on the validation images, on every process the same."""
        results = self.predict(run)
        if run.world_size > 1:
            gathered: list[list[dict[str, Any]] | None] = [None] * run.world_size
            dist.all_gather_object(gathered, results)
            results = [r for part in gathered for r in (part or [])]
        ids = [int(self.val_set.ids[i]) for i in self.val_indices]
        scores = [coco_evaluate(self.val_set.coco, results, ids) if run.is_main else None]
        if run.world_size > 1:
            dist.broadcast_object_list(scores, src=0)
        values = cast(dict[str, float], scores[0])
        self.last, self.predictions = {**values, "step": step}, results
        self.history.append(self.last)
        if self.config.eval.select == "best" and values["box_AP"] > self.best.get("box_AP", -1.0):
            self.best = dict(self.last)
            self._save(run, "best.pt")
            if run.is_main:
                atomic_write_text(run.run_dir / "best_predictions.json", json.dumps(results) + "\n")
        log.info("step %d: box AP %.2f (AP50 %.2f), mask AP %.2f (AP50 %.2f) on %d images", step, values["box_AP"],
                 values["box_AP50"], values["mask_AP"], values["mask_AP50"], len(ids))
        return {k: values[k] for k in self.columns}

    # ------------------------------------------------------------------ checkpoints and the end
    def _save(self, run: RunContext, name: str) -> None:
        state = run.full_state_dict()  # every process (FSDP gathers)
        if run.is_main:
            payload = {"format": DETECTOR_FORMAT, "model": state, "detector": self.config.detect.detector,
                       "categories": self.train_set.categories, "img_size": self.side, "step": run.step}
            atomic_write(run.run_dir / name, lambda tmp: torch.save(payload, tmp))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "history": self.history, "categories": self.train_set.categories}

    def load_state_dict(self, state: dict[str, Any], path: Any = None) -> None:
        saved = state.get("categories")
        if saved is not None and [c["id"] for c in saved] != [c["id"] for c in self.train_set.categories]:
            raise ConfigError(f"--resume: {path} was trained on other categories than the data's now; resume with "
                              "the same data or start a new run (another name=...)")
        self.best = dict(state.get("best") or {})
        self.history = list(state.get("history") or [])

    def finish(self, run: RunContext, summary: dict[str, Any]) -> None:
        """Report the weights ``eval.select`` keeps (the last ones, or the best evaluation's)."""
        if run.stopped is not None:
            return
        kept, predictions = self.last, self.predictions
        best_file = run.run_dir / "best.pt"
        if self.config.eval.select == "best" and self.best and best_file.is_file():
            run.load_full_state_dict(load_torch_file(best_file)["model"])
            kept = self.best
            if run.is_main and (run.run_dir / "best_predictions.json").is_file():
                predictions = json.loads((run.run_dir / "best_predictions.json").read_text())
        self._save(run, "model.pt")
        results = {**{k: v for k, v in kept.items() if k != "step"}, "step": kept.get("step"),
                   "select": self.config.eval.select, "last": self.last, "best": self.best or None,
                   "history": self.history, "detector": self.config.detect.detector, "classes": self.classes,
                   "train_images": len(self.train_indices), "val_images": len(self.val_indices),
                   "weights": self.pretrained.source, "checkpoint": self.config.checkpoint,
                   "dropped_boxes": self.train_set.dropped_boxes}
        if run.is_main:
            atomic_write_text(run.run_dir / "predictions.json", json.dumps(predictions) + "\n")
            write_json(run.run_dir / "results.json", results)
            self._picture(predictions, run.run_dir / "predictions.png")
        summary["results"] = results

    def _picture(self, predictions: list[dict[str, Any]], path: Any, count: int = 4) -> None:
        """The first ``count`` evaluation images with the reported weights' detections (score >= 0.5,
        masks tinted, class and score) and the true boxes in white."""
        from mixmim.data.images import load_rgb
        from mixmim.viz.dense import draw_detections, grid

        names = {int(c["id"]): str(c.get("name", c["id"])) for c in self.train_set.categories}
        pictures = []
        for index in self.val_indices[:count]:
            info = self.val_set.image_info(index)
            try:
                image = np.asarray(load_rgb(self.val_set.name(index)))
            except BadImage:
                continue
            mine = [p for p in predictions if p["image_id"] == info["id"]]
            truth = [a["bbox"] for a in self.val_set.coco.imgToAnns.get(info["id"], []) if not a.get("iscrowd")]
            scale = max(1, 256 // max(image.shape[:2]))
            pictures.append(draw_detections(image, mine, names, truth, scale=scale))
        if pictures:
            grid([pictures], path)

    def describe(self, run: RunContext) -> str:
        c = self.config
        return (f"{c.name}: {c.detect.detector} on {self.pretrained.source} weights of "
                f"{c.model.name or self.pretrained.family} ({self.side} px, {c.detect.augment}): "
                f"{len(self.train_indices)} training / {len(self.val_indices)} evaluation images, "
                f"{len(self.classes)} classes")
