"""Semantic segmentation with a UperNet head on the encoder (MixMIM section 3 and 8: ADE20K with
UperNet, layer-wise lr decay 0.85/0.9 for B/L, BEiT's other settings).

UperNet (Xiao et al. 2018, as implemented in mmsegmentation): a pyramid pooling module (scales
1, 2, 3, 6) on the last stage, lateral 1x1 convolutions and a top-down feature pyramid on the
others, 3x3 convolutions per level, all levels upsampled to stride 4 and fused by a 3x3 convolution,
dropout 0.1 and a 1x1 classifier; logits are upsampled to the input size.

Data: ``DIR/images/<stem>.<ext>`` and ``DIR/masks/<stem>.png`` (label maps, 255 = ignore).
Training follows BEiT's recipe in spirit at small scale: AdamW, layer decay, linear warmup then
linear (poly, power 1) decay; augmentation is resize to the model's size plus horizontal flip, the
flip a function of the sample's seed. A task of the training loop (torchrun, accumulation, resume,
NaN skip); mIoU and pixel accuracy from a confusion matrix of pixels summed over processes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.ops import Conv2dNormActivation

from mixmim.config import SegmentRunConfig
from mixmim.data.images import IMAGE_EXTENSIONS, BadImage, load_rgb
from mixmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mixmim.evaluation.layer_decay import param_groups as layer_decay_groups
from mixmim.evaluation.metrics import segmentation_scores, write_json
from mixmim.evaluation.sharded import shard_loader, sum_over_processes
from mixmim.interop.pretrained import build_encoder
from mixmim.models.dense import MixMIMBackbone
from mixmim.training.task import RunContext, StepOutput, Task, every_epochs
from mixmim.transfer.classifier import resolve_model
from mixmim.utils.files import atomic_write

log = logging.getLogger("mixmim")
IGNORE = 255


def _conv(cin: int, cout: int, k: int) -> Conv2dNormActivation:
    return Conv2dNormActivation(cin, cout, k, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU, bias=False)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: average pools at several scales, 1x1 conv each, upsampled and
    concatenated with the input, then fused by a 3x3 conv."""

    def __init__(self, cin: int, channels: int, scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv(cin, channels, 1)) for s in scales)
        self.bottleneck = _conv(cin + len(scales) * channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UperHead(nn.Module):
    """UperNet decode head over multi-scale maps (finest first)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.lateral = nn.ModuleList(_conv(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(_conv(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = _conv(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        levels = [lat(f) for lat, f in zip(self.lateral, feats)] + [self.ppm(feats[-1])]
        for i in range(len(levels) - 1, 0, -1):  # top-down pathway
            levels[i - 1] = levels[i - 1] + F.interpolate(levels[i], size=levels[i - 1].shape[-2:], mode="bilinear",
                                                          align_corners=False)
        outs = [conv(x) for conv, x in zip(self.fpn, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in outs[1:]]
        return self.classifier(self.dropout(self.fuse(torch.cat(outs, dim=1))))


class UperNet(nn.Module):
    """MixMIM backbone + UperNet head; ``forward`` returns logits at the input resolution."""

    def __init__(self, encoder: nn.Module, num_classes: int, channels: int = 512):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be at least 1")
        self.backbone = MixMIMBackbone(encoder)
        self.head = UperHead(self.backbone.out_channels, num_classes, channels)

    def forward(self, images: Tensor) -> Tensor:
        logits = self.head(list(self.backbone(images).values()))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def group_matcher(self, coarse: bool = False):
        """Layer-wise lr decay over the encoder's layers; the per-stage norms and the head learn at
        the full rate (they are new)."""
        matcher = cast("Callable[[bool], Callable[[str], tuple[int, ...]]]", self.backbone.encoder.group_matcher)
        inner = matcher(coarse)  # the MixMIM encoder's: a parameter name -> its layer ordinal
        prefix = "backbone.encoder."

        def ordinal(name: str) -> tuple[int, ...]:
            return inner(name[len(prefix):]) if name.startswith(prefix) else (3,)

        return ordinal

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.encoder.{n}" for n in ("absolute_pos_embed", "pos_embed", "cls_token")}

    def no_weight_decay_keywords(self) -> set[str]:
        # BEiT's segmentation settings (which MixMIM adopts for ADE20K) keep the tables out of decay.
        return {"relative_position_bias_table"}


class SegmentationFolder(Dataset):
    """Pairs ``images/<stem>.*`` with ``masks/<stem>.png``; resized to ``size`` (masks by nearest
    neighbour), flipped at random when ``train``, normalised with ImageNet statistics."""

    def __init__(self, root: str | Path, size: int, train: bool, stems: Sequence[str] | None = None):
        self.root = Path(root).expanduser()
        images, masks = self.root / "images", self.root / "masks"
        for folder in (images, masks):
            if not folder.is_dir():
                raise FileNotFoundError(f"segmentation folder {folder} does not exist (expected images/ and masks/)")
        by_stem = {p.stem: p for p in sorted(images.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
        pairs = [(by_stem[s], masks / f"{s}.png") for s in sorted(by_stem) if (masks / f"{s}.png").is_file()]
        if stems is not None:
            wanted = set(stems)
            pairs = [p for p in pairs if p[0].stem in wanted]
        if not pairs:
            raise ValueError(f"{self.root}: no image in images/ has a mask masks/<same stem>.png")
        self.pairs, self.size, self.train = pairs, size, train
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.pairs)

    def read_mask(self, index: int) -> np.ndarray:
        path = self.pairs[index][1]
        try:
            with Image.open(path) as handle:
                if handle.mode not in ("L", "P", "I", "I;16"):
                    raise ValueError(f"mask {path} has mode {handle.mode}: expected a single-channel label map")
                return np.array(handle).astype(np.int64)
        except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ValueError(f"cannot read mask {path}: {exc}") from None

    def __getitem__(self, key) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, key)
        image_path, _ = self.pairs[index]
        try:
            image = load_rgb(image_path)
        except BadImage as exc:
            raise ValueError(f"cannot read image {image_path}: {exc}") from None
        mask = self.read_mask(index)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask of {image_path.name} is {mask.shape[1]}x{mask.shape[0]}, the image "
                             f"{image.width}x{image.height}")
        x = torch.from_numpy(np.asarray(image.resize((self.size, self.size), Image.Resampling.BICUBIC),
                                        dtype=np.float32))
        x = (x.permute(2, 0, 1) / 255.0 - self.mean) / self.std
        y = torch.from_numpy(mask)[None, None].float()
        y = F.interpolate(y, size=(self.size, self.size), mode="nearest")[0, 0].long()
        if self.train and torch.rand((), generator=torch.Generator().manual_seed(seed)) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return {"image": x, "label": y, "index": index, "skipped": []}


def infer_num_classes(dataset: SegmentationFolder) -> int:
    """1 + the largest label (other than 255) found in the masks."""
    top = -1
    for i in range(len(dataset)):
        values = np.unique(dataset.read_mask(i))
        values = values[values != IGNORE]
        if values.size:
            top = max(top, int(values.max()))
    if top < 0:
        raise ValueError(f"{dataset.root}: every mask pixel is 255 (ignore); nothing to learn")
    return top + 1



def _split_stems(root: str, fraction: float, seed: int) -> tuple[list[str] | None, list[str] | None]:
    stems = [p[0].stem for p in SegmentationFolder(root, 32, False).pairs]
    if len(stems) < 2:
        return None, None  # one image: train and evaluate on it
    order = np.random.default_rng(seed).permutation(len(stems))
    n_val = min(len(stems) - 1, max(1, round(fraction * len(stems))))
    return [stems[i] for i in order[n_val:]], [stems[i] for i in order[:n_val]]


def confusion_of_pixels(logits: Tensor, masks: Tensor, weight: Tensor, num_classes: int) -> Tensor:
    """(C, C) counts of (true, predicted) over the pixels not labelled 255 of the weighted samples."""
    pred = logits.argmax(1)
    keep = (masks != IGNORE) & (weight[:, None, None] > 0)
    if (masks[keep] >= num_classes).any():
        raise ValueError(f"a mask holds label {int(masks[keep].max())}, the model has {num_classes} classes")
    return torch.bincount(masks[keep] * num_classes + pred[keep], minlength=num_classes**2).reshape(
        num_classes, num_classes)


class SegmentTask(Task):
    """``mixmim segment``: UperNet on the pretrained encoder, evaluated by mIoU."""

    name = "segment"
    columns = ["miou", "pixel_acc"]

    def __init__(self, config: SegmentRunConfig):
        self.config = config
        self.pretrained = resolve_model(config)
        side = cast(int, config.model.img_size)  # resolve_model set it
        d = config.data
        if not d.path:
            raise ValueError("mixmim segment: give the folder with images/ and masks/ (--data, data.path)")
        if d.val_path:
            self.train_set, self.val_set = SegmentationFolder(d.path, side, True), SegmentationFolder(d.val_path, side,
                                                                                                      False)
        else:
            train_stems, val_stems = _split_stems(d.path, d.val_fraction, config.train.seed)
            self.train_set = SegmentationFolder(d.path, side, True, train_stems)
            self.val_set = SegmentationFolder(d.path, side, False, val_stems)
        self.num_classes = config.segment.num_classes or infer_num_classes(self.train_set)
        self.best: dict[str, Any] = {}
        self.last: dict[str, float] = {}

    def build_model(self) -> nn.Module:
        m = self.config.model
        encoder = build_encoder(self.pretrained, img_size=m.img_size, window_size=m.window_size, num_classes=0,
                                drop_path_rate=m.drop_path_rate, **m.options)
        self.model = UperNet(encoder, self.num_classes, self.config.segment.channels)
        return self.model

    def dataset(self) -> Dataset:
        return self.train_set

    def collate(self, items: list[dict]) -> dict:
        from mixmim.transfer.data import collate_labelled

        return collate_labelled(items)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        o = self.config.optim
        return layer_decay_groups(model, o.weight_decay, o.layer_decay or 1.0)

    def repeated_blocks(self, model: nn.Module) -> list[nn.Module]:
        blocks = getattr(cast(UperNet, model).backbone.encoder, "repeated_blocks", None)  # build_model's
        return list(blocks()) if callable(blocks) else []

    def step(self, model: nn.Module, batch: dict) -> StepOutput:
        images = batch["image"]
        if len(images) == 1:
            self.model.head.eval()  # BatchNorm statistics of one image are degenerate
        logits = model(images)
        return StepOutput(F.cross_entropy(logits.float(), batch["label"], ignore_index=IGNORE))

    def evaluation_steps(self, total_steps: int, steps_per_epoch: int) -> set[int]:
        return every_epochs(self.config.eval.every_epochs, total_steps, steps_per_epoch)

    @torch.no_grad()
    def evaluate(self, run: RunContext, step: int) -> dict[str, float]:
        """mIoU and pixel accuracy over every pixel whose label is not 255, counts summed over processes."""
        matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long, device=run.device)
        batch = self.config.eval.batch_size or run.micro_batch
        with run.full_module() as model:
            was = model.training
            model.eval()
            for images, masks, weight in shard_loader(self.val_set, batch, self.config.train.num_workers):
                with run.autocast():
                    logits = model(images.to(run.device))
                matrix += confusion_of_pixels(logits.float(), masks.to(run.device), weight.to(run.device),
                                              self.num_classes)
            model.train(was)
        matrix = sum_over_processes(matrix)
        self.last = {**segmentation_scores(matrix.cpu()), "step": step}
        if self.config.eval.select == "best" and self.last["miou"] > self.best.get("miou", -1.0):
            self.best = dict(self.last)
            self._save(run, "best.pt")
        log.info("step %d: mIoU %.2f%%, pixel accuracy %.2f%%", step, 100 * self.last["miou"],
                 100 * self.last["pixel_acc"])
        return {"miou": self.last["miou"], "pixel_acc": self.last["pixel_acc"]}

    def _save(self, run: RunContext, name: str) -> None:
        state = run.full_state_dict()  # every process (FSDP gathers)
        if run.is_main:
            atomic_write(run.run_dir / name, lambda tmp: torch.save(
                {"format": "mixmim-upernet/2", "model": state, "num_classes": self.num_classes,
                 "img_size": self.config.model.img_size, "step": run.step}, tmp))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "num_classes": self.num_classes}

    def load_state_dict(self, state: dict[str, Any], path: Any = None) -> None:
        saved = state.get("num_classes")
        if saved is not None and saved != self.num_classes:
            from mixmim.config import ConfigError

            raise ConfigError(f"--resume: {path} was trained for {saved} classes, the data now has {self.num_classes}")
        self.best = dict(state.get("best") or {})

    def finish(self, run: RunContext, summary: dict[str, Any]) -> None:
        if run.stopped is not None:
            return
        self._save(run, "model.pt")
        kept = self.best if self.config.eval.select == "best" and self.best else self.last
        results = {"miou": kept.get("miou"), "pixel_acc": kept.get("pixel_acc"), "step": kept.get("step"),
                   "select": self.config.eval.select, "last": self.last, "num_classes": self.num_classes,
                   "train_images": len(self.train_set), "val_images": len(self.val_set),
                   "weights": self.pretrained.source}
        if run.is_main:
            write_json(run.run_dir / "results.json", results)
        summary["results"] = results

    def describe(self, run: RunContext) -> str:
        c = self.config
        return (f"{c.name}: UperNet on {self.pretrained.source} weights of {c.model.name} ({c.model.img_size} px): "
                f"{len(self.train_set)} training / {len(self.val_set)} evaluation images, {self.num_classes} classes")
