"""``mixmim shards``: pack an image folder into WebDataset tar shards (issue 20).

    mixmim shards --data /data/imagenet/train --output /nfs/imagenet-shards [--shard-size 1GB]

Writes ``OUTPUT/shard-000000.tar`` ... (members ``<key>.jpg`` with the original bytes, ``<key>.cls`` when
the folder has class sub-folders, ``<key>.path``), ``classes.json``, ``shards.json`` and ``skipped.txt``
(unreadable files with the reason, as pretraining lists them). A folder holding ``train/`` and ``val/``
gives ``OUTPUT/train/`` and ``OUTPUT/val/``. Then ``mixmim pretrain --data OUTPUT`` (and finetune,
linprobe, knn, the monitor) read the shards.
"""

from __future__ import annotations

import argparse

from mixmim.utils.cpus import available_cpus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="image folder (DATA/<class>/*.jpg, or DATA/train + DATA/val)")
    parser.add_argument("--output", required=True, help="folder to write the shards to")
    parser.add_argument("--shard-size", default="1GB", help="largest shard (default 1GB; e.g. 500MB, 2GiB)")
    parser.add_argument("--workers", type=int, default=min(8, available_cpus()),
                        help="processes checking that each image decodes")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mixmim.data.shards import write_shards

    bars: list = []  # made at the first image: nothing is drawn before the checks have passed

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(desc="images", unit="img", total=total, disable=args.no_progress, leave=False))
        bars[0].total = total
        bars[0].update(done - bars[0].n)

    reports = write_shards(args.data, args.output, args.shard_size, args.workers, args.overwrite, progress)
    for bar in bars:
        bar.close()
    for report in reports:
        size = sum(s["bytes"] for s in report.shards)
        print(f"{report.output}: {report.samples} images in {len(report.shards)} shard(s), {size / 2**20:.1f} MiB"
              + (f", {len(report.classes)} classes" if report.classes else "")
              + (f"; {len(report.skipped)} skipped, listed in {report.output / 'skipped.txt'}"
                 if report.skipped else ""))
    return 0
