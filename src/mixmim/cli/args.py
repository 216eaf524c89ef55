"""Command-line options shared by ``mixmim finetune``, ``linprobe``, ``knn`` and ``segment``."""

from __future__ import annotations

import argparse
import os
from typing import Any


def add_common(parser: argparse.ArgumentParser, default_output: str, default_batch: int) -> None:
    g = parser.add_argument_group("weights and data")
    g.add_argument("--checkpoint", default=None,
                   help="training checkpoint (.pt), export (.safetensors + .json) or release checkpoint; "
                        "omitted: a randomly initialised --model (a baseline)")
    g.add_argument("--model", default=None, help="registry name (mixmim_tiny ... mixmim_huge); needed for release "
                                                 "checkpoints and random initialisation")
    g.add_argument("--data", required=True, help="folder with class sub-folders, or 'fashion_mnist'")
    g.add_argument("--output", default=default_output, help=f"output folder (default {default_output})")
    g.add_argument("--img-size", type=int, default=None, help="input size (default: the checkpoint's)")
    g.add_argument("--window-size", default=None,
                   help="windows per stage, e.g. 16,16,24,12; '+' lists one per block: 16,16,16+32,16")
    g.add_argument("--batch-size", type=int, default=default_batch)
    g.add_argument("--crop-pct", type=float, default=0.875, help="evaluation resize = img-size / crop-pct")
    g.add_argument("--limit-train", type=int, default=None, help="use a seeded subset of N training images")
    g.add_argument("--limit-test", type=int, default=None, help="use a seeded subset of N test images")
    g.add_argument("--val-fraction", type=float, default=0.2,
                   help="held out per class when the folder has no train/ and val/ sub-folders")
    r = parser.add_argument_group("run")
    r.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    r.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_epochs(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument("--epochs", type=int, default=default, help=f"training epochs (default {default})")


def common_values(args: argparse.Namespace) -> dict[str, Any]:
    """The shared options as keyword arguments of the task configurations."""
    from mixmim.interop.pretrained import parse_windows

    return dict(checkpoint=args.checkpoint, model=args.model, data=args.data, output=args.output,
                img_size=args.img_size, window_size=parse_windows(args.window_size), batch_size=args.batch_size,
                crop_pct=args.crop_pct, limit_train=args.limit_train, limit_test=args.limit_test,
                val_fraction=args.val_fraction, num_workers=args.num_workers, device=args.device,
                amp=not args.no_amp, seed=args.seed, progress=not args.no_progress)
