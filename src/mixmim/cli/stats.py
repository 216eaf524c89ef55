"""``mixmim stats``: per-channel mean and std of a data set's pixels, to paste into data.mean / data.std.

    mixmim stats --data fashion_mnist --channels 1 --limit 10000
    -> data.mean=[0.2854] data.std=[0.3526]

Over the decoded images scaled to [0, 1], all of them or a seeded sample of ``--limit``; ``--data``
takes what pretraining takes (a folder, shards, a Hugging Face dataset, 'fashion_mnist', 'bundled').
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from mixmim.utils.cpus import available_cpus

if TYPE_CHECKING:
    from mixmim.data.datasets import SeededDataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="folder, shards, Hugging Face dataset, 'fashion_mnist' or 'bundled'")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3, help="3: RGB (default), 1: grey")
    parser.add_argument("--limit", type=int, default=None, help="measure a seeded sample of N images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=min(4, available_cpus()))


def run(args: argparse.Namespace) -> int:
    from mixmim.data.stats import dataset_stats

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit} must be at least 1")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers {args.num_workers}: expected 0 (read in this process) or more")
    data: SeededDataset | str
    if args.data == "fashion_mnist":
        from mixmim.data.datasets import FashionMNISTImages

        data = FashionMNISTImages(None, channels=args.channels)
    elif args.data == "bundled":
        from mixmim.data.datasets import BundledPhotos

        data = BundledPhotos(None, channels=args.channels)
    else:
        data = args.data
    stats = dataset_stats(data, args.channels, args.limit, args.seed, args.num_workers)

    def fmt(values):
        return "[" + ",".join(f"{v:.4f}" for v in values) + "]"

    print(f"{stats.images} images, {stats.pixels} pixels per channel"
          + (f", {len(stats.skipped)} unreadable (skipped)" if stats.skipped else ""))
    print(f"data.mean={fmt(stats.mean)} data.std={fmt(stats.std)}")
    return 0
