"""The walk of one pretraining step through the code (issue 22): which of mixmim's files a MixMIM or
SimMIM step passes through, in order, and how often the path leaves a module and comes back.

    python docs/scripts/step_walk.py                     # this checkout
    git archive ea5c4ff | tar -x -C /tmp/before && PYTHONPATH=/tmp/before/src python docs/scripts/step_walk.py

It traces Python calls (``sys.setprofile``) during ``method(images)`` and ``loss.backward()`` of a tiny
model built through the public API (``mixmim.create_pretrainer``), keeps the calls into mixmim's own
files, and collapses consecutive calls into the same file. "Returns" counts the files the path enters
again after it has left them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import mixmim

TINY = dict(img_size=128, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=(16, 8, 8, 4))


def walk(method: str) -> list[str]:
    torch.manual_seed(0)
    extra = dict(decoder_dim=32, decoder_depth=1, decoder_num_heads=2) if method == "mixmim" else {}
    model = mixmim.create_pretrainer(method, "mixmim_tiny", **TINY, **extra)
    images = torch.randn(2, 3, 128, 128)
    root = Path(mixmim.__file__).resolve().parent
    files: list[str] = []

    def profile(frame, event, arg):
        if event != "call":
            return
        path = Path(frame.f_code.co_filename)
        if root in path.parents:
            name = path.relative_to(root).as_posix()
            if not files or files[-1] != name:
                files.append(name)

    sys.setprofile(profile)
    try:
        model(images).loss.backward()
    finally:
        sys.setprofile(None)
    return files


def main() -> int:
    report = {}
    for method in ("mixmim", "simmim"):
        files = walk(method)
        returns = len(files) - len(set(files))
        report[method] = {"files": sorted(set(files)), "switches": len(files) - 1, "returns": returns,
                          "sequence": files}
        print(f"{method}: {len(set(files))} files, {len(files) - 1} switches between files, {returns} returns")
        print("  " + " -> ".join(files))
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
