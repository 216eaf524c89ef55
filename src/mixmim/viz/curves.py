"""``loss.png``: training loss (raw and smoothed), learning rate and, when the run was monitored, the
k-NN / linear-probe accuracy of the encoder against the step, from metrics.csv."""

from __future__ import annotations

from pathlib import Path

from mixmim.utils.metrics_csv import read_metrics


def _smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing, so the curve does not start flat."""
    out, last = [], 0.0
    for t, v in enumerate(values, start=1):
        last = weight * last + (1 - weight) * v
        out.append(last / (1 - weight**t))
    return out


def save_loss_curves(metrics_csv: str | Path, path: str | Path, title: str | None = None) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mixmim.utils.files import atomic_write

    m = read_metrics(metrics_csv)
    if not m.get("step"):
        return None
    monitored = [k for k in ("knn", "linprobe") if any(v == v for v in m.get(k, []))]
    fig, axes = plt.subplots(1, 3 if monitored else 2, figsize=(15 if monitored else 10, 3.6))
    ax_loss, ax_lr = axes[0], axes[1]
    steps_loss = [(s, v) for s, v in zip(m["step"], m.get("loss", [])) if v == v]
    if steps_loss:
        xs, ys = zip(*steps_loss)
        ax_loss.plot(xs, ys, color="tab:blue", alpha=0.35, lw=1, label="loss")
        ax_loss.plot(xs, _smooth(list(ys)), color="tab:blue", lw=2, label="smoothed")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("reconstruction loss")
    ax_loss.legend(frameon=False)
    ax_loss.grid(alpha=0.3)
    steps_lr = [(s, v) for s, v in zip(m["step"], m.get("lr", [])) if v == v]
    if steps_lr:
        ax_lr.plot(*zip(*steps_lr), color="tab:orange", lw=2)
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    if monitored:
        ax_acc = axes[2]
        for key, colour in zip(monitored, ("tab:green", "tab:purple")):
            points = [(s, v) for s, v in zip(m["step"], m[key]) if v == v]
            ax_acc.plot(*zip(*points), marker="o", color=colour, lw=2, label="k-NN" if key == "knn" else "linear probe")
            if points[0][0] == 0:
                ax_acc.axhline(points[0][1], color=colour, ls=":", lw=1)
        ax_acc.set_xlabel("step")
        ax_acc.set_ylabel("held-out top-1 (%)")
        ax_acc.set_title("dotted: the starting encoder", fontsize=8)
        ax_acc.legend(frameon=False)
        ax_acc.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
