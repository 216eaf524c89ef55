"""Print one table from the JSON files the benchmarks write (``pretrain_throughput.py`` and the
sections of ``gpu_check.py``): every throughput row (images/s, ratio to its base variant, peak
memory, MFU, and the GPU-hours that the papers' 300-epoch ImageNet-1K pretraining would take at that
rate, an extrapolation) and the pass / fail lines of the checks.

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
    if data.get("section") == "throughput":  # gpu_check.py
        for r in data.get("rows", []):
            if "images_per_s" not in r:
                lines.append(f"| {r.get('model')} | {r.get('variant')} | {r.get('batch')} | {r.get('error', 'failed')} "
                             "| | | | |")
                continue
            mfu, mem = r.get("mfu_nominal"), r.get("peak_memory_bytes")
            lines.append(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['images_per_s']:.1f} | "
                         f"{r.get('speed_vs_reference', float('nan')):.2f} | "
                         f"{'-' if not mem else f'{mem / 2**30:.2f} GiB'} | "
                         f"{'' if mfu is None else f'{100 * mfu:.1f}%'} | {gpu_hours(r['images_per_s']):.0f} |")
        if "measured_peak" in data:
            lines.append(f"measured bf16 matmul peak: {data['measured_peak']['tflops']:.0f} TFLOP/s "
                         f"(nominal {data.get('nominal_bf16_tflops')})")
    if data.get("section") in ("correctness", "loop", "env", "syncs"):
        lines.append(f"gpu_check {data['section']}: {data.get('status')}"
                     + (f" ({data['error'].splitlines()[0]})" if data.get("error") else "")
                     + (f"; failed: {', '.join(data['failed'])}" if data.get("failed") else ""))
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
