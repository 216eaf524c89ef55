"""The study's report: ``results.md``, ``results.json`` and the pictures (accuracy against time, loss and
monitor curves, reconstructions), and the copies of the curves' data that keep a committed report
redrawable after its runs are deleted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixmim.study.runner import Study
from mixmim.study.spec import DENSE, seeds_of
from mixmim.study.statistics import orderings, summarise


def write_report(study: Study, rows: list[dict[str, Any]], folder: str | Path) -> Path:
    """``results.json`` (per arm, seed and metric, with the commit and the command), ``results.md``
    (mean +- spread per arm and metric, the papers' orderings), the plots and the curves' data
    (``curves/``, see :func:`curve_runs`), in ``folder``."""
    from mixmim.utils.files import atomic_write_text
    from mixmim.viz.study import accuracy_vs_time, run_curves

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    commit = study.commit
    payload = {"commit": commit, "command": study.command, "profile": study.profile.name,
               "results": [{k: r[k] for k in ("arm", "seed", "metric", "value")} |
                           {k: r[k] for k in ("seconds", "pretrain_seconds", "images_seen", "commit",
                                                      "settings", "reused_from", "renamed_from")
                            if k in r} for r in rows]}
    atomic_write_text(folder / "results.json", json.dumps(payload, indent=2) + "\n")
    summary = summarise(rows)
    metrics = list(study.profile.metrics)
    lines = [f"# Study results: profile `{study.profile.name}`",
             "", f"Code at commit `{commit}`; command: `{study.command}`.", "",
             f"Pretraining budget per arm: {study.profile.images} images (steps = images / the arm's batch). "
             f"Values: {_units(metrics)}, mean +- sample standard deviation over seeds (n = number of seeds).", "",
             "| arm | n | " + " | ".join(metrics) + " | pretraining (min) |",
             "| --- | --- | " + " | ".join("---" for _ in metrics) + " | --- |"]
    for arm in study.arms:
        cells = summary.get(arm.name, {})
        n = max((c["n"] for c in cells.values()), default=0)
        values = [f"{100 * cells[m]['mean']:.2f} +- {100 * cells[m]['std']:.2f}" if m in cells else "-"
                  for m in metrics]
        minutes = max((c["pretrain_seconds"] for c in cells.values()), default=0.0) / 60
        lines.append(f"| `{arm.name}` | {n} | " + " | ".join(values) + f" | {minutes:.1f} |")
    checks = [c for c in orderings(summary) if c["metric"] in metrics]
    if checks:
        lines += ["", "## The papers' orderings at this scale", "",
                  "A pair `A > B` *holds* when A's mean exceeds B's by more than the larger spread of the two, "
                  "is *reversed* when B's exceeds A's by that much, and is *within spread* otherwise. An arm run "
                  "with one seed has no spread of its own and is given the largest spread of the arms run with "
                  "several seeds on that metric.", "",
                  "| paper | metric | order | verdict per pair |", "| --- | --- | --- | --- |"]
        lines += [f"| {c['table']} | {c['metric']} | {c['order']} | "
                  + ", ".join(v if len(c["pairs"]) == 1 else f"{p}: {v}" for p, v in zip(c["pairs"], c["verdicts"]))
                  + " |" for c in checks]
    atomic_write_text(folder / "results.md", "\n".join(lines) + "\n")
    if set(metrics) & set(DENSE):
        _dense_pictures(study, folder)
        atomic_write_text(folder / "results.md", "\n".join(lines + _picture_lines(folder)) + "\n")
        return folder
    accuracy_vs_time(rows, folder / "accuracy_vs_time.png", title="accuracy against pretraining time")
    runs = curve_runs(study, kept=folder / "curves")
    keep_curves(runs, study, folder / "curves")
    # Each method's own objective: comparable between MixMIM's variants and MAE (normalised-pixel MSE),
    # not with SimMIM (l1) or MixedAE (+ its contrastive term).
    run_curves(runs, folder / "loss_curves.png", "loss", "training loss, each method's own (smoothed)",
               "pretraining loss, seed 0")
    run_curves(runs, folder / "monitor_knn.png", "knn", "k-NN top-1 (%)", "k-NN during pretraining, seed 0")
    return folder


def curve_runs(study: Study, kept: Path | None = None) -> dict[str, Path]:
    """Label -> metrics CSV of each pretrained arm's first seed that has one, for the report's curves:
    the run's own ``metrics.csv`` while the run is on disk, else the copy an earlier report kept in
    ``kept/<arm>/seed<k>.csv`` (so a report redrawn after the runs were deleted, as with ``--reuse``,
    keeps its curves). Seed 0 unless that seed has neither; other seeds are labelled so."""
    runs = {}
    for arm in study.arms:
        if not arm.pretrain:
            continue
        for seed in seeds_of(arm, study.profile):
            found = [p for p in (study.output / "runs" / arm.name / f"seed{seed}" / "metrics.csv",
                                 kept / arm.name / f"seed{seed}.csv" if kept is not None else None)
                     if p is not None and p.is_file()]
            if found:
                runs[arm.name if seed == 0 else f"{arm.name} (seed {seed})"] = found[0]
                break
    return runs


CURVE_COLUMNS = ("step", "loss", "knn")  # what the report's curves draw; the rest of metrics.csv is not kept


def keep_curves(runs: dict[str, Path], study: Study, kept: Path) -> None:
    """Copy the curves drawn from runs on disk into ``kept`` (step, loss and k-NN columns only), so the
    committed report holds the data of its own pictures."""
    import csv
    import io

    from mixmim.utils.files import atomic_write_text

    for source in runs.values():
        try:
            relative = source.relative_to(study.output / "runs")
        except ValueError:  # already a kept copy
            continue
        with open(source, newline="") as handle:
            rows = list(csv.DictReader(handle))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=CURVE_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in CURVE_COLUMNS} for row in rows
                         if row.get("loss") or row.get("knn"))
        target = kept / relative.parent.parent / f"{relative.parent.name}.csv"
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, out.getvalue())


def _units(metrics: list[str]) -> str:
    units = {"box_ap": "COCO box AP (%)", "mask_ap": "COCO mask AP (%)", "miou": "mIoU (%)"}
    dense = [units[m] for m in metrics if m in units]
    classification = [m for m in metrics if m not in units]
    parts = (["top-1 accuracy (%) on the test split"] if classification else []) + (
        [", ".join(dense) + " on the benchmark's validation canvases"] if dense else [])
    return "; ".join(parts)


def _dense_pictures(study: Study, folder: Path) -> None:
    """Each arm's seed-0 ``predictions.png`` of the detection and segmentation runs, copied next to the
    report (``detections_<arm>.png``, ``segmentation_<arm>.png``) while the runs are on disk."""
    import shutil

    for arm in study.arms:
        seed = seeds_of(arm, study.profile)[0]
        for verb, stem in (("detect", "detections"), ("segment", "segmentation")):
            found = study.output / "eval" / f"{arm.name}/seed{seed}" / verb / "predictions.png"
            if found.is_file():
                shutil.copyfile(found, folder / f"{stem}_{arm.name.replace('/', '_')}.png")


def _picture_lines(folder: Path) -> list[str]:
    pictures = sorted(p.name for p in folder.glob("detections_*.png")) + sorted(
        p.name for p in folder.glob("segmentation_*.png"))
    if not pictures:
        return []
    return ["", "## Predictions (seed 0, the first validation canvases)", "",
            "Detections: predicted boxes of score 0.5 or more with class and score, masks tinted in the class's "
            "colour, true boxes in white. Segmentation rows: canvas, true map, predicted map (background, "
            "which reduce_zero_label ignores, in black in both maps).", "",
            *[f"![{p}]({p})" for p in pictures]]
