"""Semantic segmentation to the ADE20K protocol, as a task of the training loop (MixMIM section 3 and
section 8: UperNet, 16k iterations at batch 16, layer decay 0.85 / 0.9 for B / L, BEiT's other settings;
MixedAE and SimMIM reuse the protocol with their own lengths and rates).

The model is :class:`~mixmim.models.segmentation.UperNet` with the auxiliary FCN head (0.4 of its loss);
the data and augmentation are :mod:`mixmim.data.segmentation` (random resize, category-ratio crop, flip,
photometric distortion); evaluation is sliding-window inference (:mod:`mixmim.evaluation.sliding`) and
mIoU at each image's original resolution, every validation image on one process, the confusion matrices
summed over processes. The encoder comes from any weights a user holds (a pretraining run, an export, a
fine-tuned classifier's ``model.pt`` or run folder: SimMIM's ADE20K protocol starts from ImageNet
fine-tuned weights) or is randomly initialised (``--model`` alone).

Files in the run folder besides the loop's: ``model.pt`` (format ``mixmim-upernet/3``: the weights the
run reports, ``eval.select``), ``best.pt`` with ``eval.select=best``, ``results.json``, ``predictions.png``
(the first evaluation images: image, true map, predicted map).
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from mixmim.config import ConfigError, SegmentRunConfig
from mixmim.data.images import BadImage
from mixmim.data.segmentation import (
    IGNORE,
    Protocol,
    SegmentationData,
    SegmentationError,
    ade20k_pairs,
    ade20k_root,
    folder_pairs,
    infer_num_classes,
    split_pairs,
)
from mixmim.evaluation.layer_decay import dense_param_groups
from mixmim.evaluation.metrics import segmentation_scores, write_json
from mixmim.evaluation.sharded import sum_over_processes
from mixmim.evaluation.sliding import logits_at, slide_logits
from mixmim.interop.torch_files import load_torch_file
from mixmim.models.segmentation import UperNet
from mixmim.training.task import RunContext, StepOutput, Task, every_epochs
from mixmim.transfer.classifier import dense_encoder, resolve_model
from mixmim.transfer.data import seeded_subset
from mixmim.utils.files import atomic_write

log = logging.getLogger("mixmim")

SEGMENTER_FORMAT = "mixmim-upernet/3"


def confusion_of_pixels(prediction: Tensor, label: Tensor, num_classes: int) -> Tensor:
    """(C, C) counts of (true, predicted) over the pixels not labelled 255."""
    keep = label != IGNORE
    truth = label[keep]
    if truth.numel() and int(truth.max()) >= num_classes:
        raise ValueError(f"a mask holds label {int(truth.max())}, the model has {num_classes} classes")
    return torch.bincount(truth * num_classes + prediction[keep], minlength=num_classes**2).reshape(
        num_classes, num_classes)


class SegmentTask(Task):
    """``mixmim segment``."""

    name = "segment"
    columns = ["miou", "pixel_acc"]

    def __init__(self, config: SegmentRunConfig):
        self.config = config
        g, d = config.segment, config.data
        given_size = config.model.img_size
        self.pretrained = resolve_model(config)
        if given_size is not None and given_size != g.crop_size:
            raise ConfigError(f"config key 'model.img_size': {given_size}; the segmenter's encoder sees "
                              f"segment.crop_size ({g.crop_size}) crops and windows: set --crop-size instead")
        config.model.img_size = g.crop_size  # the encoder sees the crops (and the evaluation's windows)
        if not d.path:
            raise ConfigError("config key 'data.path': mixmim segment needs a folder (--data DIR): ADE20K "
                              "(images/training, annotations/training) or images/ with masks/")
        ade = ade20k_root(d.path)
        self.layout = "ade20k" if ade is not None else "folder"
        if ade is not None:
            train, val = ade20k_pairs(ade, "training"), ade20k_pairs(ade, "validation")
        elif d.val_path:
            train, val = folder_pairs(d.path), folder_pairs(d.val_path)
        else:
            train, val = split_pairs(folder_pairs(d.path), d.val_fraction, config.train.seed)
        train = [train[i] for i in seeded_subset(len(train), d.limit_train, config.train.seed)]
        val = [val[i] for i in seeded_subset(len(val), d.limit_test, config.train.seed + 1)]
        self.reduce_zero_label = g.reduce_zero_label if g.reduce_zero_label is not None else ade is not None
        protocol = Protocol(g.crop_size, (g.scale[0], g.scale[1]), (g.ratio_range[0], g.ratio_range[1]),
                            g.cat_max_ratio, g.photometric)
        self.train_set = SegmentationData(train, protocol, self.reduce_zero_label)
        self.val_set = SegmentationData(val, protocol, self.reduce_zero_label)
        self.stride = g.stride or g.crop_size * 2 // 3
        self.num_classes = g.num_classes or infer_num_classes(self.train_set)
        self.train_set.num_classes = self.val_set.num_classes = self.num_classes
        self.best: dict[str, Any] = {}
        self.last: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.unreadable: list[str] = []

    # ------------------------------------------------------------------ what to train
    def build_model(self) -> nn.Module:
        g = self.config.segment
        encoder = dense_encoder(self.pretrained, self.config, g.crop_size, g.mixmim_windows)
        self.model = UperNet(encoder, self.num_classes, g.channels, g.aux_channels if g.aux_weight > 0 else None,
                             multi_level=g.vit_levels)
        return self.model

    def dataset(self) -> Dataset:
        return self.train_set

    def collate(self, items: list[dict]) -> dict:
        from mixmim.transfer.data import collate_labelled

        return collate_labelled(items)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        o = self.config.optim
        # BEiT's segmentation settings keep the relative position tables out of weight decay.
        return dense_param_groups(model, cast(UperNet, model).encoder, o.weight_decay, o.layer_decay or 1.0,
                                  ("relative_position_bias_table",))

    def repeated_blocks(self, model: nn.Module) -> list[nn.Module]:
        blocks = getattr(cast(UperNet, model).encoder, "repeated_blocks", None)
        return list(blocks()) if callable(blocks) else []

    def step(self, model: nn.Module, batch: dict) -> StepOutput:
        images, labels = batch["image"], batch["label"]
        if len(images) == 1:
            self._freeze_batch_statistics()  # BatchNorm statistics of one image are degenerate
        out = model(images)
        logits, aux = out if isinstance(out, tuple) else (out, None)
        main = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
        if aux is None:
            return StepOutput(main)
        aux_loss = F.cross_entropy(aux.float(), labels, ignore_index=IGNORE)
        return StepOutput(main + self.config.segment.aux_weight * aux_loss,
                          {"loss_main": float(main.detach()), "loss_aux": float(aux_loss.detach())})

    def _freeze_batch_statistics(self) -> None:
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    # ------------------------------------------------------------------ evaluation
    def evaluation_steps(self, total_steps: int, steps_per_epoch: int) -> set[int]:
        e = self.config.eval
        return every_epochs(e.every_epochs, total_steps, steps_per_epoch, e.every_steps)

    @torch.no_grad()
    def evaluate(self, run: RunContext, step: int) -> dict[str, float]:
        """mIoU and pixel accuracy over the validation images at their original resolution: each process
        takes every ``world_size``-th image, sliding windows, the counts summed over processes."""
        g = self.config.segment
        matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
        batch = self.config.eval.batch_size or run.micro_batch
        unreadable = []
        with run.full_module() as model:
            was = model.training
            model.eval()

            def predict(windows: Tensor) -> Tensor:
                with run.autocast():
                    return model(windows.to(run.device))

            for index in range(run.rank, len(self.val_set), run.world_size):
                try:
                    image, label = self.val_set.evaluation_item(index)
                except BadImage as exc:
                    unreadable.append(f"{self.val_set.pairs[index][0]}: {exc}")
                    continue
                logits = slide_logits(predict, image.to(run.device), self.num_classes, g.crop_size, self.stride, batch)
                prediction = logits_at(logits, (label.shape[0], label.shape[1])).argmax(0).cpu()
                matrix += confusion_of_pixels(prediction, label, self.num_classes)
            model.train(was)
        if unreadable:
            log.warning("%d unreadable evaluation image(s) left out, e.g. %s", len(unreadable), unreadable[0])
        self.unreadable = unreadable
        matrix = sum_over_processes(matrix.to(run.device)).cpu()
        if int(matrix.sum()) == 0 and unreadable:
            raise SegmentationError(f"no evaluation image could be read ({unreadable[0]})")
        self.last = {**segmentation_scores(matrix), "step": step}
        self.history.append(self.last)
        if self.config.eval.select == "best" and self.last["miou"] > self.best.get("miou", -1.0):
            self.best = dict(self.last)
            self._save(run, "best.pt")
        log.info("step %d: mIoU %.2f%%, pixel accuracy %.2f%% on %d images", step, 100 * self.last["miou"],
                 100 * self.last["pixel_acc"], len(self.val_set))
        return {"miou": self.last["miou"], "pixel_acc": self.last["pixel_acc"]}

    # ------------------------------------------------------------------ checkpoints and the end
    def _save(self, run: RunContext, name: str) -> None:
        state = run.full_state_dict()  # every process (FSDP gathers)
        if run.is_main:
            g = self.config.segment
            atomic_write(run.run_dir / name, lambda tmp: torch.save(
                {"format": SEGMENTER_FORMAT, "model": state, "num_classes": self.num_classes,
                 "img_size": g.crop_size, "reduce_zero_label": self.reduce_zero_label, "step": run.step}, tmp))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "history": self.history, "num_classes": self.num_classes}

    def load_state_dict(self, state: dict[str, Any], path: Any = None) -> None:
        saved = state.get("num_classes")
        if saved is not None and saved != self.num_classes:
            raise ConfigError(f"--resume: {path} was trained for {saved} classes, the data now has {self.num_classes}")
        self.best = dict(state.get("best") or {})
        self.history = list(state.get("history") or [])

    def finish(self, run: RunContext, summary: dict[str, Any]) -> None:
        """Report the weights ``eval.select`` keeps (the last ones, or the best evaluation's)."""
        if run.stopped is not None:
            return
        kept = self.last
        best_file = run.run_dir / "best.pt"
        if self.config.eval.select == "best" and self.best and best_file.is_file():
            run.load_full_state_dict(load_torch_file(best_file)["model"])
            kept = self.best
        self._save(run, "model.pt")
        self._picture(run, run.run_dir / "predictions.png")
        results = {"miou": kept.get("miou"), "pixel_acc": kept.get("pixel_acc"), "step": kept.get("step"),
                   "select": self.config.eval.select, "last": self.last, "best": self.best or None,
                   "history": self.history, "num_classes": self.num_classes, "layout": self.layout,
                   "reduce_zero_label": self.reduce_zero_label, "train_images": len(self.train_set),
                   "val_images": len(self.val_set), "unreadable_val_images": len(self.unreadable),
                   "weights": self.pretrained.source, "checkpoint": self.config.checkpoint}
        if run.is_main:
            write_json(run.run_dir / "results.json", results)
        summary["results"] = results

    @torch.no_grad()
    def _picture(self, run: RunContext, path: Any, count: int = 4) -> None:
        """The first ``count`` evaluation images: image, true map, the reported weights' map (every
        process takes part in gathering the module; the main one draws)."""
        from mixmim.viz.dense import grid, segmentation_row

        g = self.config.segment
        rows = []
        with run.full_module() as model:
            was = model.training
            model.eval()
            for index in range(min(count, len(self.val_set))):
                try:
                    raw, mask = self.val_set.read(index)
                except BadImage:
                    continue
                image, label = self.val_set.evaluation_input(raw, mask)
                with run.autocast():
                    logits = slide_logits(lambda w: model(w.to(run.device)), image.to(run.device), self.num_classes,
                                          g.crop_size, self.stride)
                prediction = logits_at(logits, (label.shape[0], label.shape[1])).argmax(0).cpu().numpy()
                scale = max(1, 256 // max(raw.shape[:2]))
                rows.append(segmentation_row(raw, label.numpy(), prediction, scale=scale))
            model.train(was)
        if run.is_main and rows:
            grid(rows, path)

    def describe(self, run: RunContext) -> str:
        c = self.config
        return (f"{c.name}: UperNet on {self.pretrained.source} weights of {c.model.name or self.pretrained.family} "
                f"({c.segment.crop_size} px crops, {self.layout} layout): {len(self.train_set)} training / "
                f"{len(self.val_set)} evaluation images, {self.num_classes} classes")
