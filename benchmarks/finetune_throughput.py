"""Fine-tuning images/s: the engine's step against timm's own training step, same model, batch, threads.

    python benchmarks/finetune_throughput.py --model vit_small --img-size 224 --batch 32 --threads 2 \
        --out benchmarks/results/cpu_finetune_vit_small_224_b32.json

Three variants, timed alternately in one run (so that load on the machine hits them alike):

- ``timm``: ``timm.create_model(name, num_classes=C)``, AdamW, soft-target cross-entropy on Mixup'ed
  labels; forward, backward, step on a batch already in memory. What a hand-written loop does.
- ``engine``: ``Trainer.train_step`` of ``mixmim finetune`` (transfer/finetune.py on training/loop.py)
  on the same batches: per-micro-batch seeding, layer-decay parameter groups, the lr set each step,
  Mixup/CutMix inside the task, the non-finite check. Data loading is left out of both.
- ``verb``: the images/s that ``mixmim finetune`` itself logs with its data loader (timm's RandAugment
  on PNGs decoded by the workers), for scale; not a like-for-like comparison.

Reported: images/s (median over repeats) and the ratio to ``timm``.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def class_folder(root: Path, classes: int, per_class: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def engine_trainer(args, data: Path, out: Path):
    from mixmim.training import distributed as D
    from mixmim.training.loop import Trainer
    from mixmim.transfer.finetune import FinetuneTask
    from mixmim.transfer.run import load_transfer_config

    config = load_transfer_config("finetune", None, [
        f"model.name={args.model}", f"model.img_size={args.img_size}", f"data.path={data}", "data.source=folder",
        f"train.batch_size={args.batch}", "train.epochs=1000", "train.num_workers=0", "train.progress=false",
        f"output_dir={out}", "name=engine", "train.device=cpu", "train.trackers=[csv]", "finetune.rule=none",
        "optim.layer_decay=0.75", "finetune.head_init=trunc_normal"])
    info, device = D.setup("cpu")
    return Trainer(FinetuneTask(config), info, device, overwrite=True)


def timm_step(args, classes: int):
    import timm
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    from mixmim.models.registry import create_classifier

    model = create_classifier(args.model, num_classes=classes, img_size=args.img_size, drop_path_rate=0.1)
    assert isinstance(model, timm.models.VisionTransformer) or hasattr(model, "forward_features")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=classes)
    loss_fn = SoftTargetCrossEntropy()

    def step(images, labels):
        model.train()
        x, y = mixup(images, labels)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def time_it(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    classes = 10
    work = Path(tempfile.mkdtemp(prefix="ft-bench-"))
    data = class_folder(work / "data", classes, max(2, args.batch // classes + 1) * 2, args.img_size)
    trainer = engine_trainer(args, data, work / "runs")
    batch = next(iter(trainer.loader))
    images, labels = batch["image"], batch["label"]
    timm_fn = timm_step(args, classes)
    engine_fn = lambda: trainer.train_step([batch])  # noqa: E731
    plain_fn = lambda: timm_fn(images, labels)  # noqa: E731
    for fn in (plain_fn, engine_fn):  # warm-up: allocator, first-call costs
        time_it(fn, 2)
    seconds = {"timm": [], "engine": []}
    for _ in range(args.repeats):
        for name, fn in (("timm", plain_fn), ("engine", engine_fn)):
            seconds[name].append(time_it(fn, args.steps))
    rows = {name: args.steps * args.batch / statistics.median(s) for name, s in seconds.items()}
    # The verb with its loader, for scale (workers: none, so the same threads do everything).
    verb_dir = work / "verb"
    subprocess.run([sys.executable, "-m", "mixmim", "finetune", "--model", args.model, "--img-size",
                    str(args.img_size), "--data", str(data), "--output", str(verb_dir), "--no-progress",
                    "--num-workers", "0", f"train.batch_size={args.batch}", "train.max_steps=8", "train.log_every=1",
                    "finetune.rule=none", "finetune.head_init=trunc_normal", "train.device=cpu",
                    "train.trackers=[csv]"], check=True, capture_output=True,
                   env={"OMP_NUM_THREADS": str(args.threads), "PATH": "/usr/bin:/bin"})
    with open(verb_dir / "metrics.csv") as handle:
        logged = [float(r["img_per_s"]) for r in csv.DictReader(handle) if r.get("img_per_s")]
    rows["verb (with data loading)"] = statistics.median(logged[2:] or logged)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"{args.model} at {args.img_size} px, batch {args.batch}, {args.threads} threads, commit {commit}")
    print(f"{'variant':28s} {'img/s':>8s} {'x timm':>7s}")
    for name, value in rows.items():
        print(f"{name:28s} {value:8.2f} {value / rows['timm']:7.2f}")
    if args.out:
        args.out.write_text(json.dumps({
            "commit": commit, "model": args.model, "img_size": args.img_size, "batch": args.batch,
            "threads": args.threads, "steps": args.steps, "repeats": args.repeats, "machine": platform.machine(),
            "torch": torch.__version__, "seconds": seconds,
            "images_per_s": rows, "ratio_to_timm": {k: v / rows["timm"] for k, v in rows.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
