"""``mixmim segment``: UperNet semantic segmentation on the encoder to the ADE20K protocol (random resize
and 512 crops, auxiliary FCN head, sliding-window mIoU at the original resolution), on the training loop.

    mixmim segment --checkpoint runs/b --data /data/ADEChallengeData2016        # ADE20K as it is on disk
    mixmim segment -c segment/mixmim_base_upernet_16k --checkpoint runs/b --data /data/ADEChallengeData2016
    mixmim segment --checkpoint runs/ft_b --data my_folder   # a fine-tuned classifier; images/ + masks/
"""

from __future__ import annotations

import argparse

from mixmim.cli.args import COMMON, OPTIM, add_config_options, add_options, finished_results, run_transfer_verb

SPECS = COMMON + OPTIM + [
    ("--num-classes", "segment.num_classes", int, "default: 1 + the largest label in the masks"),
    ("--layer-decay", "optim.layer_decay", float, "0.85/0.9 for B/L in the paper"),
    ("--drop-path", "model.drop_path_rate", float, "drop path"),
    ("--warmup-iters", "optim.warmup_steps", int, "warm-up steps"),
    ("--iters", "train.max_steps", int, "training iterations (16000 in MixMIM Table 4, 160000 in BEiT's)"),
    ("--crop-size", "segment.crop_size", int, "training crop and evaluation window (512)"),
    ("--stride", "segment.stride", int, "sliding-window stride at evaluation (default: 2/3 of the crop, 341 for 512)"),
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
