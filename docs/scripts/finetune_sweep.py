"""The sweep that chose the small-data fine-tuning rule (issue 19; mixmim/transfer/small_data.py).

On the study's CPU setting (Fashion-MNIST, ViT d=128 x 6 at 32 px, docs/study): the MixMIM arm's
pretrained encoder (seed 0) and the same encoder randomly initialised, fine-tuned on a class-balanced
600-image subset (1% of the labels) with the rule and with one of its choices changed at a time, each
evaluated once at the end on the full 10 000-image test split; beside them the linear probe and k-NN
on the same 600 images; the MixMIM encoder fine-tuned on 6 000 labels (the study's 10%) against
probes on 6 000 and on the study's 10 000 images. Then the user's case of the issue: a folder of 600
Fashion-MNIST PNGs in class
sub-folders, `mixmim finetune`, `mixmim linprobe` and `mixmim knn` with their defaults on the same
checkpoint, evaluated on the folder's held-out 20%.

    python docs/scripts/finetune_sweep.py --output runs/finetune-sweep --report docs/study/finetune_sweep

Results are cached per run (results.json in each run folder); the report is results.json + results.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mixmim.data.fashion_mnist import CLASSES, read_fashion_mnist
from mixmim.study import Study, load_profile
from mixmim.transfer.run import load_transfer_config, run_transfer

# One change from the rule at a time (config overrides on 600 labels); "rule" is the rule itself.
VARIANTS: dict[str, list[str]] = {
    "rule": [],
    "crops of 0.5-1 of the area": ["data.crop_scale=[0.5,1.0]"],
    "ImageNet's crops (0.08-1)": ["data.crop_scale=[0.08,1.0]"],
    "colour jitter 0.4 (timm's default without RandAugment)": ["finetune.color_jitter=0.4"],
    "probe head of 20 epochs only (40 steps)": ["finetune.probe_steps=1"],
    "head trunc_normal (no LP-FT)": ["finetune.head_init=trunc_normal"],
    "batch 32 (504 steps: the rule's 28 epochs)": ["train.batch_size=32"],
    "Table 12 recipe (no rule)": ["finetune.rule=none", "train.epochs=15", "train.batch_size=32"],
}


def pretrained(study_dir: Path) -> tuple[Path, Path]:
    """(MixMIM seed-0 run folder, random encoder) of the study's CPU profile, pretrained once (in the
    study's own folder, so ``mixmim study --output runs/study-cpu`` reuses them)."""
    study = Study(load_profile("cpu"), study_dir, arms=["random", "mixmim"])
    arms = {a.name: a for a in study.arms}
    config = study.run_config(arms["mixmim"], 0)
    study._pretrain(config)
    return config.run_dir, study._random_encoder(study.run_config(arms["random"], 0), 0)


def run(verb: str, name: str, output: Path, weights: Path, overrides: list[str]) -> dict:
    folder = output / "runs" / name
    done = folder / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    if verb == "knn":  # nothing to train: no evaluation schedule
        overrides = [o for o in overrides if not o.startswith("eval.")]
    config = load_transfer_config(verb, None, [f"checkpoint={weights}", f"name={name}", f"output_dir={output / 'runs'}",
                                               "train.trackers=[csv]", "train.checkpoint_every=1000000000",
                                               *overrides])
    start = time.perf_counter()
    summary = run_transfer(config, overwrite=True)
    results = {**summary["results"], "seconds": time.perf_counter() - start, "overrides": overrides, "commit": COMMIT}
    done.write_text(json.dumps(results, indent=2) + "\n")
    return results


def png_folder(root: Path, per_class: int = 60, seed: int = 0) -> Path:
    """600 Fashion-MNIST training images as PNGs in one folder per class (what a user brings)."""
    from PIL import Image

    if root.is_dir():
        return root
    images, labels = read_fashion_mnist("train")
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in rng.choice(np.flatnonzero(labels == label), per_class, replace=False):
            Image.fromarray(images[i]).save(root / name / f"{i}.png")
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/finetune-sweep")
    parser.add_argument("--report", default="docs/study/finetune_sweep")
    parser.add_argument("--study", default="runs/study-cpu", help="the study folder holding the pretrained arms")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    output, report = Path(args.output), Path(args.report)
    mixmim_run, random_encoder = pretrained(Path(args.study))
    # As the study evaluates: the full test split once at the end, a plain resize to 32 px (crop_pct 1).
    data = ["data.source=fashion_mnist", "data.limit_train=600", "data.balanced=true", "data.crop_pct=1.0",
            "eval.every_epochs=0", "train.num_workers=1", "train.progress=false"]
    tenth = [o.replace("limit_train=600", "limit_train=6000") for o in data]
    probe = ["train.epochs=50", "probe.features=cached"]
    folder = png_folder(output / "fashion_png_600")
    jobs = []  # what decides the rule first, the variants after; the report is rewritten after every run
    for weights_name, weights in (("mixmim", mixmim_run), ("random", random_encoder)):
        jobs.append((weights_name, "fine-tune: rule", "finetune", weights, data))
        jobs += [(weights_name, verb, verb, weights, data + extra) for verb, extra in (("linprobe", probe), ("knn",
                                                                                                             []))]
        if weights_name == "mixmim":  # the study's 10% fine-tuning against its probe (10 000 images)
            jobs += [("mixmim", "6000 labels: fine-tune: rule", "finetune", weights, tenth),
                     ("mixmim", "6000 labels: linprobe", "linprobe", weights, tenth + probe),
                     ("mixmim", "10000 labels: linprobe (the study's probe)", "linprobe", weights,
                      [o.replace("limit_train=600", "limit_train=10000") for o in data] + probe)]
        if weights_name == "mixmim":  # what a user runs on their own folder, defaults only
            jobs += [("mixmim", f"600-PNG folder: mixmim {verb} (defaults)", verb, weights,
                      [f"data.path={folder}", "data.source=folder", "train.progress=false"])
                     for verb in ("finetune", "linprobe", "knn")]
    jobs += [("mixmim", f"fine-tune: {v}", "finetune", mixmim_run, data + VARIANTS[v])
             for v in args.variants if v != "rule"]
    rows = []
    for weights_name, evaluation, verb, weights, overrides in jobs:
        slug = f"{weights_name}-{evaluation}".replace(" ", "_")
        slug = "".join(c for c in slug if c.isalnum() or c in "-_.")
        r = run(verb, slug, output, weights, overrides)
        rows.append({"weights": weights_name, "evaluation": evaluation, **_row(r)})
        write_report(rows, report)
    return 0


def _row(r: dict) -> dict:
    return {"acc1": r["acc1"], "test_images": r.get("test_samples"), "seconds": round(r["seconds"], 1),
            "overrides": r.get("overrides", []), "commit": r.get("commit")}


# The code the runs execute: the commit when the script started (later commits do not change a running process).
COMMIT = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def write_report(rows: list[dict], report: Path) -> None:
    report.mkdir(parents=True, exist_ok=True)
    commits = sorted({r["commit"] for r in rows if r.get("commit")})
    (report / "results.json").write_text(json.dumps({"commit": COMMIT, "command": " ".join(sys.argv),
                                                     "rows": rows}, indent=2) + "\n")
    lines = [f"# Small-data fine-tuning sweep (generated by docs/scripts/finetune_sweep.py at {COMMIT}; "
             f"rows computed at {', '.join(commits) or COMMIT})", "",
             f"Command: `python {' '.join(sys.argv)}`", "",
             "| weights | evaluation | top-1 (%) | test images | seconds |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['weights']} | {r['evaluation']} | {r['acc1']:.2f} | {r['test_images']} | {r['seconds']:.0f} |"
              for r in rows]
    (report / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
