"""``mixmim detect``: Mask R-CNN or Cascade Mask R-CNN on the encoder, trained and evaluated (COCOeval's box
and mask AP) on COCO-format data, on the training loop.

    mixmim detect --checkpoint runs/b --data /data/coco                       # COCO 2017 as it is on disk
    mixmim detect -c detect/mixmim_base_maskrcnn_55ep --checkpoint runs/b --data /data/coco
    mixmim detect --model mixmim_tiny --data my_export detect.train_json=... # random weights: the floor
"""

from __future__ import annotations

import argparse

from mixmim.cli.args import COMMON, OPTIM, add_config_options, add_options, finished_results, run_transfer_verb

SPECS = COMMON + OPTIM + [
    ("--detector", "detect.detector", str, "mask_rcnn (default) or cascade_mask_rcnn"),
    ("--size", "detect.size", int, "large-scale jitter's crop, and the evaluation's longer side (1024)"),
    ("--layer-decay", "optim.layer_decay", float, "0.85/0.9 for B/L in the paper"),
    ("--drop-path", "model.drop_path_rate", float, "drop path"),
    ("--select", "eval.select", str, "report the 'last' evaluation or the 'best' one"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser, "detect")
    add_options(parser, SPECS, "short-hands (each a config key)")


def run(args: argparse.Namespace) -> int:
    summary = run_transfer_verb(args, "detect", SPECS)
    r = finished_results(summary)
    if r is None:
        return 0
    print(f"detection ({r['detector']} on {r['weights']} weights, {len(r['classes'])} classes): box AP "
          f"{r['box_AP']:.2f}  mask AP {r['mask_AP']:.2f} ({r['select']}, {r['val_images']} images) -> "
          f"{summary['run_dir']}")
    return 0
