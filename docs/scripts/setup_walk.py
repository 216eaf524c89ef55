"""The walk of one fine-tuning setup through the code (issue 31): from a run folder to the classifier the
loop trains, which of mixmim's files the path passes through, in order, and which it enters again
after it had left them.

    python docs/scripts/setup_walk.py [OUT.json]
    git archive d5acc05 | tar -x -C /tmp/before && PYTHONPATH=/tmp/before/src python docs/scripts/setup_walk.py

It pretrains a tiny model for one step, then traces Python calls (``sys.setprofile``) while
``resolve_model`` reads the run's weights and ``build_classifier`` builds the encoder with a 10-class
head. A file is *entered* when a call goes into it while none of its frames is running; it is entered
*from* the mixmim file of the calling frame. A file entered from two different files is a path that
goes back and forth (A calls B, then C calls B again); one file calling two functions of another, or
its own helpers, is one visit.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import mixmim

ROOT = Path(__file__).resolve().parents[2]


def walk() -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_run
    from mixmim.cli import main
    from mixmim.config import load_run_config
    from mixmim.transfer.classifier import build_classifier, resolve_model

    tmp = Path(tempfile.mkdtemp())
    assert main(["pretrain", *tiny_run(tmp, "train.max_steps=1", "train.checkpoint_every=1",
                                       "train.trackers=[csv]")]) == 0
    config = load_run_config("finetune", tree={"checkpoint": str(tmp / "t"), "data": {"source": "bundled"}})
    package = Path(mixmim.__file__).resolve().parent
    sequence: list[str] = []
    active: Counter[str] = Counter()  # running frames per file
    entered_from: dict[str, set[str]] = {}  # file -> the files that entered it

    def name_of(frame) -> str | None:
        path = Path(frame.f_code.co_filename)
        return path.relative_to(package).as_posix() if package in path.parents else None

    def caller_of(frame) -> str:
        frame = frame.f_back
        while frame is not None and name_of(frame) is None:
            frame = frame.f_back
        return name_of(frame) if frame is not None else "<outside>"

    def profile(frame, event, arg):
        name = name_of(frame)
        if name is None or event not in ("call", "return"):
            return
        if event == "return":
            active[name] -= 1
            return
        if active[name] == 0:
            entered_from.setdefault(name, set()).add(caller_of(frame))
        active[name] += 1
        if not sequence or sequence[-1] != name:
            sequence.append(name)

    sys.setprofile(profile)
    try:
        build_classifier(resolve_model(config), config, 10)
    finally:
        sys.setprofile(None)
    interop = sorted(f for f in set(sequence) if f.startswith("interop/"))
    return {"files": sorted(set(sequence)), "switches": len(sequence) - 1, "sequence": sequence,
            "interop_files": interop, "entered_from": {k: sorted(v) for k, v in sorted(entered_from.items())},
            "interop_entered_from_several": sorted(f for f in interop if len(entered_from[f]) > 1)}


def main() -> int:
    report = walk()
    print(f"{len(report['files'])} files, {report['switches']} switches between files")
    for name in report["interop_files"]:
        print(f"  {name} entered from {', '.join(report['entered_from'][name])}")
    print(f"interop files entered from more than one file: {report['interop_entered_from_several'] or 'none'}")
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
