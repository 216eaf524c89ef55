"""Reading a run's ``metrics.csv`` (one row per logged step; the loop writes it): every reader of the
file (curves, model cards, the study, a resumed monitor) goes through :func:`read_metrics`."""

from __future__ import annotations

import csv
from pathlib import Path


def read_metrics(path: str | Path) -> dict[str, list[float]]:
    """``{column: values}`` of a metrics.csv, one value per row; an empty cell is NaN, so every column
    lines up with ``step``."""
    columns: dict[str, list[float]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                try:
                    columns.setdefault(key, []).append(float(value))
                except (TypeError, ValueError):
                    columns.setdefault(key, []).append(float("nan"))
    return columns
