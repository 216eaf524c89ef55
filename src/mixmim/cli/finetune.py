"""``mixmim finetune``: classification fine-tuning of a pretrained encoder (MixMIM Table 12)."""

from __future__ import annotations

import argparse

from mixmim.cli.args import add_common, add_epochs, common_values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser, default_output="runs/ft", default_batch=64)
    add_epochs(parser, default=100)
    g = parser.add_argument_group("optimisation (defaults: MixMIM Table 12)")
    g.add_argument("--base-lr", type=float, default=5e-4, help="lr = base lr x batch / 256 (default 5e-4)")
    g.add_argument("--lr", type=float, default=None, help="absolute learning rate (overrides --base-lr)")
    g.add_argument("--min-lr", type=float, default=1e-6)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--layer-decay", type=float, default=0.7, help="layer-wise lr decay (1 = off)")
    g.add_argument("--drop-path", type=float, default=None, help="default: 0.1/0.2/0.3 for B/L/H")
    g.add_argument("--warmup-epochs", type=float, default=5.0)
    g.add_argument("--clip-grad", type=float, default=None)
    a = parser.add_argument_group("augmentation")
    a.add_argument("--mixup", type=float, default=0.8)
    a.add_argument("--cutmix", type=float, default=1.0)
    a.add_argument("--smoothing", type=float, default=0.1)
    a.add_argument("--auto-augment", default="rand-m9-mstd0.5-inc1", help="timm policy; '' for none")
    a.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")


def run(args: argparse.Namespace) -> int:
    from mixmim.evaluation.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(**common_values(args), epochs=args.epochs, base_lr=args.base_lr, lr=args.lr,
                         min_lr=args.min_lr, weight_decay=args.weight_decay, layer_decay=args.layer_decay,
                         drop_path=args.drop_path, warmup_epochs=args.warmup_epochs, clip_grad=args.clip_grad,
                         mixup=args.mixup, cutmix=args.cutmix, smoothing=args.smoothing,
                         auto_augment=args.auto_augment or None, re_prob=args.reprob)
    results = finetune(cfg)
    print(f"fine-tuned ({results['weights']} weights): test top-1 {results['acc1']:.2f}%  "
          f"top-5 {results['acc5']:.2f}%  (best epoch {results['best_epoch']}, {results['test_samples']} images) "
          f"-> {cfg.output}")
    return 0
