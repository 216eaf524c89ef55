"""``mixmim reconstruct``: the reconstruction grid of a checkpoint for any images.

    mixmim reconstruct --checkpoint runs/demo --images photo1.jpg photo2.jpg ... --output recon.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder, one of its checkpoints (.pt), or a release pretraining checkpoint")
    parser.add_argument("--images", nargs="+", required=True,
                        help="image files or folders (the first --max-images images), or 'fashion_mnist' (its test "
                             "split) or 'bundled' (the photos shipped with scikit-image)")
    parser.add_argument("--output", default="reconstruction.png")
    parser.add_argument("--model", default="mixmim_base", help="encoder name, for release checkpoints only")
    parser.add_argument("--img-size", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--max-images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the mask")
    parser.add_argument("--raw-prediction", action="store_true",
                        help="draw a normalised-pixel prediction as it is, without giving each cell the mean and "
                             "variance of the true cell (the default, as MAE's pictures)")


def _pictures(inputs: list[str], limit: int) -> list:
    """PIL images to reconstruct: files and folders, or a named data set."""
    from mixmim.data.images import load_rgb

    if inputs == ["fashion_mnist"]:
        from mixmim.data.datasets import FashionMNISTImages

        test = FashionMNISTImages(transform=None, split="test")
        return [test.load(i) for i in range(min(limit, len(test)))]
    if inputs == ["bundled"]:
        from mixmim.data.datasets import bundled_photo_paths

        return [load_rgb(p) for p in bundled_photo_paths()[:limit]]
    from mixmim.data.images import BadImage

    pictures, skipped = [], 0
    for path in _collect(inputs, limit):
        try:
            pictures.append(load_rgb(path))
        except BadImage as exc:  # one bad file among many: skip it, say so, go on
            skipped += 1
            print(f"mixmim reconstruct: skipping unreadable image {path}: {exc}", file=sys.stderr)
    if not pictures:
        raise ValueError(f"no readable image in {' '.join(inputs)} ({skipped} unreadable)")
    return pictures


def _collect(inputs: list[str], limit: int) -> list[Path]:
    from mixmim.data.scan import scan_images

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += scan_images(path).files
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"image {path} does not exist")
    return files[:limit]


def load_pretrainer(checkpoint: str, model_name: str, img_size: int | None):
    """(pretrainer module in eval mode, its run config or None) from our run/checkpoint or a release file."""
    import torch

    from mixmim.config import build_dataclass, RunConfig
    from mixmim.interop.checkpoint import load_checkpoint, resolve_checkpoint
    from mixmim.interop.official import convert_official
    from mixmim.methods.factory import build_pretrainer, create_pretrainer

    path = resolve_checkpoint(checkpoint)
    raw = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(raw, dict) and raw.get("format") == "mixmim-checkpoint/1":
        state = load_checkpoint(path)  # again, through the checksum check
        config = build_dataclass(RunConfig, state["config"])
        if img_size is not None:
            config.model.img_size = img_size
        m = config.model
        method = build_pretrainer(config.method_name(), config.method_options(), m.name, m.encoder_overrides())
        method.load_state_dict(state["model"])
        return method.eval(), config
    state = convert_official(raw, target="pretrainer")
    kwargs = {"img_size": img_size} if img_size else {}
    method = create_pretrainer("mixmim", model_name, **kwargs)
    method.load_state_dict(state, strict=True)
    return method.eval(), None


def run(args: argparse.Namespace) -> int:
    import torch

    from mixmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, view_transform
    from mixmim.viz.reconstruction import picture_note, reconstruction_rows, save_reconstruction_grid

    method, config = load_pretrainer(args.checkpoint, args.model, args.img_size)
    pictures = _pictures(args.images, args.max_images)
    groups = method.num_groups
    if len(pictures) < groups:
        raise ValueError(f"{len(pictures)} image(s) given; this method mixes {groups} images, give at least {groups}")
    pictures = pictures[: len(pictures) // groups * groups]
    size = method.encoder.img_size[0]
    mean, std = (config.data.mean, config.data.std) if config else (IMAGENET_MEAN, IMAGENET_STD)
    transform = view_transform(size, mean, std)
    images = torch.stack([transform(p) for p in pictures])
    torch.manual_seed(args.seed)
    with torch.no_grad():
        out = method(images, picture=True)
    picture = out.picture
    rows = reconstruction_rows(out, images, mean, std, raw=args.raw_prediction)
    path = save_reconstruction_grid(rows, args.output, cell=picture.cell,
                                    title=f"{Path(args.checkpoint).name}: loss {float(out.loss):.4f}",
                                    note=picture_note(picture.norm_pix, args.raw_prediction))
    print(f"wrote {path} ({len(pictures)} images, loss {float(out.loss):.4f})")
    return 0
