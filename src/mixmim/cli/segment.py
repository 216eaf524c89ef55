"""``mixmim segment``: train a UperNet segmentation model on the encoder; reports mIoU and pixel accuracy."""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, help="training checkpoint, export or release checkpoint; "
                                                           "omitted: a randomly initialised --model")
    parser.add_argument("--model", default=None, help="registry name (needed for release checkpoints / random init)")
    parser.add_argument("--data", required=True, help="folder with images/ and masks/ (PNG label maps, 255 ignore)")
    parser.add_argument("--val-data", default=None, help="evaluation folder of the same layout (default: hold out "
                                                        "--val-fraction of --data)")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--output", default="runs/segment")
    parser.add_argument("--num-classes", type=int, default=None, help="default: 1 + largest label in the masks")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--window-size", default=None, help="e.g. 16,16,16,16 or 16,16,16+16+32,16 (per block)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--layer-decay", type=float, default=0.85, help="0.85/0.9 for B/L in the paper")
    parser.add_argument("--drop-path", type=float, default=0.1)
    parser.add_argument("--warmup-iters", type=int, default=50)
    parser.add_argument("--channels", type=int, default=512, help="UperNet width (512 as mmseg)")
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-amp", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from mixmim.interop.pretrained import parse_windows
    from mixmim.evaluation.segmentation import SegmentConfig, segment

    cfg = SegmentConfig(data=args.data, checkpoint=args.checkpoint, model=args.model, val_data=args.val_data,
                        output=args.output, num_classes=args.num_classes, epochs=args.epochs,
                        batch_size=args.batch_size, img_size=args.img_size,
                        window_size=parse_windows(args.window_size), lr=args.lr, weight_decay=args.weight_decay,
                        layer_decay=args.layer_decay, drop_path=args.drop_path, warmup_iters=args.warmup_iters,
                        channels=args.channels, val_fraction=args.val_fraction, num_workers=args.num_workers,
                        device=args.device, amp=not args.no_amp, seed=args.seed, progress=not args.no_progress)
    r = segment(cfg)
    print(f"segmentation ({r['weights']} weights, {r['num_classes']} classes): mIoU {100 * r['miou']:.2f}%  "
          f"pixel accuracy {100 * r['pixel_acc']:.2f}% (best epoch {r['best_epoch']}, {r['val_images']} images) "
          f"-> {cfg.output}")
    return 0
