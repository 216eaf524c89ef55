"""The two interfaces between the training loop and what it trains (pretraining, fine-tuning, linear
probing, segmentation): :class:`Task`, what the loop may ask of a task, and :class:`RunContext`, what a
task may ask of the loop. A task never sees the :class:`~mixmim.training.loop.Trainer` itself.

The loop owns everything a run has in common: processes and devices, DDP/FSDP, the optimiser and the
learning-rate schedule, gradient accumulation, mixed precision, the resumable data order, NaN
recovery, signals, checkpoints, logs and progress. A task owns what differs: the model, the data, the
loss of one micro-batch, the parameter groups, what to evaluate when, and what to write at the end.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset


class RunContext(Protocol):
    """What a task's hooks (:meth:`Task.evaluate`, :meth:`Task.finish`, ...) may ask of the run. The loop
    implements it; under DDP or FSDP it hides which (a task never wraps, unshards or gathers itself)."""

    device: torch.device
    run_dir: Path  # where the run writes (only the main process writes files)
    step: int  # optimiser steps done
    steps_per_epoch: int
    micro_batch: int  # images per process and micro-batch
    stopped: str | None  # what stopped the run early (a signal), None when it ran to its end
    evaluated: dict[str, float]  # the last values :meth:`Task.evaluate` returned

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's mixed precision (bf16 or fp16 autocast, or nothing)."""

    def full_module(self) -> contextlib.AbstractContextManager[nn.Module]:
        """The trained module whole, for evaluation and pictures: under FSDP its root parameters
        gathered for the block (every process enters it), else the module without DDP's wrapper."""

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole module's weights on the CPU (every process calls it; FSDP gathers)."""

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load whole weights (a full state dict) into the trained module, on every process."""


def every_epochs(every: int, total_steps: int, steps_per_epoch: int, every_steps: int = 0) -> set[int]:
    """The end of every ``every``-th epoch (none when 0), every ``every_steps``-th step (none when 0) and
    the end of the run: when the transfer tasks evaluate."""
    steps = set()
    for span in (every * steps_per_epoch, every_steps):
        if span > 0:
            steps |= set(range(span, total_steps + 1, span))
    return steps | {total_steps}


@dataclass
class StepOutput:
    """What one micro-batch gives the loop: the loss to minimise and anything else worth logging
    (window means over ranks, e.g. MixedAE's TopK accuracy per layer)."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Task:
    """Base class of every task. ``config`` is the run config of the task's verb (it has ``name``,
    ``output_dir``/``run_dir``, ``train``, ``optim`` and ``model``)."""

    config: Any
    name: str = "task"

    # ------------------------------------------------------------------ what to train
    def build_model(self) -> nn.Module:
        """The module the loop trains, on the CPU; called once per process after seeding with
        ``train.seed``, so every process starts from the same weights."""
        raise NotImplementedError

    def dataset(self) -> Dataset:
        """Training data, map-style: ``dataset[(index, seed)]`` is a dict (at least the keys
        :meth:`step` reads, plus ``skipped``: unreadable files replaced), its augmentation a pure
        function of ``(index, seed)``."""
        raise NotImplementedError

    def collate(self, items: list[dict]) -> dict:
        """Stack a micro-batch (default: the pretraining data's collate)."""
        from mixmim.data import collate

        return collate(items)

    def to_device(self, batch: dict, device: torch.device) -> dict:
        """A collated micro-batch on ``device`` (a data set that decodes on the GPU does it here)."""
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def batch_multiple(self) -> int:
        """Every micro-batch must be a multiple of this (MixedAE's groups, Mixup's pairs)."""
        return 1

    def lr_batch(self, global_batch: int) -> int:
        """The batch the linear lr scaling rule counts (the global batch unless a method says else)."""
        return global_batch

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimiser parameter groups (weight decay per group, ``lr_scale`` for layer decay)."""
        raise NotImplementedError

    def repeated_blocks(self, model: nn.Module) -> list[nn.Module]:
        """Modules FSDP shards one by one (the encoder's and the decoder's blocks)."""
        blocks = getattr(model, "repeated_blocks", None)
        return list(blocks()) if callable(blocks) else []

    # ------------------------------------------------------------------ one step
    def step(self, model: nn.Module, batch: dict) -> StepOutput:
        """The loss of one micro-batch (``model`` is the wrapped module: call it for DDP's hooks)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ when to evaluate, and how
    def evaluation_steps(self, total_steps: int, steps_per_epoch: int) -> set[int]:
        """Steps after which :meth:`evaluate` runs (0: before the first step)."""
        return set()

    def evaluate(self, run: RunContext, step: int) -> dict[str, float]:
        """Values for metrics.csv at ``step`` (every process takes part)."""
        return {}

    @property
    def columns(self) -> list[str]:
        """metrics.csv columns this task adds (so the header is complete from the first row)."""
        return []

    # ------------------------------------------------------------------ checkpoints and the end
    def state_dict(self) -> dict[str, Any]:
        """Task state a resumed run needs (kept in the checkpoint under ``task``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any], path: Any = None) -> None:
        """Restore :meth:`state_dict`; refuse in one line a checkpoint this task cannot continue."""

    def checkpoint_extras(self) -> dict[str, Any]:
        """Top-level keys of the checkpoint beside the loop's (what readers of the file look for)."""
        return {}

    def on_checkpoint(self, run: RunContext) -> None:
        """After a periodic checkpoint (curves, pictures)."""

    def on_pictures(self, run: RunContext) -> None:
        """Every ``train.picture_every`` steps."""

    def finish(self, run: RunContext, summary: dict[str, Any]) -> None:
        """After the last step and the last checkpoint: exports, reports; may add to ``summary``."""

    def describe(self, run: RunContext) -> str:
        """One line for the start of the log: what is trained on what."""
        return self.name
