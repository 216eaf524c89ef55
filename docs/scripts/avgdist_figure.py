"""Draw docs/images/simmim_avgdist.png: SimMIM Figure 3 from this engine's mask generators.

(a) AvgDist (mean distance of masked pixels to the nearest visible pixel, SimMIM section 4.1.2)
against the masked fraction, for the strategies and masked patch sizes of Table 1 at 192 px:
random masking with 4, 8, 16, 32 and 64-px patches, square masking with 32-px patches (one k x k
square, k = 1..5) and BEiT's block-wise masking with 16 and 32-px patches. Every point is the mean
over ``--draws`` masks.
(b) The fine-tuning accuracies of Table 1 (the paper's numbers) against the AvgDist we compute for
the same rows: the paper's Figure 3(b) with our x axis.

Usage (about a minute on a laptop CPU):
    python docs/scripts/avgdist_figure.py [--draws 200] [--output docs/images/simmim_avgdist.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mixmim.evaluation.avgdist import mask_avg_dist  # noqa: E402

IMG = 192  # SimMIM's ablation input size (section 4.1.1)
RATIOS = [r / 10 for r in range(1, 10)]
# (label, strategy, patch size, ratios): the curves of Figure 3(a). A square of k x k cells covers
# k^2 / 36 of the 6 x 6 grid of 32-px cells, so its points sit at those ratios.
# With 64-px patches the image has 9 cells and SimMIM's ceil(9 x 0.9) = 9 masks all of it: no AvgDist.
CURVES = [(f"random ({p})", "random", p, RATIOS if p < 64 else RATIOS[:-1]) for p in (4, 8, 16, 32, 64)]
CURVES += [("square (32)", "square", 32, [k * k / 36 for k in range(1, 6)])]
CURVES += [(f"block-wise ({p})", "block", p, RATIOS) for p in (16, 32)]
# Table 1: (strategy, patch size, ratio) -> fine-tuning top-1 (%), Swin-B, 100 epochs.
TABLE1 = {("square", 32, 4 / 36): 82.6, ("square", 32, 9 / 36): 82.5, ("square", 32, 16 / 36): 82.5,
          ("block", 16, 0.4): 82.7, ("block", 32, 0.4): 82.7, ("block", 16, 0.6): 82.6, ("block", 32, 0.6): 82.6,
          ("block", 16, 0.8): 82.4, ("block", 32, 0.8): 82.5,
          ("random", 4, 0.4): 81.9, ("random", 8, 0.4): 82.0, ("random", 16, 0.4): 82.4,
          ("random", 4, 0.6): 82.0, ("random", 8, 0.6): 82.1, ("random", 16, 0.6): 82.7,
          ("random", 4, 0.8): 82.1, ("random", 8, 0.8): 82.4, ("random", 16, 0.8): 82.8,
          ("random", 64, 0.1): 82.6, ("random", 64, 0.2): 82.6}
TABLE1.update({("random", 32, r): a for r, a in zip(RATIOS, (82.7, 82.8, 82.8, 82.9, 83.0, 82.8, 82.7, 82.4, 82.4))})


def curves(draws: int) -> dict[str, list[tuple[float, float, float]]]:
    """label -> [(requested ratio, masked fraction, AvgDist)]."""
    out = {}
    for label, kind, patch, ratios in CURVES:
        out[label] = [(r, *reversed(mask_avg_dist(kind, r, patch, IMG, draws, seed=i))) for i, r in enumerate(ratios)]
    return out


def draw(data: dict[str, list[tuple[float, float, float]]], output: Path, draws: int) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.4))
    markers = dict(zip(data, "os^Dv*PX"))
    for label, points in data.items():
        a.plot([p[1] for p in points], [p[2] for p in points], marker=markers[label], ms=4, label=label)
    a.set_xlabel("masked fraction of the image")
    a.set_ylabel("AvgDist (pixels)")
    a.set_title(f"(a) AvgDist vs mask ratio, {IMG} px, mean of {draws} masks")
    a.axhspan(10, 20, color="0.9", zorder=0)
    a.grid(alpha=0.3)
    a.legend(fontsize=8)

    lookup = {}
    for (label, kind, patch, _), points in zip(CURVES, data.values()):
        for ratio, _, value in points:
            lookup[(kind, patch, round(ratio, 4))] = (label, value)
    seen = set()
    for (kind, patch, ratio), acc in TABLE1.items():
        label, value = lookup[(kind, patch, round(ratio, 4))]
        b.scatter(value, acc, marker=markers[label], color=f"C{list(data).index(label)}",
                  label=None if label in seen else label)
        seen.add(label)
    b.axvspan(10, 20, color="0.9", zorder=0)
    b.set_xlabel("AvgDist (pixels, this engine's masks)")
    b.set_ylabel("fine-tuning top-1 (%), SimMIM Table 1")
    b.set_title("(b) Table 1 accuracy vs AvgDist")
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    fig.suptitle("SimMIM Figure 3 from mixmim.evaluation.avgdist (shaded: AvgDist 10-20, the paper's good range)",
                 fontsize=10)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=200, help="masks per point")
    parser.add_argument("--output", type=Path, default=Path("docs/images/simmim_avgdist.png"))
    args = parser.parse_args()
    data = curves(args.draws)
    for label, points in data.items():
        print(f"{label:16s} " + "  ".join(f"{f:.2f}:{d:5.1f}" for _, f, d in points))
    draw(data, args.output, args.draws)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
