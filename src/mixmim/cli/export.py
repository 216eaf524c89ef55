"""``mixmim export``: a checkpoint's encoder as a Hub/timm folder (``--format hub``, the default:
``config.json`` + ``model.safetensors`` + a ``README.md`` model card, loadable by
``timm.create_model("local-dir:<folder>", pretrained=True)``) or as the older pair
``<stem>.safetensors`` + ``<stem>.json`` (``--format pair``, loadable by
``mixmim.interop.export.load_encoder`` and ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))``)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any


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
    from mixmim.interop.pretrained import build_encoder, parse_windows, read_pretrained

    if args.img_size is not None and args.img_size < 1:
        raise ValueError(f"--img-size {args.img_size}: expected a positive size in pixels")
    if args.format == "pair":
        from mixmim.interop.export import _check_pair_target

        _check_pair_target(Path(args.output).with_suffix("") if Path(args.output).suffix in (".safetensors", ".json")
                           else Path(args.output), args.overwrite)
    else:
        from mixmim.interop.hub import check_export_target

        check_export_target(Path(args.output), args.overwrite)  # before any work
    pretrained = read_pretrained(args.checkpoint, args.model)
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

    card = source_card(args.checkpoint, pretrained.source, pretrained.model_name)
    card["export_command"] = export_command(args)
    if args.img_size or args.window_size:
        card["resized"] = f"img_size {args.img_size or 'kept'}, windows {args.window_size or 'kept'} at export"
    folder = save_hub_folder(encoder, args.output, card=card, mean=card.get("mean"), std=card.get("std"),
                             overwrite=args.overwrite)
    print(f"exported {what} -> {folder}/ (config.json, model.safetensors, README.md); load it with "
          f"timm.create_model('local-dir:{folder}', pretrained=True)")
    return 0


def source_card(checkpoint: str | Path, source: str, model_name: str | None) -> dict[str, Any]:
    """The model card's facts for the weights ``checkpoint`` names: a training checkpoint (or run folder)
    gives the run's method, data, steps, metrics and resolved config; an export passes its card on."""
    from mixmim.interop.hub import hub_card, is_hub_folder, run_card
    from mixmim.utils.provenance import git_commit

    path = Path(checkpoint)
    base = {"source": str(checkpoint), "model": model_name, "export_commit": git_commit()}
    if source == "checkpoint":
        from mixmim.interop.checkpoint import resolve_checkpoint
        from mixmim.interop.torch_files import load_torch_file

        found = resolve_checkpoint(path)
        state = load_torch_file(found, mmap=True)  # mmap: the tensors are not read, only the run's facts
        run_dir = found.parent.parent if found.parent.name == "checkpoints" else None
        card = run_card(state.get("config") or {}, int(state.get("step", 0)), state.get("method"), run_dir,
                        command=state.get("command"), commit=state.get("commit"))
        if run_dir is not None and (run_dir / "config.yaml").is_file() and not card.get("command"):
            card["config_file"] = str(run_dir / "config.yaml")
        return {**base, **card, "source": str(found)}
    if source == "export" and is_hub_folder(path):
        return {**hub_card(path), **base}
    if source == "export":  # a pair: its JSON names what trained it, when the run wrote it
        info = json.loads(path.with_suffix(".json").read_text())
        kept = {k: info[k] for k in ("method", "step") if info.get(k) is not None}
        return {**kept, **base}
    return base


def export_command(args: argparse.Namespace) -> str:
    words = ["mixmim", "export", "--checkpoint", str(args.checkpoint), "--output", str(args.output)]
    for flag, value in (("--model", args.model), ("--img-size", args.img_size), ("--window-size", args.window_size),
                        ("--format", None if args.format == "hub" else args.format)):
        if value is not None:
            words += [flag, str(value)]
    return shlex.join(words)
