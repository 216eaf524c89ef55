"""Linear probing of a frozen encoder, as MAE does: the pooled final-norm features go through
BatchNorm without affine parameters and a linear layer; only that layer learns.

Differences from MAE's recipe (LARS, batch 16384, 90 epochs, RandomResizedCrop + flip through the
frozen encoder), chosen so that CPU runs take minutes: the features are computed once with the
evaluation transform (no augmentation) and cached, and the optimiser is SGD with momentum 0.9
(base lr 0.1 x batch / 256, no weight decay, warmup then cosine); ``optimizer="lars"`` uses timm's LARS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import Tensor, nn

from mixmim.evaluation.knn import frozen_features
from mixmim.evaluation.metrics import MetricsCSV, confusion_matrix, topk_correct, write_classification_report, write_json
from mixmim.interop.pretrained import ClassificationConfig
from mixmim.evaluation.runtime import pick_device
from mixmim.utils.files import atomic_write


@dataclass
class LinProbeConfig(ClassificationConfig):
    """Options of ``mixmim linprobe`` (MAE's probe; SGD by default, see the module docstring)."""

    output: str = "runs/linprobe"
    epochs: int = 90
    batch_size: int = 256
    base_lr: float = 0.1
    lr: float | None = None
    warmup_epochs: float = 10.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"


def probe_head(dim: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d(affine=False, eps 1e-6) + Linear with weights ~ N(0, 0.01) truncated (MAE)."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


@torch.no_grad()
def _score(head: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float, float, Tensor]:
    head.eval()
    logits = head(x)
    c1, c5 = topk_correct(logits, y, (1, 5))
    return 100.0 * c1 / len(y), 100.0 * c5 / len(y), float(F.cross_entropy(logits, y)), logits.argmax(1)


@dataclass
class ProbeResult:
    """The kept (best-epoch) head, its test accuracies and the per-epoch rows."""

    head: nn.Module
    acc1: float
    acc5: float
    best_epoch: int
    last_epoch_acc1: float
    lr: float
    rows: list[dict[str, Any]]
    predictions: Tensor


def fit_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int, epochs: int = 90,
              batch_size: int = 256, base_lr: float = 0.1, lr: float | None = None, warmup_epochs: float = 10.0,
              weight_decay: float = 0.0, optimizer: str = "sgd", seed: int = 0) -> ProbeResult:
    """Train MAE's probe (BatchNorm without affine + linear) on frozen features; evaluate every epoch
    and keep the best head. The loop of ``mixmim linprobe``, the pretraining monitor and the study."""
    if optimizer not in ("sgd", "lars"):
        raise ValueError(f"optimizer={optimizer!r}: expected 'sgd' or 'lars'")
    device = train_x.device
    head = probe_head(train_x.shape[1], num_classes).to(device)
    batch = min(batch_size, len(train_x))
    steps = max(1, len(train_x) // batch)
    lr = lr if lr is not None else base_lr * batch / 256
    extra = {"always_adapt": True} if optimizer == "lars" else {}  # timm's LARS skips wd == 0 otherwise
    opt = create_optimizer_v2(head, opt=optimizer, lr=lr, momentum=0.9, weight_decay=weight_decay, **extra)
    total = epochs * steps
    warmup = min(int(round(warmup_epochs * steps)), total - 1)
    scheduler = CosineLRScheduler(opt, t_initial=max(1, total - warmup), lr_min=0.0, warmup_t=warmup,
                                  warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    best: dict[str, Any] = {"acc1": -1.0}
    rows: list[dict[str, Any]] = []
    step = 0
    acc1 = 0.0
    for epoch in range(epochs):
        head.train()
        order = torch.randperm(len(train_x), generator=generator).to(device)
        loss_sum = 0.0
        for i in range(steps):
            idx = order[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            scheduler.step_update(step)
            loss_sum += loss.item()
        acc1, acc5, test_loss, _ = _score(head, test_x, test_y)
        rows.append({"epoch": epoch + 1, "train_loss": loss_sum / steps, "lr": opt.param_groups[0]["lr"],
                     "test_loss": test_loss, "acc1": acc1, "acc5": acc5})
        if acc1 > best["acc1"]:
            best = {"epoch": epoch + 1, "acc1": acc1, "acc5": acc5,
                    "state": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}}
    last_acc1 = acc1
    head.load_state_dict(best.pop("state"))
    acc1, acc5, _, predictions = _score(head, test_x, test_y)
    return ProbeResult(head, acc1, acc5, best["epoch"], last_acc1, lr, rows, predictions)


def linprobe(cfg: LinProbeConfig) -> dict[str, Any]:
    """Train the probe on cached frozen features; evaluate every epoch, keep the best head."""
    if cfg.optimizer not in ("sgd", "lars"):
        raise ValueError(f"optimizer={cfg.optimizer!r}: expected 'sgd' or 'lars'")
    device = pick_device(cfg.device)
    f = frozen_features(cfg, device)
    train_x, train_y = f.train_x.to(device), f.train_y.to(device)
    test_x, test_y = f.test_x.to(device), f.test_y.to(device)
    num_classes = len(f.classes)
    probe = fit_probe(train_x, train_y, test_x, test_y, num_classes, cfg.epochs, cfg.batch_size, cfg.base_lr, cfg.lr,
                      cfg.warmup_epochs, cfg.weight_decay, cfg.optimizer, cfg.seed)
    out = Path(cfg.output)
    metrics = MetricsCSV(out / "metrics.csv")
    for row in probe.rows:
        metrics.add(row)
    atomic_write(out / "probe.pt", lambda tmp: torch.save(
        {"format": "mixmim-linprobe/1", "head": probe.head.state_dict(), "classes": f.classes,
         "checkpoint": cfg.checkpoint, "img_size": f.img_size}, tmp))
    files = write_classification_report(out, confusion_matrix(probe.predictions.cpu(), test_y.cpu(), num_classes),
                                        f.classes)
    results = {"acc1": probe.acc1, "acc5": probe.acc5, "best_epoch": probe.best_epoch,
               "last_epoch_acc1": probe.last_epoch_acc1, "optimizer": cfg.optimizer, "lr": probe.lr,
               "train_samples": len(train_y), "test_samples": len(test_y), "weights": f.weights,
               "checkpoint": cfg.checkpoint, "img_size": f.img_size, "files": {k: str(v) for k, v in files.items()}}
    write_json(out / "results.json", results)
    return results
