"""``mixmim recipes``: the pretraining recipes shipped with the package, one line each: the name that
``mixmim pretrain --config`` takes and the first line of the recipe's header (its paper source, the
table row and what the row changes).

    mixmim recipes                    # all of them
    mixmim recipes --filter table6    # MixMIM Table 6's rows
    mixmim pretrain -c ablations/table6_filling_zero --print-config
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--filter", metavar="TEXT",
                        help="only the recipes whose name or header line contains TEXT (case-insensitive)")


def summary(path: Path) -> str:
    """The first line of a recipe's header comment (every recipe opens with one), or '' if it has none."""
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                return line.lstrip("#").strip()
            if line.strip():
                return ""
    return ""


def recipe_lines(text: str | None = None) -> list[tuple[str, str]]:
    """(name, header line) of every packaged recipe, those matching ``text`` only when it is given."""
    from mixmim.config import RECIPES, list_recipes

    rows = [(name, summary(RECIPES / f"{name}.yaml")) for name in list_recipes()]
    if text:
        rows = [(n, s) for n, s in rows if text.lower() in f"{n} {s}".lower()]
    return rows


def run(args: argparse.Namespace) -> int:
    rows = recipe_lines(args.filter)
    if not rows:
        print(f"mixmim recipes: no recipe matches {args.filter!r} (`mixmim recipes` lists them all)",
              file=sys.stderr)
        return 1
    width = max(len(name) for name, _ in rows)
    for name, text in rows:
        print(f"{name:<{width}}  {text}".rstrip())
    return 0
