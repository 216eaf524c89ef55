"""Attention maps drawn over the images (MixedAE Figures 5 and 7): for every image a row, for every
model the map averaged over heads laid over the image and each head's map alone (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def save_attention_grid(pictures: np.ndarray, maps: Sequence[np.ndarray], labels: Sequence[str],
                        path: str | Path, max_heads: int = 6) -> Path:
    """``pictures``: (B, H, W, 3) floats in [0, 1]; ``maps``: per model (B, heads, h, w), each map
    summing to one; ``labels``: per model. Columns: the image, then per model the head-averaged map over
    the image and up to ``max_heads`` heads. Each map is drawn on its own colour scale (its maximum
    bright), so only where a map looks can be compared, not how sharply."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import torch.nn.functional as F

    rows, side = pictures.shape[0], pictures.shape[1]
    heads = [min(m.shape[1], max_heads) for m in maps]
    cols = 1 + sum(1 + h for h in heads)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows + 0.4), squeeze=False)
    for r in range(rows):
        axes[r, 0].imshow(pictures[r])
        col = 1
        for label, m, shown in zip(labels, maps, heads):
            mean = m[r].mean(0, keepdims=True)
            up = F.interpolate(torch.from_numpy(mean)[None], size=(side, side), mode="nearest")[0, 0].numpy()
            axes[r, col].imshow(pictures[r].mean(-1), cmap="gray")
            axes[r, col].imshow(up / max(up.max(), 1e-12), cmap="inferno", alpha=0.6)
            if r == 0:
                axes[r, col].set_title(f"{label}\nmean of {m.shape[1]} heads", fontsize=7)
            for h in range(shown):
                axes[r, col + 1 + h].imshow(m[r, h] / max(float(m[r, h].max()), 1e-12), cmap="inferno")
                if r == 0:
                    axes[r, col + 1 + h].set_title(f"head {h + 1}", fontsize=7)
            col += 1 + shown
    if rows:
        axes[0, 0].set_title("image", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
