"""``mixmim knn``: weighted k-NN accuracy (cosine, k = 20, T = 0.07) of a frozen encoder (torchrun: every
process extracts its share)."""

from __future__ import annotations

import argparse

from mixmim.cli.args import COMMON, add_config_options, add_options, run_transfer_verb

SPECS = COMMON + [
    ("--k", "knn.k", int, "neighbours"),
    ("--temperature", "knn.temperature", float, "vote weight exp(cos / T)"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser, "knn")
    add_options(parser, SPECS, "short-hands (each a config key)")


def run(args: argparse.Namespace) -> int:
    summary = run_transfer_verb(args, "knn", SPECS)
    if summary is None:
        return 0
    r = summary["results"]
    print(f"k-NN (k={r['k']}, T={r['temperature']}, {r['weights']} weights): top-1 {r['acc1']:.2f}%  "
          f"top-5 {r['acc5']:.2f}%  ({r['train_samples']} train / {r['test_samples']} test images)")
    return 0
