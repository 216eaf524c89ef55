"""Semantic segmentation with a UperNet head on the encoder (MixMIM section 3 and 8: ADE20K with
UperNet, layer-wise lr decay 0.85/0.9 for B/L, BEiT's other settings).

UperNet (Xiao et al. 2018, as implemented in mmsegmentation): a pyramid pooling module (scales
1, 2, 3, 6) on the last stage, lateral 1x1 convolutions and a top-down feature pyramid on the
others, 3x3 convolutions per level, all levels upsampled to stride 4 and fused by a 3x3 convolution,
dropout 0.1 and a 1x1 classifier; logits are upsampled to the input size.

Data: ``DIR/images/<stem>.<ext>`` and ``DIR/masks/<stem>.png`` (label maps, 255 = ignore).
Training follows BEiT's recipe in spirit at small scale: AdamW, layer decay, linear warmup then
linear (poly, power 1) decay; augmentation is resize to the model's size plus horizontal flip.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.scheduler import PolyLRScheduler
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import Conv2dNormActivation
from tqdm import tqdm

from mixmim.data.images import IMAGE_EXTENSIONS, BadImage, load_rgb
from mixmim.data.labelled import IMAGENET_MEAN, IMAGENET_STD
from mixmim.evaluation.layer_decay import create_optimizer
from mixmim.evaluation.metrics import MetricsCSV, segmentation_scores, write_json
from mixmim.interop.pretrained import TaskConfig, build_encoder, input_size, read_pretrained
from mixmim.evaluation.runtime import autocast, pick_device, seed_everything
from mixmim.models.dense import MixMIMBackbone
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
        inner = self.backbone.encoder.group_matcher(coarse)
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
        except (OSError, SyntaxError) as exc:
            raise ValueError(f"cannot read mask {path}: {exc}") from None

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image_path, _ = self.pairs[index]
        try:
            image = load_rgb(image_path)
        except BadImage as exc:
            raise ValueError(f"cannot read image {image_path}: {exc}") from None
        mask = self.read_mask(index)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask of {image_path.name} is {mask.shape[1]}x{mask.shape[0]}, the image "
                             f"{image.width}x{image.height}")
        x = torch.from_numpy(np.asarray(image.resize((self.size, self.size), Image.BICUBIC), dtype=np.float32))
        x = (x.permute(2, 0, 1) / 255.0 - self.mean) / self.std
        y = torch.from_numpy(mask)[None, None].float()
        y = F.interpolate(y, size=(self.size, self.size), mode="nearest")[0, 0].long()
        if self.train and torch.rand(()) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y


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


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
                          amp: bool = True) -> dict[str, float]:
    """mIoU and pixel accuracy over all pixels whose label is not 255."""
    model.eval()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for images, masks in loader:
        with autocast(device, amp):
            pred = model(images.to(device)).argmax(1).cpu()
        keep = masks != IGNORE
        if (masks[keep] >= num_classes).any():
            raise ValueError(f"a mask holds label {int(masks[keep].max())}, the model has {num_classes} classes")
        matrix += torch.bincount(masks[keep] * num_classes + pred[keep], minlength=num_classes**2).reshape(
            num_classes, num_classes)
    return segmentation_scores(matrix)


@dataclass
class SegmentConfig(TaskConfig):
    """Options of ``mixmim segment``."""

    val_data: str | None = None
    output: str = "runs/segment"
    num_classes: int | None = None  # None: from the masks
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.05
    layer_decay: float = 0.85
    drop_path: float = 0.1
    warmup_iters: int = 50
    channels: int = 512


def _split_stems(root: str, fraction: float, seed: int) -> tuple[list[str] | None, list[str] | None]:
    stems = [p[0].stem for p in SegmentationFolder(root, 32, False).pairs]
    if len(stems) < 2:
        return None, None  # one image: train and evaluate on it
    order = np.random.default_rng(seed).permutation(len(stems))
    n_val = min(len(stems) - 1, max(1, round(fraction * len(stems))))
    return [stems[i] for i in order[n_val:]], [stems[i] for i in order[:n_val]]


def segment(cfg: SegmentConfig) -> dict[str, Any]:
    """Train UperNet on the encoder; evaluate mIoU and pixel accuracy every epoch."""
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    pretrained = read_pretrained(cfg.checkpoint, cfg.model)
    img_size, side = input_size(pretrained, cfg.img_size)
    if cfg.val_data:
        train_set = SegmentationFolder(cfg.data, side, True)
        val_set = SegmentationFolder(cfg.val_data, side, False)
    else:
        train_stems, val_stems = _split_stems(cfg.data, cfg.val_fraction, cfg.seed)
        train_set = SegmentationFolder(cfg.data, side, True, train_stems)
        val_set = SegmentationFolder(cfg.data, side, False, val_stems)
    num_classes = cfg.num_classes or infer_num_classes(train_set)
    encoder = build_encoder(pretrained, img_size=img_size, window_size=cfg.window_size, num_classes=0,
                            drop_path_rate=cfg.drop_path)
    model = UperNet(encoder, num_classes, cfg.channels).to(device)
    batch = min(cfg.batch_size, len(train_set))
    # BatchNorm needs two samples per batch in training mode.
    train_loader = DataLoader(train_set, batch_size=max(batch, 2) if len(train_set) > 1 else 1, shuffle=True,
                              drop_last=len(train_set) > 1, num_workers=cfg.num_workers,
                              generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = DataLoader(val_set, batch_size=batch, num_workers=cfg.num_workers)
    optimizer = create_optimizer(model, cfg.lr, cfg.weight_decay, cfg.layer_decay)
    total = cfg.epochs * len(train_loader)
    warmup = min(cfg.warmup_iters, max(total - 1, 0))
    scheduler = PolyLRScheduler(optimizer, t_initial=max(1, total - warmup), power=1.0, lr_min=0.0,
                                warmup_t=warmup, warmup_lr_init=1e-6, warmup_prefix=True, t_in_epochs=False)
    out = Path(cfg.output)
    write_json(out / "config.json", {**asdict(cfg), "num_classes": num_classes, "img_size": img_size,
                                     "train_images": len(train_set), "val_images": len(val_set),
                                     "weights": pretrained.source})
    metrics = MetricsCSV(out / "metrics.csv")
    step, scores, best = 0, {}, {"miou": -1.0}
    for epoch in range(cfg.epochs):
        loss_sum, n = 0.0, 0
        for images, masks in tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                                  disable=not cfg.progress):
            images, masks = images.to(device), masks.to(device)
            model.train()
            if len(images) == 1:
                model.head.eval()  # BatchNorm statistics of one image are degenerate
            with autocast(device, cfg.amp):
                logits = model(images)
            loss = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            loss_sum, n = loss_sum + loss.item(), n + 1
        scores = evaluate_segmentation(model, val_loader, num_classes, device, cfg.amp)
        metrics.add({"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(n, 1), **scores})
        if scores["miou"] > best["miou"]:
            best = {"epoch": epoch + 1, **scores}
            atomic_write(out / "best.pt", lambda tmp: torch.save(
                {"format": "mixmim-upernet/1", "model": model.state_dict(), "num_classes": num_classes,
                 "img_size": img_size, "epoch": epoch + 1}, tmp))
    results = {"miou": best["miou"], "pixel_acc": best["pixel_acc"], "best_epoch": best["epoch"],
               "last_epoch": scores, "num_classes": num_classes, "train_images": len(train_set),
               "val_images": len(val_set), "weights": pretrained.source}
    write_json(out / "results.json", results)
    return results
