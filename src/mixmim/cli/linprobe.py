"""``mixmim linprobe``: MAE's linear probe (BatchNorm without affine + linear) on a frozen encoder.

Without a recipe: a quick probe on cached features (SGD); MAE's recipe (LARS, batch 16384, RandomResizedCrop
through the frozen encoder): ``--config linprobe/mae_vit_base``.
"""

from __future__ import annotations

import argparse

from mixmim.cli.args import COMMON, OPTIM, add_config_options, add_options, finished_results, run_transfer_verb

SPECS = COMMON + OPTIM + [
    ("--optimizer", "optim.name", str, "sgd (momentum 0.9) or lars (MAE's)"),
    ("--features", "probe.features", str, "cached (extracted once, no augmentation) or augmented (MAE's)"),
    ("--select", "eval.select", str, "report the 'last' epoch's head or the 'best' epoch's"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser, "linprobe")
    add_options(parser, SPECS, "short-hands (each a config key)")


def run(args: argparse.Namespace) -> int:
    summary = run_transfer_verb(args, "linprobe", SPECS)
    r = finished_results(summary)
    if r is None:
        return 0
    print(f"linear probe ({r['optimizer']}, {r['features']} features, {r['weights']} weights): top-1 {r['acc1']:.2f}%  "
          f"top-5 {r['acc5']:.2f}% ({r['select']} head, step {r['step']}) -> {summary['run_dir']}")
    return 0
