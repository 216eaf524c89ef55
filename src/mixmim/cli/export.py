"""``mixmim export``: a checkpoint's encoder as a Hub/timm folder (``--format hub``, the default:
``config.json`` + ``model.safetensors`` + a ``README.md`` model card, loadable by
``timm.create_model("local-dir:<folder>", pretrained=True)``) or as the older pair
``<stem>.safetensors`` + ``<stem>.json`` (``--format pair``, loadable by
``mixmim.interop.export.load_encoder`` and ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))``)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="training checkpoint (.pt) or run folder, release checkpoint, or an export to resize")
    parser.add_argument("--output", required=True,
                        help="hub: the folder to write; pair: output stem (writes STEM.safetensors and STEM.json)")
    parser.add_argument("--format", choices=("hub", "pair"), default="hub",
                        help="hub (default): config.json + model.safetensors + README.md, what timm and the Hugging "
                        "Face Hub read; pair: STEM.safetensors + STEM.json")
    parser.add_argument("--model", default=None, help="registry name, needed for release checkpoints")
    parser.add_argument("--img-size", type=int, default=None, help="resize to this input size (default: keep)")
    parser.add_argument("--window-size", default=None, help="new windows per stage, e.g. 16,16,24,12")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export at --output (its own files only; anything else there is kept)")


def run(args: argparse.Namespace) -> int:
    from mixmim.interop.card import source_card
    from mixmim.interop.pretrained import build_encoder, parse_windows
    from mixmim.interop.weights import open_weights
    from mixmim.utils.provenance import git_commit

    if args.img_size is not None and args.img_size < 1:
        raise ValueError(f"--img-size {args.img_size}: expected a positive size in pixels")
    output = Path(args.output)
    if args.format == "pair":
        from mixmim.interop.export import check_pair_target

        check_pair_target(output.with_suffix("") if output.suffix in (".safetensors", ".json") else output,
                          args.overwrite)
    else:
        from mixmim.interop.hub import check_export_target

        check_export_target(output, args.overwrite)  # before any work
    pretrained = open_weights(args.checkpoint, args.model)
    encoder = build_encoder(pretrained, img_size=args.img_size, window_size=parse_windows(args.window_size),
                            num_classes=0)
    n = sum(p.numel() for p in encoder.parameters())
    what = f"{pretrained.source} encoder ({pretrained.model_name or 'custom'}, {n / 1e6:.2f}M parameters)"
    if args.format == "pair":
        from mixmim.interop.export import save_encoder

        weights, meta = save_encoder(encoder, args.output, metadata={"source": str(args.checkpoint),
                                                                     "source_kind": pretrained.source,
                                                                     "model": pretrained.model_name},
                                     overwrite=args.overwrite)
        print(f"exported {what} -> {weights} + {meta}")
        return 0

    from mixmim.interop.hub import save_hub_folder

    card = source_card(pretrained, export_commit=git_commit())
    card["export_command"] = export_command(args)
    if args.img_size or args.window_size:
        card["resized"] = f"img_size {args.img_size or 'kept'}, windows {args.window_size or 'kept'} at export"
    folder = save_hub_folder(encoder, args.output, card=card, mean=card.get("mean"), std=card.get("std"),
                             overwrite=args.overwrite)
    print(f"exported {what} -> {folder}/ (config.json, model.safetensors, README.md); load it with "
          f"timm.create_model('local-dir:{folder}', pretrained=True)")
    return 0


def export_command(args: argparse.Namespace) -> str:
    words = ["mixmim", "export", "--checkpoint", str(args.checkpoint), "--output", str(args.output)]
    for flag, value in (("--model", args.model), ("--img-size", args.img_size), ("--window-size", args.window_size),
                        ("--format", None if args.format == "hub" else args.format)):
        if value is not None:
            words += [flag, str(value)]
    return shlex.join(words)
