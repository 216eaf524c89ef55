"""Where a result came from: the commit of the code that ran and the command that ran it, recorded in
every training checkpoint, the study's results and the model cards of exports."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

# The checkout this package runs from (src/mixmim/utils -> the repository), when it is one.
ROOT = Path(__file__).resolve().parents[3]


def git_commit() -> str:
    """HEAD of the checkout this code runs from, with ``+changes`` when tracked source files differ;
    "unknown" for an installed wheel (no checkout of its own: a repository that merely contains the
    environment is not asked)."""
    if not (ROOT / ".git").exists() or not (ROOT / "src" / "mixmim").is_dir():
        return "unknown"
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src", "configs"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def command_line(argv: list[str] | None = None) -> str:
    """The command as the user typed it, ``mixmim <verb> ...`` for the console script (or
    ``python -m mixmim``), the script otherwise; shell-quoted so it can be pasted back."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    program = Path(argv[0]).name
    if program in ("mixmim", "__main__.py", "-m") or program.startswith("mixmim"):
        return shlex.join(["mixmim", *argv[1:]])
    return shlex.join([program, *argv[1:]])
