"""Supervised fine-tuning of a pretrained encoder for classification (MixMIM section 3 and Table 12;
MixMAE appendix A.1).

AdamW (0.9, 0.999), lr = base lr 5e-4 x batch / 256, weight decay 0.05, layer-wise lr decay 0.7,
drop path 0.1/0.2/0.3 for B/L/H, RandAug(9, 0.5), Mixup 0.8, CutMix 1.0, label smoothing 0.1,
random erasing 0.25, 5 warmup epochs then cosine decay per iteration. Evaluated every epoch
(top-1/top-5); the best epoch's weights are kept; at the end the best model's confusion matrix and
per-class accuracy are written. ``eval_every_epoch=False`` evaluates once, after the last epoch (what
a study reports, with no choice of epoch made on the test set).

Files in the output folder: ``config.json``, ``metrics.csv``, ``best.pt`` (format
``mixmim-classifier/1``: ``model`` state dict, ``encoder_config``, ``classes``), ``results.json``,
``confusion_matrix.csv/.png``, ``per_class_accuracy.csv``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler
from torch import nn
from tqdm import tqdm

from mixmim.data.labelled import RAND_AUGMENT, eval_transform, load_splits, make_loader, make_mixup, train_transform
from mixmim.evaluation.layer_decay import create_optimizer
from mixmim.evaluation.metrics import MetricsCSV, write_classification_report, write_json
from mixmim.interop.pretrained import ClassificationConfig, build_encoder, input_size, read_pretrained
from mixmim.evaluation.runtime import autocast, evaluate, pick_device, seed_everything
from mixmim.models.registry import FINETUNE_DROP_PATH, encoder_config
from mixmim.utils.files import atomic_write

log = logging.getLogger("mixmim")
CLASSIFIER_FORMAT = "mixmim-classifier/1"


@dataclass
class FinetuneConfig(ClassificationConfig):
    """Every option of ``mixmim finetune``; defaults are Table 12's except the batch size."""

    output: str = "runs/ft"
    epochs: int = 100
    batch_size: int = 64
    base_lr: float = 5e-4
    lr: float | None = None  # absolute; overrides base_lr x batch / 256
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.7
    drop_path: float | None = None  # None: FINETUNE_DROP_PATH of the model (0.1 when unknown)
    warmup_epochs: float = 5.0
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    auto_augment: str | None = RAND_AUGMENT
    re_prob: float = 0.25
    clip_grad: float | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop scale range
    eval_every_epoch: bool = True  # False: evaluate only after the last epoch (no test-set selection)


def _checkpoint_payload(model: nn.Module, classes: list[str], epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"format": CLASSIFIER_FORMAT, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "encoder_config": encoder_config(model), "classes": classes, "epoch": epoch, "metrics": metrics}


def _save(path: Path, payload: dict[str, Any]) -> Path:
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run the fine-tuning described by ``cfg``; returns the final metrics (also in results.json)."""
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"epochs={cfg.epochs} and batch_size={cfg.batch_size} must be at least 1")
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.output)
    pretrained = read_pretrained(cfg.checkpoint, cfg.model)
    img_size, side = input_size(pretrained, cfg.img_size)
    splits = load_splits(cfg.data, train_transform(side, cfg.auto_augment, cfg.re_prob, cfg.crop_scale),
                         eval_transform(side, cfg.crop_pct), cfg.limit_train, cfg.limit_test, cfg.val_fraction,
                         cfg.seed, cfg.balanced)
    num_classes = len(splits.classes)
    drop_path = cfg.drop_path if cfg.drop_path is not None else FINETUNE_DROP_PATH.get(pretrained.model_name, 0.1)
    model = build_encoder(pretrained, img_size=img_size, window_size=cfg.window_size, num_classes=num_classes,
                          drop_path_rate=drop_path)
    # A near-zero head leaves the pretrained features in charge at the start (MAE's fine-tuning init).
    head = model.get_classifier()
    nn.init.trunc_normal_(head.weight, std=2e-5)
    if head.bias is not None:
        nn.init.zeros_(head.bias)
    model.to(device)

    train_loader = make_loader(splits.train, cfg.batch_size, True, cfg.num_workers, cfg.seed)
    test_loader = make_loader(splits.test, cfg.batch_size, False, cfg.num_workers)
    steps = len(train_loader)
    batch = train_loader.batch_size
    lr = cfg.lr if cfg.lr is not None else cfg.base_lr * batch / 256
    optimizer = create_optimizer(model, lr, cfg.weight_decay, cfg.layer_decay, betas=(0.9, 0.999))
    warmup = min(int(round(cfg.warmup_epochs * steps)), cfg.epochs * steps - 1)
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, cfg.epochs * steps - warmup), lr_min=cfg.min_lr,
                                  warmup_t=warmup, warmup_lr_init=cfg.warmup_lr, warmup_prefix=True,
                                  t_in_epochs=False)
    mixup = make_mixup(num_classes, cfg.mixup, cfg.cutmix, cfg.smoothing)
    criterion = (SoftTargetCrossEntropy() if mixup is not None
                 else LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else nn.CrossEntropyLoss())

    run_info = {**dataclasses.asdict(cfg), "img_size": img_size, "drop_path": drop_path, "lr": lr,
                "effective_batch_size": batch, "num_classes": num_classes, "classes": splits.classes,
                "train_samples": len(splits.train), "test_samples": len(splits.test),
                "weights": pretrained.source, "device": str(device), "model_config": encoder_config(model)}
    write_json(out / "config.json", run_info)
    log.info("fine-tuning %s weights on %s: %d train / %d test images, %d classes, lr %.3g, device %s",
             pretrained.source, cfg.data, len(splits.train), len(splits.test), num_classes, lr, device)

    metrics_csv = MetricsCSV(out / "metrics.csv")
    best: dict[str, Any] = {"acc1": -1.0}
    step = 0
    for epoch in range(cfg.epochs):
        model.train()
        loss_sum, seen, start = 0.0, 0, time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
        for images, targets in bar:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if mixup is not None:
                if len(images) % 2:  # Mixup pairs the batch with its flip: it needs an even count
                    images, targets = images[:-1], targets[:-1]
                images, targets = mixup(images, targets)
            with autocast(device, cfg.amp):
                loss = criterion(model(images).float(), targets)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}, step {step}; "
                                         "lower --base-lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            loss_sum, seen = loss_sum + loss.item() * len(images), seen + len(images)
            rate = seen / max(time.perf_counter() - start, 1e-9)
            top_lr = max(g["lr"] for g in optimizer.param_groups)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{top_lr:.2e}", img_s=f"{rate:.1f}")
        train_time = time.perf_counter() - start
        row = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(seen, 1),
               "lr": max(g["lr"] for g in optimizer.param_groups), "img_per_s": seen / max(train_time, 1e-9)}
        if not cfg.eval_every_epoch and epoch + 1 < cfg.epochs:
            metrics_csv.add(row)
            log.info("epoch %d/%d: train loss %.4f", epoch + 1, cfg.epochs, row["train_loss"])
            continue
        result = evaluate(model, test_loader, device, num_classes, cfg.amp, cfg.progress)
        row.update(test_loss=result["loss"], acc1=result["acc1"], acc5=result["acc5"])
        metrics_csv.add(row)
        log.info("epoch %d/%d: train loss %.4f, test loss %.4f, top-1 %.2f%%, top-5 %.2f%%", epoch + 1, cfg.epochs,
                 row["train_loss"], result["loss"], result["acc1"], result["acc5"])
        if cfg.progress:
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}  "
                       f"test top-1 {result['acc1']:.2f}%  top-5 {result['acc5']:.2f}%")
        if result["acc1"] > best["acc1"]:
            best = {"epoch": epoch + 1, "acc1": result["acc1"], "acc5": result["acc5"], "loss": result["loss"]}
            _save(out / "best.pt", _checkpoint_payload(model, splits.classes, epoch + 1, best))

    # Report on the kept (best) weights, as the checkpoint a user would deploy.
    model.load_state_dict(torch.load(out / "best.pt", map_location="cpu", weights_only=False)["model"])
    final = evaluate(model, test_loader, device, num_classes, cfg.amp, cfg.progress)
    files = write_classification_report(out, final["confusion"], splits.classes)
    results = {"best_epoch": best["epoch"], "acc1": final["acc1"], "acc5": final["acc5"], "loss": final["loss"],
               "last_epoch_acc1": row["acc1"], "test_samples": final["samples"], "weights": pretrained.source,
               "files": {k: str(v) for k, v in files.items()}}
    write_json(out / "results.json", results)
    return results
