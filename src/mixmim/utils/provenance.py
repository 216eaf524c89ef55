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


_COMMAND: list[str] = []  # what the command line is running, set by mixmim.cli.main


def set_command(words: list[str]) -> None:
    """Record the command being run (``mixmim <verb> ...``), for checkpoints and model cards."""
    _COMMAND[:] = list(words)


def command_line() -> str:
    """The command as the user typed it, shell-quoted so it can be pasted back: the ``mixmim`` verb
    being run, or else the script and its arguments (a Python program that trains through the API)."""
    if _COMMAND:
        return shlex.join(_COMMAND)
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else ""
