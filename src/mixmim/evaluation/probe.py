"""MAE's linear probe fitted on feature tensors in memory: BatchNorm without affine parameters + a
linear layer on frozen pooled features (MAE appendix A.3). What the pretraining monitor and the
fine-tuning head's initialisation use; ``mixmim linprobe`` runs the same head on the training loop
(:mod:`mixmim.transfer.linprobe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import Tensor, nn

from mixmim.evaluation.metrics import topk_correct


def probe_head(dim: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d(affine=False, eps 1e-6) + Linear with weights ~ N(0, 0.01) truncated (MAE)."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    linear = cast(nn.Linear, head[1])
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return head


@torch.no_grad()
def _score(head: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float, float, Tensor]:
    head.eval()
    logits = head(x)
    c1, c5 = topk_correct(logits, y, (1, 5))
    return 100.0 * c1 / len(y), 100.0 * c5 / len(y), float(F.cross_entropy(logits, y)), logits.argmax(1)


@dataclass
class ProbeResult:
    """The kept head (last epoch, or the best one with ``select="best"``), its test accuracies and the
    per-epoch rows."""

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
              weight_decay: float = 0.0, optimizer: str = "sgd", seed: int = 0,
              select: str = "last") -> ProbeResult:
    """Train the probe on feature tensors and evaluate every epoch; keep the last head (``select="best"``:
    the epoch best on the test features, a choice made on the split it is scored on)."""
    if optimizer not in ("sgd", "lars"):
        raise ValueError(f"optimizer={optimizer!r}: expected 'sgd' or 'lars'")
    device = train_x.device
    head = probe_head(train_x.shape[1], num_classes).to(device)
    batch = min(batch_size, len(train_x))
    steps = max(1, len(train_x) // batch)
    lr = lr if lr is not None else base_lr * batch / 256
    extra: dict[str, Any] = {"always_adapt": True} if optimizer == "lars" else {}  # timm's LARS skips wd == 0 otherwise
    opt = create_optimizer_v2(head, opt=optimizer, lr=lr, momentum=0.9, weight_decay=weight_decay, **extra)
    total = epochs * steps
    warmup = min(int(round(warmup_epochs * steps)), total - 1)
    scheduler = CosineLRScheduler(opt, t_initial=max(1, total - warmup), lr_min=0.0, warmup_t=warmup,
                                  warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    best: dict[str, Any] = {"acc1": -1.0}
    rows: list[dict[str, Any]] = []
    step = 0
    for epoch in range(epochs):
        head.train()
        order = torch.randperm(len(train_x), generator=generator).to(device)
        loss_sum, hits = 0.0, 0
        for i in range(steps):
            idx = order[i * batch:(i + 1) * batch]
            logits = head(train_x[idx])
            loss = F.cross_entropy(logits, train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            scheduler.step_update(step)
            loss_sum += loss.item()
            hits += int((logits.argmax(1) == train_y[idx]).sum())
        acc1, acc5, test_loss, _ = _score(head, test_x, test_y)
        rows.append({"epoch": epoch + 1, "train_loss": loss_sum / steps, "train_acc1": 100.0 * hits / (steps * batch),
                     "lr": opt.param_groups[0]["lr"], "test_loss": test_loss, "acc1": acc1, "acc5": acc5})
        if select == "best" and acc1 > best["acc1"]:
            best = {"epoch": epoch + 1, "acc1": acc1,
                    "state": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}}
    last_acc1 = rows[-1]["acc1"]
    if select == "best":
        head.load_state_dict(best.pop("state"))
    acc1, acc5, _, predictions = _score(head, test_x, test_y)
    return ProbeResult(head, acc1, acc5, best.get("epoch", epochs), last_acc1, lr, rows, predictions)
