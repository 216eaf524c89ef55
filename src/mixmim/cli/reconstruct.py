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
            print(f"mixmim reconstruct: warning: skipping unreadable image {path}: {exc}", file=sys.stderr)
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
    """(pretrainer module in eval mode, its run config or None) from our run/checkpoint or a release file,
    the file read once and without running code from it. The method is built as the run built it
    (:func:`mixmim.methods.factory.build_method`: image channels, SimMIM's pixel statistics)."""
    from mixmim.config import RunConfig, build_dataclass
    from mixmim.interop.checkpoint import resolve_checkpoint
    from mixmim.interop.meta import CHECKPOINT_FORMAT, CLASSIFIER_FORMAT, is_hub_folder
    from mixmim.interop.official import convert_official
    from mixmim.interop.torch_files import load_torch_file
    from mixmim.methods.factory import build_method, create_pretrainer

    if is_hub_folder(checkpoint) or Path(checkpoint).suffix in (".safetensors", ".json"):
        raise ValueError(f"{checkpoint} is an encoder export (no decoder): reconstruct needs a pretraining run, "
                         "its checkpoint, or a release pretraining checkpoint")
    path = resolve_checkpoint(checkpoint)
    raw = load_torch_file(path)
    if raw.get("format") == CHECKPOINT_FORMAT:
        config = raw.get("config")
        if not isinstance(config, dict) or "method" not in config:
            raise ValueError(f"{path} is a checkpoint of a transfer run (finetune, linprobe, segment), which has "
                             "no decoder: reconstruct needs a pretraining run")
        config = build_dataclass(RunConfig, config)
        if img_size is not None:
            config.model.img_size = img_size
        method = build_method(config)
        _check_fits(method, raw["model"], path, config.model.name)
        method.load_state_dict(raw["model"])
        return method.eval(), config
    if raw.get("format") == CLASSIFIER_FORMAT or not any(k.startswith("decoder.") for k in convert_official(raw)):
        raise ValueError(f"{path} holds a classifier or an encoder without its decoder: reconstruct needs a "
                         "pretraining checkpoint")
    import torch

    kwargs = {"img_size": img_size} if img_size else {}
    state = convert_official(raw, target="pretrainer")
    with torch.device("meta"):  # the shapes only: a wrong --model costs nothing
        _check_fits(create_pretrainer("mixmim", model_name, **kwargs), state, path, model_name)
    method = create_pretrainer("mixmim", model_name, **kwargs)
    method.load_state_dict(state)
    return method.eval(), None


def _check_fits(method, state, path: Path, model_name: str) -> None:
    """Weights of another model (or size) are one line naming both."""
    from mixmim.models.resize import state_mismatch

    problem = state_mismatch(state, method.state_dict())
    if problem:
        raise ValueError(f"{path} does not fit {model_name} ({problem}); for a release checkpoint pass its --model "
                         "(and --img-size)")


def run(args: argparse.Namespace) -> int:
    import torch

    from mixmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, view_transform
    from mixmim.viz.reconstruction import picture_note, reconstruction_rows, save_reconstruction_grid

    if args.max_images < 1:
        raise ValueError(f"--max-images {args.max_images}: expected a positive number of images")
    if args.img_size is not None and args.img_size < 1:
        raise ValueError(f"--img-size {args.img_size}: expected a positive size in pixels")
    if Path(args.output).is_dir():
        raise ValueError(f"--output {args.output} is a folder; name the picture file (e.g. "
                         f"{Path(args.output) / 'reconstruction.png'})")
    method, config = load_pretrainer(args.checkpoint, args.model, args.img_size)
    pictures = _pictures(args.images, args.max_images)
    groups = method.num_groups
    if len(pictures) < groups:
        raise ValueError(f"{len(pictures)} image(s) given; this method mixes {groups} images, give at least {groups}")
    pictures = pictures[: len(pictures) // groups * groups]
    size = method.encoder.img_size[0]
    channels = config.data.channels if config else 3
    if config is None:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif config.data.normalize == "dataset":  # measured by the run and kept in its config
        mean, std = config.data.mean, config.data.std
    else:
        from mixmim.data import normalization

        mean, std = normalization(config.data, channels)
    transform = view_transform(size, mean, std)
    images = torch.stack([transform(p.convert("L") if channels == 1 else p) for p in pictures])
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
