"""Where small-data fine-tuning starts (issue 19; docs/transfer.md "How the rule got here").

Two measurements on the study's CPU setting (the MixMIM arm, seed 0, 600 class-balanced labels):

1. The LP-FT head before any fine-tuning step: the model as ``mixmim finetune`` builds it, scored on
   the full 10 000-image test split, with the probe head fitted for 20 epochs only (40 steps at batch
   256, the first rule) and for ``finetune.probe_steps=1000``.
2. How far the training transforms move the training images from the evaluated ones: the loss and
   accuracy of that head-initialised model (eval mode) on 120 of the training images, under the
   evaluation transform and under each training transform.

    python docs/scripts/finetune_start.py --study runs/study-cpu --output docs/study/finetune_sweep/start.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch.nn import functional as F
from torchvision import transforms as T

from mixmim.data.labelled import eval_transform, train_transform
from mixmim.evaluation.sharded import evaluate_classifier
from mixmim.transfer.data import data_stats
from mixmim.transfer.finetune import FinetuneTask
from mixmim.transfer.run import load_transfer_config

DATA = ["data.source=fashion_mnist", "data.limit_train=600", "data.balanced=true", "data.crop_pct=1.0",
        "train.num_workers=0", "train.progress=false"]


def build(checkpoint: Path, extra: list[str]) -> FinetuneTask:
    config = load_transfer_config("finetune", None, [f"checkpoint={checkpoint}", "output_dir=runs/finetune-start",
                                                     *DATA, *extra])
    task = FinetuneTask(config)
    torch.manual_seed(0)
    task.build_model()
    return task


def transform_losses(task: FinetuneTask) -> dict[str, dict[str, float]]:
    side, stats = task.config.model.img_size, data_stats(task.config.data)
    flip = T.RandomHorizontalFlip()
    cases = {
        "evaluation transform": eval_transform(side, 1.0, *stats),
        "timm's training default without RandAugment (crops 0.08-1, flip, colour jitter 0.4)":
            train_transform(side, None, 0.0, (0.08, 1.0), *stats, color_jitter=0.4),
        "crops 0.08-1 and flip (no jitter)": train_transform(side, None, 0.0, (0.08, 1.0), *stats),
        "crops 0.5-1 and flip": train_transform(side, None, 0.0, (0.5, 1.0), *stats),
        "crops 0.8-1 and flip (the rule)": train_transform(side, None, 0.0, (0.8, 1.0), *stats),
        "flip only": T.Compose([flip, eval_transform(side, 1.0, *stats)]),
    }
    data, model = task.data.train, task.model.eval()
    keep = data.transform
    out = {}
    for name, transform in cases.items():
        torch.manual_seed(0)
        data.transform = transform
        items = [data[i] for i in range(0, len(data), 5)]
        x = torch.stack([it[0] for it in items])
        y = torch.tensor([int(it[1]) for it in items])
        with torch.no_grad():
            logits = model(x)
        out[name] = {"loss": F.cross_entropy(logits, y).item(),
                     "acc1": 100.0 * (logits.argmax(1) == y).float().mean().item(),
                     "images": len(y)}
    data.transform = keep
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="runs/study-cpu")
    parser.add_argument("--output", default="docs/study/finetune_sweep/start.json")
    args = parser.parse_args()
    checkpoint = Path(args.study) / "runs" / "mixmim" / "seed0"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result: dict = {"commit": commit, "command": " ".join(["python", *sys.argv]), "head_before_fine_tuning": {}}
    for name, extra in (("probe of 20 epochs (40 steps)", ["finetune.probe_steps=1"]),
                        ("probe of at least 1000 steps (the rule)", [])):
        task = build(checkpoint, extra)
        scores = evaluate_classifier(task.model, task.data.test, torch.device("cpu"), len(task.classes))
        result["head_before_fine_tuning"][name] = {"acc1": scores.acc1, "test_images": scores.samples}
        print(f"{name}: {scores.acc1:.2f}% on {scores.samples} test images", flush=True)
    result["training_transforms"] = transform_losses(task)
    for name, r in result["training_transforms"].items():
        print(f"{name}: loss {r['loss']:.3f}, top-1 {r['acc1']:.1f}% on {r['images']} training images")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
