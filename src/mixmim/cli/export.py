"""``mixmim export``: a checkpoint's encoder as ``<stem>.safetensors`` + ``<stem>.json``, loadable by
``mixmim.interop.export.load_encoder`` and by ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))``."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="training checkpoint (.pt), release checkpoint, or an export to resize")
    parser.add_argument("--output", required=True, help="output stem: writes STEM.safetensors and STEM.json")
    parser.add_argument("--model", default=None, help="registry name, needed for release checkpoints")
    parser.add_argument("--img-size", type=int, default=None, help="resize to this input size (default: keep)")
    parser.add_argument("--window-size", default=None, help="new windows per stage, e.g. 16,16,24,12")


def run(args: argparse.Namespace) -> int:
    from mixmim.interop.pretrained import build_encoder, parse_windows, read_pretrained
    from mixmim.interop.export import save_encoder

    pretrained = read_pretrained(args.checkpoint, args.model)
    encoder = build_encoder(pretrained, img_size=args.img_size, window_size=parse_windows(args.window_size),
                            num_classes=0)
    weights, meta = save_encoder(encoder, args.output, metadata={"source": str(args.checkpoint),
                                                                 "source_kind": pretrained.source,
                                                                 "model": pretrained.model_name})
    n = sum(p.numel() for p in encoder.parameters())
    print(f"exported {pretrained.source} encoder ({pretrained.model_name or 'custom'}, {n / 1e6:.2f}M parameters) "
          f"-> {weights} + {meta}")
    return 0
