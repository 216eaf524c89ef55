"""``mixmim segment``: UperNet semantic segmentation on the encoder (folder of images/ and masks/), on the
training loop; reports mIoU and pixel accuracy."""

from __future__ import annotations

import argparse

from mixmim.cli.args import COMMON, OPTIM, add_config_options, add_options, finished_results, run_transfer_verb

SPECS = COMMON + OPTIM + [
    ("--num-classes", "segment.num_classes", int, "default: 1 + the largest label in the masks"),
    ("--layer-decay", "optim.layer_decay", float, "0.85/0.9 for B/L in the paper"),
    ("--drop-path", "model.drop_path_rate", float, "drop path"),
    ("--warmup-iters", "optim.warmup_steps", int, "warm-up steps"),
    ("--channels", "segment.channels", int, "UperNet width (512 as mmseg)"),
    ("--select", "eval.select", str, "report the 'last' evaluation or the 'best' one"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser, "segment")
    add_options(parser, SPECS, "short-hands (each a config key)")


def run(args: argparse.Namespace) -> int:
    summary = run_transfer_verb(args, "segment", SPECS)
    r = finished_results(summary)
    if r is None:
        return 0
    print(f"segmentation ({r['weights']} weights, {r['num_classes']} classes): mIoU {100 * r['miou']:.2f}%  "
          f"pixel accuracy {100 * r['pixel_acc']:.2f}% ({r['select']}, {r['val_images']} images) -> "
          f"{summary['run_dir']}")
    return 0
