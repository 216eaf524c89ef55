"""``mixmim attention``: the last block's attention maps of one or more encoders over the same images
(MixedAE Figures 5 and 7), side by side.

    mixmim attention --checkpoint runs/mae runs/mixedae --labels MAE MixedAE --images fashion_mnist \\
        --output maps.png
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", nargs="+", required=True,
                        help="one or more: a run folder, a checkpoint (.pt), an export, or a release checkpoint")
    parser.add_argument("--labels", nargs="+", default=None, help="a name per checkpoint (default: folder names)")
    parser.add_argument("--images", nargs="+", required=True,
                        help="image files or folders, or 'fashion_mnist' (its test split) or 'bundled'")
    parser.add_argument("--output", default="attention.png")
    parser.add_argument("--model", default=None, help="encoder name, for release checkpoints only")
    parser.add_argument("--max-images", type=int, default=6)
    parser.add_argument("--max-heads", type=int, default=6, help="heads drawn one by one per model")


def run(args: argparse.Namespace) -> int:
    import torch

    from mixmim.cli.reconstruct import _pictures
    from mixmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, view_transform
    from mixmim.evaluation.attention_maps import attention_maps
    from mixmim.interop.pretrained import build_encoder, input_size
    from mixmim.interop.weights import open_weights
    from mixmim.viz.attention import save_attention_grid

    if args.max_images < 1 or args.max_heads < 0:
        raise ValueError(f"--max-images {args.max_images} / --max-heads {args.max_heads}: expected a positive "
                         "number of images and a non-negative number of heads")
    labels = args.labels or [Path(c).name for c in args.checkpoint]
    if len(labels) != len(args.checkpoint):
        raise ValueError(f"--labels names {len(labels)} models, --checkpoint gives {len(args.checkpoint)}")
    if Path(args.output).is_dir():
        raise ValueError(f"--output {args.output} is a folder; name the picture file")
    pictures = _pictures(args.images, args.max_images)
    maps, shown = [], None
    for checkpoint in args.checkpoint:
        pretrained = open_weights(checkpoint, args.model)
        size, _ = input_size(pretrained, None)
        side = size if isinstance(size, int) else int(size[0])
        encoder = build_encoder(pretrained, num_classes=0)
        transform = view_transform(side, IMAGENET_MEAN, IMAGENET_STD)
        images = torch.stack([transform(p.convert("RGB")) for p in pictures])
        maps.append(attention_maps(encoder, images).numpy())
        if shown is None or shown.shape[1] < side:
            shown = denormalize(images, IMAGENET_MEAN, IMAGENET_STD).permute(0, 2, 3, 1).numpy()
    assert shown is not None  # at least one checkpoint (argparse: nargs="+")
    path = save_attention_grid(shown, maps, labels, args.output, args.max_heads)
    print(f"wrote {path} ({len(pictures)} images; {', '.join(labels)})")
    return 0
