"""Entry points of the transfer verbs: resolve a verb's config (with the small-data rule where it
applies) and run its task on the training loop (k-NN has no training: it extracts and scores)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixmim.config import (
    VERB_DEFAULTS,
    ConfigError,
    FinetuneRunConfig,
    load_run_config,
    merge_trees,
    read_recipe,
    resolve_tree,
)
from mixmim.utils.typed import apply_overrides

if TYPE_CHECKING:
    from mixmim.training.task import Task

log = logging.getLogger("mixmim")

# What a verb runs with no --config: fine-tuning follows the small-data rule (every key it does not
# override is the rule's), the others their verb's defaults.
CLI_BASE: dict[str, dict[str, Any]] = {"finetune": {"finetune": {"rule": "small_data"}}}


def load_transfer_config(verb: str, path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                         base: dict[str, Any] | None = None):
    """The validated run config of ``verb`` from a recipe and overrides. Without a recipe the verb's
    command-line base applies; a fine-tuning run whose ``finetune.rule`` is ``small_data`` then takes
    every key the user did not set from :func:`mixmim.transfer.small_data.small_data_settings`, which
    needs the size of the labelled set (the data is scanned once here)."""
    base = base if base is not None else (CLI_BASE.get(verb, {}) if path is None else {})
    config = load_run_config(verb, tree=resolve_tree(verb, path, overrides, base))
    if not (isinstance(config, FinetuneRunConfig) and config.finetune.rule == "small_data"):
        return config
    from mixmim.transfer.small_data import count_labelled, describe_rule, small_data_settings

    images, classes = count_labelled(config)
    rule = small_data_settings(images, classes)
    user = merge_trees(base, apply_overrides(read_recipe(path) if path is not None else {}, list(overrides)))
    if "base_lr" in (user.get("optim") or {}):
        rule["optim"].pop("lr", None)  # the user's base lr (scaled with the batch) replaces the rule's peak
    tree = merge_trees(merge_trees(VERB_DEFAULTS[verb], rule), user)
    config = load_run_config(verb, tree=tree)
    log.info("%s", describe_rule(images, classes, rule, user))
    return config


def run_transfer(config: Any, resume: bool = False, overwrite: bool = False,
                 allow_changes: bool = False) -> dict[str, Any]:
    """Train (or, for k-NN, evaluate) what ``config`` describes; a summary with ``results``."""
    from mixmim.training.loop import train

    verb = config.verb
    if verb == "knn":
        if resume:
            raise ConfigError("mixmim knn: --resume has nothing to continue (k-NN trains nothing)")
        from mixmim.transfer.knn import run_knn

        return {"results": run_knn(config), "stopped": None}
    task_class: Callable[[Any], Task]
    if verb == "finetune":
        from mixmim.transfer.finetune import FinetuneTask as task_class
    elif verb == "linprobe":
        from mixmim.transfer.linprobe import ProbeTask as task_class
    elif verb == "segment":
        from mixmim.transfer.segmentation import SegmentTask as task_class
    elif verb == "detect":
        from mixmim.transfer.detection import DetectTask as task_class
    else:
        raise ConfigError(f"{verb!r} is not a transfer verb")
    return train(task_class(config), resume=resume, overwrite=overwrite, allow_changes=allow_changes)
