"""``mixmim knn``: weighted k-NN accuracy (cosine, k = 20, T = 0.07) of a frozen encoder."""

from __future__ import annotations

import argparse

from mixmim.cli.args import add_common, common_values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser, default_output="runs/knn", default_batch=128)
    parser.add_argument("--k", type=int, default=20, help="neighbours (default 20)")
    parser.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(cos / T) (default 0.07)")


def run(args: argparse.Namespace) -> int:
    from mixmim.evaluation.knn import KNNConfig, knn

    cfg = KNNConfig(**common_values(args), k=args.k, temperature=args.temperature)
    r = knn(cfg)
    print(f"k-NN (k={r['k']}, T={r['temperature']}, {r['weights']} weights): top-1 {r['acc1']:.2f}%  "
          f"top-5 {r['acc5']:.2f}%  ({r['train_samples']} train / {r['test_samples']} test images) -> {cfg.output}")
    return 0
