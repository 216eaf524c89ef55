"""A grid of transfer runs on one engine (``--sweep key=v1,v2`` on any transfer verb): every cell a run
of its own in the sweep's folder, cached like the study's rows, resumed where it stopped, and a report
of every cell and the best.

The papers choose their transfer settings this way: MixMIM sweeps layer decay over {0.7, 0.75, 0.8}
(section 3), MixedAE over {0.65, 0.7, 0.75} (appendix B) and its transfer learning rate over
{1e-3, 3e-3, 1e-2, 3e-2} (Table 2), each reporting the best cell. The best is chosen on the split every
cell reports (``data.val_path``, or the held-out ``data.val_fraction``), which the report says: a choice
made on the numbers it reports, as theirs is.

A cell is cached when its ``results.json`` exists and the sweep's record says it was made with the same
resolved config; a cell with checkpoints and no results is resumed; a cell whose folder holds a run of
another config stops the sweep with one line (``--overwrite`` starts such cells again).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any

from mixmim.config import ConfigError, dump_config

# What each verb's results are ranked by (higher is better).
SCORE_KEYS = {"finetune": "acc1", "linprobe": "acc1", "knn": "acc1", "segment": "miou", "detect": "box_ap"}


def parse_axes(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``["optim.lr=1e-3,3e-3", "model.window_size=[[4,4,4,2],[8,8,8,4]]"]`` -> [(key, [value, ...])]:
    comma-separated values, or a YAML list (for values that hold commas)."""
    import yaml

    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, text = spec.partition("=")
        if not sep or not key or not text:
            raise ConfigError(f"--sweep {spec!r}: expected key=v1,v2,... (e.g. optim.lr=1e-3,3e-3)")
        if text.lstrip().startswith("["):
            parsed = yaml.safe_load(text)
            if not isinstance(parsed, list):
                raise ConfigError(f"--sweep {spec!r}: {text} is not a YAML list")
            values = [_yaml(v) for v in parsed]
        else:
            values = [v.strip() for v in text.split(",") if v.strip()]
        if len(values) < 1 or len(set(values)) != len(values):
            raise ConfigError(f"--sweep {spec!r}: expected distinct values")
        if key in (k for k, _ in axes):
            raise ConfigError(f"--sweep names {key} twice")
        axes.append((key, values))
    return axes


def _yaml(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def cell_name(cell: list[tuple[str, str]]) -> str:
    """A folder name for one cell: ``lr_1e-3__layer_decay_0.7`` (each key's last part, then its value)."""
    parts = []
    for key, value in cell:
        text = re.sub(r"_+", "_", "".join(c if c.isalnum() or c in ".-+" else "_" for c in value)).strip("_")
        text = text or "value"
        parts.append(f"{key.rsplit('.', 1)[-1]}_{text}")
    return "__".join(parts)


def run_sweep(verb: str, recipe: str | None, overrides: list[str], axes: list[tuple[str, list[str]]],
              overwrite: bool = False) -> dict[str, Any]:
    """Every cell of the grid (cached, resumed or run), then the report (sweep.json, sweep.md in the
    sweep's folder: the config's ``output_dir/name``). Returns the report, or one whose ``stopped``
    names the cell a signal stopped (the same command continues it)."""
    from mixmim.transfer.run import load_transfer_config, run_transfer
    from mixmim.utils.files import atomic_write_text

    base = load_transfer_config(verb, recipe, overrides)
    folder = Path(base.output_dir) / base.name
    folder.mkdir(parents=True, exist_ok=True)
    record_file = folder / "sweep_cells.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    score_key = SCORE_KEYS[verb]
    cells: list[dict[str, Any]] = []
    grid = list(itertools.product(*[[(key, value) for value in values] for key, values in axes]))
    for number, cell in enumerate(grid, 1):
        name = cell_name(list(cell))
        cell_overrides = [*overrides, *(f"{k}={v}" for k, v in cell), f"output_dir={folder}", f"name={name}"]
        config = load_transfer_config(verb, recipe, cell_overrides)
        digest = hashlib.sha256(dump_config(config).encode()).hexdigest()
        run_dir = folder / name
        results_file = run_dir / "results.json"
        known = record.get(name)
        setting = ", ".join(f"{k}={v}" for k, v in cell)
        if run_dir.exists() and known != digest and not overwrite:
            what = "was run with another config" if known is not None else "holds a run this sweep did not make"
            raise ConfigError(f"sweep cell {run_dir} {what} ({setting}); give the sweep another --output, or "
                              "--overwrite to run such cells again")
        if results_file.is_file() and known == digest:
            status = "cached"
        else:
            started = run_dir.exists() and any((run_dir / "checkpoints").glob("*.pt")) and known == digest
            record[name] = digest
            atomic_write_text(record_file, json.dumps(record, indent=2) + "\n")
            print(f"sweep {number}/{len(grid)}: {setting} -> {run_dir}" + (" (resuming)" if started else ""),
                  flush=True)
            summary = run_transfer(config, resume=started, overwrite=overwrite and not started)
            if summary.get("stopped"):
                return {"stopped": summary["stopped"], "cell": name, "folder": str(folder)}
            status = "resumed" if started else "run"
        results = json.loads(results_file.read_text()) if results_file.is_file() else {}
        cells.append({"cell": name, "settings": dict(cell), "status": status, score_key: results.get(score_key),
                      "select": results.get("select"), "folder": str(run_dir)})
    scored = [c for c in cells if isinstance(c[score_key], (int, float))]
    best = max(scored, key=lambda c: float(c[score_key])) if scored else None
    split = (f"data.val_path={base.data.val_path}" if getattr(base.data, "val_path", None)
             else f"the held-out data.val_fraction={base.data.val_fraction} of the training data (or DATA/val)")
    report = {"verb": verb, "recipe": recipe, "score": score_key, "axes": dict(axes), "cells": cells, "best": best,
              "chosen_on": f"the evaluation split every cell reports ({split}): the best is a choice made on the "
                           "numbers it reports, as the papers' sweeps are", "folder": str(folder), "stopped": None}
    atomic_write_text(folder / "sweep.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(folder / "sweep.md", _markdown(report))
    return report


def _markdown(report: dict[str, Any]) -> str:
    keys = list(report["axes"])
    score = report["score"]
    lines = [f"# Sweep: {report['verb']} {report['recipe'] or ''}".rstrip(), "",
             "| " + " | ".join([*keys, score, "cell"]) + " |", "| " + " | ".join(["---"] * (len(keys) + 2)) + " |"]
    for c in report["cells"]:
        value = c[score]
        mark = " (best)" if report["best"] is not None and c["cell"] == report["best"]["cell"] else ""
        lines.append("| " + " | ".join([*(str(c["settings"][k]) for k in keys),
                                       ("-" if value is None else f"{value:.2f}") + mark, c["cell"]]) + " |")
    lines += ["", f"Best chosen on {report['chosen_on']}.", ""]
    return "\n".join(lines)
