"""``mixmim finetune``: classification fine-tuning of a pretrained encoder, on the training loop.

    mixmim finetune --checkpoint runs/demo --data /data/labelled          # the small-data rule
    mixmim finetune --config finetune/mixmim_base_in1k --checkpoint RUN --data /data/imagenet   # Table 12
    torchrun --nproc_per_node 8 -m mixmim finetune --config ... train.accum_steps=2
"""

from __future__ import annotations

import argparse

from mixmim.cli.args import COMMON, OPTIM, add_config_options, add_options, finished_results, run_transfer_verb

SPECS = COMMON + OPTIM + [
    ("--layer-decay", "optim.layer_decay", float, "layer-wise lr decay"),
    ("--drop-path", "model.drop_path_rate", float, "drop path (default: 0.1/0.2/0.3 for B/L/H)"),
    ("--mixup", "finetune.mixup", float, "Mixup alpha (0: off)"),
    ("--cutmix", "finetune.cutmix", float, "CutMix alpha (0: off)"),
    ("--smoothing", "finetune.smoothing", float, "label smoothing"),
    ("--auto-augment", "finetune.auto_augment", str, "timm policy, e.g. rand-m9-mstd0.5-inc1; 'none' for none"),
    ("--reprob", "finetune.re_prob", float, "random erasing probability"),
    ("--select", "eval.select", str, "report the 'last' epoch's weights or the 'best' epoch's"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser, "finetune")
    add_options(parser, SPECS, "short-hands (each a config key)")


def run(args: argparse.Namespace) -> int:
    summary = run_transfer_verb(args, "finetune", SPECS)
    r = finished_results(summary)
    if r is None:
        return 0
    print(f"fine-tuned ({r['weights']} weights): test top-1 {r['acc1']:.2f}%  top-5 {r['acc5']:.2f}%  "
          f"({r['select']} weights, step {r['step']}, {r['test_samples']} images) -> {summary['run_dir']}")
    return 0
