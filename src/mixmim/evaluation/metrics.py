"""Classification and segmentation metrics and the files they are written to.

Top-1/top-5 accuracy, confusion matrix (CSV and PNG), per-class accuracy, a metrics.csv that is
rewritten atomically after every epoch, mean IoU and pixel accuracy.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mixmim.utils.files import atomic_write, atomic_write_text


def topk_correct(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """Number of samples whose target is among the ``k`` highest scores, for each k (k is capped at
    the number of classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top == targets[:, None]
    return [int(hits[:, :min(k, kmax)].any(dim=1).sum()) for k in ks]


def confusion_matrix(predictions: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """(num_classes, num_classes) counts, rows = true class, columns = predicted class."""
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_accuracy(matrix: Tensor) -> list[float]:
    totals = matrix.sum(dim=1).clamp_min(1)
    return (matrix.diag().double() / totals.double()).tolist()


def _csv_text(rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def write_classification_report(folder: Path, matrix: Tensor, classes: Sequence[str]) -> dict[str, Path]:
    """``confusion_matrix.csv``, ``confusion_matrix.png`` and ``per_class_accuracy.csv`` in ``folder``."""
    folder = Path(folder)
    rows = [["true \\ predicted", *classes]] + [[c, *map(int, r)] for c, r in zip(classes, matrix.tolist())]
    paths = {"confusion_csv": atomic_write_text(folder / "confusion_matrix.csv", _csv_text(rows))}
    acc = per_class_accuracy(matrix)
    per_class = [["class", "accuracy", "samples"]] + [
        [c, f"{a:.4f}", int(n)] for c, a, n in zip(classes, acc, matrix.sum(dim=1).tolist())]
    paths["per_class_csv"] = atomic_write_text(folder / "per_class_accuracy.csv", _csv_text(per_class))
    paths["confusion_png"] = atomic_write(folder / "confusion_matrix.png",
                                          lambda tmp: _plot_confusion(tmp, matrix, classes))
    return paths


def _plot_confusion(path: Path, matrix: Tensor, classes: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    norm = matrix.double() / matrix.sum(dim=1, keepdim=True).clamp_min(1).double()
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 40:  # labels and counts become unreadable beyond that
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


class MetricsCSV:
    """Rows of per-epoch metrics, rewritten atomically as a whole after each epoch."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        table = [keys] + [[_fmt(r.get(k, "")) for k in keys] for r in self.rows]
        atomic_write_text(self.path, _csv_text(table))


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def _strict(value: Any) -> Any:
    """NaN and infinities as null: JSON has no such numbers (COCOeval's "no object of this size" is NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """``data`` as strict JSON (non-finite numbers as null), written atomically."""
    return atomic_write_text(path, json.dumps(_strict(data), indent=2, allow_nan=False) + "\n")


def segmentation_scores(matrix: Tensor) -> dict[str, float]:
    """mIoU (over classes present in the labels or predictions) and pixel accuracy from a confusion
    matrix of pixels."""
    matrix = matrix.double()
    inter = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - inter
    valid = union > 0
    iou = inter[valid] / union[valid]
    total = matrix.sum()
    return {"miou": float(iou.mean()) if valid.any() else 0.0,
            "pixel_acc": float(inter.sum() / total) if total > 0 else 0.0}
