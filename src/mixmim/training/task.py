"""What the training loop may ask of what it trains: the one interface between
:class:`~mixmim.training.loop.Trainer` and a task (pretraining, fine-tuning, linear probing,
segmentation).

The loop owns everything a run has in common: processes and devices, DDP/FSDP, the optimiser and the
learning-rate schedule, gradient accumulation, mixed precision, the resumable data order, NaN
recovery, signals, checkpoints, logs and progress. A task owns what differs: the model, the data, the
loss of one micro-batch, the parameter groups, what to evaluate when, and what to write at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

if TYPE_CHECKING:  # pragma: no cover
    from mixmim.training.loop import Trainer


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

    def evaluate(self, trainer: "Trainer", step: int) -> dict[str, float]:
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

    def on_checkpoint(self, trainer: "Trainer") -> None:
        """After a periodic checkpoint (curves, pictures)."""

    def on_pictures(self, trainer: "Trainer") -> None:
        """Every ``train.picture_every`` steps."""

    def finish(self, trainer: "Trainer", summary: dict[str, Any]) -> None:
        """After the last step and the last checkpoint: exports, reports; may add to ``summary``."""

    def describe(self, trainer: "Trainer") -> str:
        """One line for the start of the log: what is trained on what."""
        return self.name
