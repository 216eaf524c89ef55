"""``mixmim convert``: a release checkpoint (pretraining or fine-tuning) into this project's names.

    mixmim convert mixmim_base_300e.pth --output mixmim_base.pt
    mixmim convert mixmim_base_300e.pth --output mixmim_base.safetensors --model mixmim_base   # encoder + JSON
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="release .pth file (its 'model' entry, or a bare state dict)")
    parser.add_argument("--output", required=True, help=".pt (state dict, our names) or .safetensors (encoder + JSON)")
    parser.add_argument("--model", default="mixmim_base", help="named configuration the weights belong to")
    parser.add_argument("--img-size", type=int, default=224)


def run(args: argparse.Namespace) -> int:
    import torch

    from mixmim.interop.export import save_encoder
    from mixmim.interop.official import convert_official, is_pretraining_state
    from mixmim.methods.factory import create_pretrainer
    from mixmim.models.registry import create_classifier
    from mixmim.utils.files import atomic_write

    source = Path(args.checkpoint)
    if not source.is_file():
        raise FileNotFoundError(f"checkpoint {source} does not exist")
    raw = torch.load(source, map_location="cpu", weights_only=False)
    state = convert_official(raw)
    pretraining = any(k.startswith("decoder.") for k in state)
    if pretraining:
        module = create_pretrainer("mixmim", args.model, img_size=args.img_size)
    else:
        head = state.get("head.weight")
        module = create_classifier(args.model, num_classes=head.shape[0] if head is not None else 1000,
                                   img_size=args.img_size)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source} does not fit {args.model}: missing {missing[:6]}, unexpected {unexpected[:6]}; "
                         "pass the right --model")
    out = Path(args.output)
    if out.suffix == ".safetensors":
        encoder = module.encoder if pretraining else module
        weights, meta = save_encoder(encoder, out, metadata={"source": str(source), "model": args.model},
                                     include_head=not pretraining)
        print(f"wrote {weights} and {meta}")
    else:
        atomic_write(out, lambda tmp: torch.save(state, tmp))
        kind = "pretraining" if is_pretraining_state(state) or pretraining else "classifier"
        print(f"wrote {out} ({kind} state dict, {len(state)} tensors, loads strictly into {args.model})")
    return 0
