"""``mixmim info``: the named models with their parameters and FLOPs at 224 (counted, not quoted);
with ``--mask``, the AvgDist of a masking strategy instead (SimMIM section 4.1.2)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from torch import nn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--models", nargs="*", help="names to list (default: all)")
    m = parser.add_argument_group("AvgDist of a masking strategy (SimMIM section 4.1.2, Figure 3)")
    m.add_argument("--mask", choices=("random", "square", "block"),
                   help="print the mean distance of masked pixels to the nearest visible one for this strategy")
    m.add_argument("--mask-method", choices=("simmim", "mixmim"), default="simmim",
                   help="whose generator draws the masks (MixMIM has random and block)")
    m.add_argument("--mask-ratio", type=float, default=0.6)
    m.add_argument("--mask-cell", type=int, default=32, help="masked patch size in pixels")
    m.add_argument("--draws", type=int, default=100, help="masks to average over")
    m.add_argument("--seed", type=int, default=0)


def _architecture(spec: dict) -> str:
    """The registry's constructor arguments of a model, compactly (widths, depths, heads, windows...)."""
    skip = ("family", "timm")
    return " ".join(f"{k}={tuple(v) if isinstance(v, (list, tuple)) else v}" for k, v in spec.items() if k not in skip)


def model_table(img_size: int = 224, names: list[str] | None = None) -> list[dict]:
    """Rows of name, family, the timm model of the same architecture, encoder / MixMIM pretrainer
    parameters and forward GFLOPs (multiply-adds, the papers' unit) of the classifier; built on the
    meta device, so even mixmim_huge costs no memory."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mixmim.methods.factory import create_pretrainer
    from mixmim.models.registry import MODELS, create_classifier

    rows = []
    for name in names or list(MODELS):
        with torch.device("meta"):
            classifier = create_classifier(name, num_classes=1000, img_size=img_size)
            pretrainer = create_pretrainer("mixmim", name, img_size=img_size)
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                classifier(torch.empty(1, 3, img_size, img_size))
        spec = MODELS[name]
        get_classifier = cast("Callable[[], nn.Module]", classifier.get_classifier)  # timm's, every family has it
        head = {id(p) for p in get_classifier().parameters()}
        rows.append({
            "model": name, "family": spec["family"], "timm": spec.get("timm") or "-",
            "architecture": _architecture(spec),
            "encoder_params_M": sum(p.numel() for p in classifier.parameters() if id(p) not in head) / 1e6,
            "pretrain_params_M": sum(p.numel() for p in pretrainer.parameters()) / 1e6,
            "gflops": counter.get_total_flops() / 2e9,
        })
    return rows


def print_avg_dist(args: argparse.Namespace) -> int:
    from mixmim.evaluation.avgdist import mask_avg_dist

    if args.draws < 1:
        raise ValueError(f"--draws {args.draws}: expected at least one mask")
    value, fraction = mask_avg_dist(args.mask, args.mask_ratio, args.mask_cell, args.img_size, args.draws,
                                    args.mask_method, args.seed)
    print(f"AvgDist {value:.2f} px: {args.mask_method} {args.mask} masking, {args.mask_cell}-px cells, ratio "
          f"{args.mask_ratio} ({fraction:.3f} of the pixels masked), {args.img_size}x{args.img_size} images, "
          f"mean of {args.draws} draws")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.img_size < 32:
        raise ValueError(f"--img-size {args.img_size}: expected a size of at least 32 pixels")
    if args.mask:
        return print_avg_dist(args)
    rows = model_table(args.img_size, args.models)
    print(f"{'model':15s} {'family':9s} {'timm model':30s} {'encoder M':>10s} {'+decoder M':>11s} "
          f"{'GFLOPs@' + str(args.img_size):>11s}  architecture")
    for r in rows:
        print(f"{r['model']:15s} {r['family']:9s} {r['timm']:30s} {r['encoder_params_M']:10.2f} "
              f"{r['pretrain_params_M']:11.2f} {r['gflops']:11.2f}  {r['architecture']}")
    print("GFLOPs: multiply-adds of one image through the encoder and head, the unit the papers report; "
          "+decoder: the MixMIM pretrainer with the model's default decoder.")
    return 0
