"""``mixmim linprobe``: linear probe (BatchNorm without affine + linear, as MAE) on a frozen encoder."""

from __future__ import annotations

import argparse

from mixmim.cli.args import add_common, add_epochs, common_values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser, default_output="runs/linprobe", default_batch=256)
    add_epochs(parser, default=90)
    parser.add_argument("--optimizer", choices=("sgd", "lars"), default="sgd",
                        help="SGD with momentum 0.9 (default) or timm's LARS (MAE's choice)")
    parser.add_argument("--base-lr", type=float, default=0.1, help="lr = base lr x batch / 256 (default 0.1)")
    parser.add_argument("--lr", type=float, default=None, help="absolute learning rate")
    parser.add_argument("--warmup-epochs", type=float, default=10.0)
    parser.add_argument("--weight-decay", type=float, default=0.0)


def run(args: argparse.Namespace) -> int:
    from mixmim.evaluation.linprobe import LinProbeConfig, linprobe

    cfg = LinProbeConfig(**common_values(args), epochs=args.epochs, optimizer=args.optimizer,
                         base_lr=args.base_lr, lr=args.lr, warmup_epochs=args.warmup_epochs,
                         weight_decay=args.weight_decay)
    r = linprobe(cfg)
    print(f"linear probe ({r['optimizer']}, {r['weights']} weights): top-1 {r['acc1']:.2f}%  top-5 {r['acc5']:.2f}% "
          f"(best epoch {r['best_epoch']}; last epoch {r['last_epoch_acc1']:.2f}%) -> {cfg.output}")
    return 0
