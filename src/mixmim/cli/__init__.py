"""``mixmim <verb>``: the command line. One module per verb in this package, each with
``add_arguments(parser)`` and ``run(args) -> int``; imported only when its verb is used, so
``mixmim info`` does not pay for what ``mixmim pretrain`` needs."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

VERBS: dict[str, str] = {
    "pretrain": "pretrain self-supervised (MixMIM, SimMIM, ...) on images; writes runs/<name>/",
    "recipes": "list the packaged recipes (one per paper table row) by the name --config takes",
    "reconstruct": "draw originals, mixed inputs and reconstructions of a checkpoint for any images",
    "attention": "draw the last block's attention maps of one or more encoders over the same images",
    "finetune": "fine-tune a pretrained encoder for classification on an image folder or Fashion-MNIST",
    "linprobe": "train a linear classifier on the frozen encoder (BatchNorm + linear, as MAE)",
    "knn": "k-NN (cosine, k=20, temperature-weighted) accuracy of a frozen encoder",
    "segment": "train UperNet semantic segmentation on the encoder (ADE20K protocol; ADE20K or images/ + masks/)",
    "detect": "train Mask R-CNN / Cascade Mask R-CNN on the encoder, COCO box and mask AP (COCO-format data)",
    "convert": "turn a release checkpoint into this project's names (.pt or .safetensors)",
    "export": "export a checkpoint's encoder as a Hub/timm folder (config.json + model.safetensors + model card, "
              "which timm.create_model('local-dir:FOLDER') loads) or a safetensors + JSON pair",
    "info": "list the named models with parameters and FLOPs at 224",
    "study": "pretrain every arm of a study (random init, MixMIM, SimMIM, ablations...) and report what each buys",
    "shards": "pack an image folder into WebDataset tar shards (read map-style through an index)",
    "stats": "per-channel mean and std of a data set's pixels, for data.mean / data.std",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixmim", description="Mixed and masked image modeling: pretrain, "
                                     "fine-tune, probe and transfer vision backbones.")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    sub.required = True
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for verb, help_text in VERBS.items():
        verb_parser = sub.add_parser(verb, help=help_text, description=help_text)
        # Only the verb being run imports its module (and torch); `mixmim --help` stays instant.
        if verb == chosen:
            _module(verb).add_arguments(verb_parser)
    return parser


def _module(verb: str):
    return importlib.import_module(f"mixmim.cli.{verb}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (`--data x model.name=y --name z`).
    if hasattr(args, "overrides"):
        args.overrides += [a for a in extra if "=" in a and not a.startswith("-")]
        extra = [a for a in extra if not ("=" in a and not a.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from mixmim.utils.errors import UserError, one_line
    from mixmim.utils.provenance import set_command

    set_command(["mixmim", *argv])
    _console_logging()
    try:
        return int(_module(args.verb).run(args) or 0)
    except KeyboardInterrupt:
        # A second Ctrl-C (the first asks for a clean stop): what was saved stays as it was.
        if os.environ.get("MIXMIM_DEBUG"):
            raise
        print(f"mixmim {args.verb}: interrupted; files already written are intact (a checkpoint is written "
              "whole or not at all)", file=sys.stderr)
        return 130
    except (UserError, OSError, ValueError) as exc:
        # Expected failures (a path, a permission, a full disk, a damaged file, a config key, broken data)
        # are the user's to fix: one line naming what is wrong, no traceback. Anything else is a bug and
        # keeps its traceback. MIXMIM_DEBUG=1 shows the traceback of these too.
        if os.environ.get("MIXMIM_DEBUG"):
            raise
        print(f"mixmim {args.verb}: error: {one_line(exc)}", file=sys.stderr)
        return 2


def _console_logging() -> None:
    """The package's log lines on the console from the start of a verb (a run adds its log.txt later),
    so what is said before the loop starts (the small-data rule, a model name ignored) is seen."""
    import logging

    log = logging.getLogger("mixmim")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
