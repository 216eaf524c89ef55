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
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def run(args: argparse.Namespace) -> int:
    import torch

    from mixmim.interop.export import save_encoder
    from mixmim.interop.meta import CHECKPOINT_FORMAT, CLASSIFIER_FORMAT
    from mixmim.interop.official import convert_official, is_pretraining_state
    from mixmim.interop.torch_files import load_torch_file
    from mixmim.methods.factory import create_pretrainer
    from mixmim.models.registry import MODELS, create_classifier, family_of
    from mixmim.models.resize import state_mismatch
    from mixmim.utils.files import atomic_write

    source, out = Path(args.checkpoint), Path(args.output)
    if args.img_size < 1:
        raise ValueError(f"--img-size {args.img_size}: expected a positive size in pixels")
    if args.model not in MODELS or family_of(args.model) != "mixmim":
        raise ValueError(f"--model {args.model}: release checkpoints are MixMIM encoders (mixmim_tiny, mixmim_base, "
                         "mixmim_large, mixmim_huge, ...); `mixmim info` lists them")
    if out.is_dir():
        raise ValueError(f"--output {out} is a folder; name a .pt or .safetensors file")
    if out.exists() and not args.overwrite and out.suffix != ".safetensors":
        raise ValueError(f"--output {out} exists; pass --overwrite to replace it")
    raw = load_torch_file(source, "release checkpoint")
    if raw.get("format") in (CHECKPOINT_FORMAT, CLASSIFIER_FORMAT):
        raise ValueError(f"{source} is already a mixmim file ({raw['format']}); convert reads release checkpoints. "
                         "Use `mixmim export --checkpoint` to write its encoder as safetensors")
    state = convert_official(raw)
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source} holds no state dict of tensors (expected a release checkpoint)")
    pretraining = any(k.startswith("decoder.") for k in state)

    def build():
        if pretraining:
            return create_pretrainer("mixmim", args.model, img_size=args.img_size)
        head = state.get("head.weight")
        return create_classifier(args.model, num_classes=head.shape[0] if head is not None else 1000,
                                 img_size=args.img_size)

    with torch.device("meta"):  # the shapes only: a wrong --model costs nothing
        problem = state_mismatch(state, build().state_dict())
    if problem:
        raise ValueError(f"{source} does not fit {args.model} at {args.img_size} px ({problem}); pass the right "
                         "--model and --img-size")
    module = build()
    module.load_state_dict(state)
    if out.suffix == ".safetensors":
        encoder = module.encoder if pretraining else module
        weights, meta = save_encoder(encoder, out, metadata={"source": str(source), "model": args.model},
                                     include_head=not pretraining, overwrite=args.overwrite)
        print(f"wrote {weights} and {meta}")
    else:
        atomic_write(out, lambda tmp: torch.save(state, tmp))
        kind = "pretraining" if is_pretraining_state(state) or pretraining else "classifier"
        print(f"wrote {out} ({kind} state dict, {len(state)} tensors, loads strictly into {args.model})")
    return 0
