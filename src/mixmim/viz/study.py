"""Pictures of a study: accuracy against pretraining time per arm, the arms' loss curves and their
monitor (k-NN during pretraining) curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRIC_TITLES = {"knn": "k-NN", "linprobe": "linear probe", "finetune_1pct": "fine-tune, 1% labels",
                 "finetune_10pct": "fine-tune, 10% labels"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from mixmim.utils.files import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    _plt().close(fig)
    return path


def _colours(plt, n: int):
    """Distinct colours for n arms: tab10 up to ten; beyond (a study with every ablation has 12), tab20's
    strong colours first, then their light partners."""
    if n <= 10:
        return lambda i: plt.get_cmap("tab10")(i % 10)
    cmap = plt.get_cmap("tab20")
    return lambda i: cmap((2 * i) % 20 + (2 * i // 20) % 2)


def accuracy_vs_time(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """One panel per metric: each arm's accuracies (one dot per seed) against its pretraining wall
    time in minutes; the random-initialisation floor sits at 0 minutes."""
    plt = _plt()
    metrics = [m for m in METRIC_TITLES if any(r["metric"] == m for r in rows)]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    colours = _colours(plt, len(arms))
    for ax, metric in zip(axes[0], metrics):
        for i, arm in enumerate(arms):
            points = [(r.get("pretrain_seconds", 0.0) / 60, 100 * r["value"]) for r in rows
                      if r["arm"] == arm and r["metric"] == metric]
            if points:
                xs, ys = zip(*points)
                ax.scatter(xs, ys, color=colours(i), label=arm, s=28, alpha=0.85)
        ax.set_title(METRIC_TITLES[metric], fontsize=10)
        ax.set_xlabel("pretraining time (min)")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
    # One legend for every arm: an arm measured on some metrics only (k-NN and probe) has no dot on
    # the last panel, so that panel's own legend would leave it out.
    handles = {h.get_label(): h for ax in axes[0] for h in ax.collections}
    axes[0][-1].legend([handles[a] for a in arms if a in handles], [a for a in arms if a in handles],
                       fontsize=7, frameon=False, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path))


def run_curves(runs: dict[str, Path], path: str | Path, column: str, ylabel: str, title: str = "") -> Path | None:
    """``column`` of each run's metrics CSV against the step, one line per run (``runs``: label -> CSV)."""
    from mixmim.utils.metrics_csv import read_metrics
    from mixmim.viz.curves import _smooth

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    colours = _colours(plt, len(runs))
    for i, (label, run) in enumerate(runs.items()):
        csv = Path(run)
        if not csv.is_file():
            continue
        m = read_metrics(csv)
        points = [(s, v) for s, v in zip(m.get("step", []), m.get(column, [])) if v == v]
        if not points:
            continue
        xs, ys = zip(*points)
        style = dict(color=colours(i), label=label, lw=1.5)
        if column == "loss":
            ax.plot(xs, _smooth(list(ys)), **style)
        else:
            ax.plot(xs, ys, marker="o", ms=3, **style)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("pretraining step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path))
