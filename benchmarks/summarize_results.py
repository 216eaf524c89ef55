"""Print one table from the JSON files the benchmarks write (``gpu_suite.sh``'s last step): every
throughput row (images/s, ratio to its base variant, peak memory, MFU, and the GPU-hours that the
papers' 300-epoch ImageNet-1K pretraining would take at that rate, an extrapolation) and the pass /
fail lines of the correctness checks.

    python benchmarks/summarize_results.py benchmarks/results/cuda_*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

IMAGENET_TRAIN = 1_281_167
EPOCHS = 300


def gpu_hours(images_per_s: float, epochs: int = EPOCHS) -> float:
    """Hours on one device for ``epochs`` passes over ImageNet-1K's training set at ``images_per_s``."""
    return IMAGENET_TRAIN * epochs / images_per_s / 3600


def rows_of(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    lines = []
    if "results" in data and isinstance(data["results"], list):  # pretrain_throughput.py
        for r in data["results"]:
            if "images_per_s" not in r:
                cells = f"| {r.get('model')} | {r.get('variant')} | {r.get('batch')} |"
                lines.append(f"{cells} skipped or failed | | | | |")
                continue
            mfu = r.get("mfu")
            mem = r.get("peak_memory_bytes", 0) / 2**30
            lines.append(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['images_per_s']:.1f} | "
                         f"{r.get('speed_vs_baseline', float('nan')):.2f} | {mem:.2f} GiB | "
                         f"{'' if mfu is None else f'{100 * mfu:.1f}%'} | {gpu_hours(r['images_per_s']):.0f} |")
    if "golden" in data:
        for impl, g in data["golden"].items():
            lines.append(f"check golden/{impl}: {'pass' if g['pass'] else 'FAIL'} (loss rel {g['loss_rel']:.1e}, "
                         f"reconstruction {g['reconstruction_abs']:.1e}, logits {g['logits_abs']:.1e})")
    if "train" in data:
        t = data["train"]
        lines.append(f"check train {t['model']} {t['amp']}: {'pass' if t['pass'] else 'FAIL'} "
                     f"(loss {t['first_mean']:.3f} -> {t['last_mean']:.3f} over {t['steps']} steps)")
    if "peak" in data:
        lines.append(f"measured {data['peak']['amp']} matmul peak: {data['peak']['tflops']:.0f} TFLOP/s")
    if "worst_rel" in data:
        lines.append(f"check flex/fast vs reference: {'pass' if data['pass'] else 'FAIL'} "
                     f"(worst relative error {data['worst_rel']:.1e})")
    return lines


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not paths:
        print("usage: summarize_results.py RESULT.json ...", file=sys.stderr)
        return 2
    table = ["| model | variant | batch | img/s | x base | peak memory | MFU | 300-epoch IN-1K GPU-hours "
             "(extrapolated) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    notes = []
    for path in paths:
        for line in rows_of(path):
            (table if line.startswith("|") else notes).append(line)
    print("\n".join(notes + [""] + table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
