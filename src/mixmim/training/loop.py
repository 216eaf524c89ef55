"""The training loop, for every task (:class:`~mixmim.training.task.Task`: pretraining, fine-tuning,
linear probing, segmentation).

One step = ``accum_steps`` micro-batches per process, then one optimiser update. Randomness is a pure
function of (seed, step, micro-batch): the data order and augmentation come from
:class:`~mixmim.data.sampler.ResumableSampler`, and the global RNGs (torch, NumPy, Python) are
re-seeded before every micro-batch (masks, drop path, Mixup). So a resumed run, or the same global
batch split over a different number of processes, follows the same trajectory.

The loop knows nothing of what it trains; what it may ask is written in :class:`Task`.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from mixmim.config import ConfigError, build_dataclass, dump_config
from mixmim.data.sampler import ResumableSampler, sample_seed, steps_per_epoch
from mixmim.interop.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from mixmim.models.base import use_matmul_attention
from mixmim.models.resize import state_mismatch
from mixmim.training import distributed as D
from mixmim.training.logs import MetricsLog, SkippedFiles, log, setup_logging
from mixmim.training.optim import build_optimizer
from mixmim.training.run_folder import RunLock, check_resume_config, clear_run
from mixmim.training.schedule import build_schedule, set_lr
from mixmim.training.signals import StopRequest, _worker_init
from mixmim.training.task import Task
from mixmim.utils.cpus import worker_count
from mixmim.utils.errors import UserError, one_line
from mixmim.utils.files import atomic_write_text, remove_stale_temporaries
from mixmim.utils.provenance import command_line, git_commit

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

    from mixmim.data.stream import ShardStream

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_amp(request: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs that have it, fp16 (with a scaler) on older GPUs, fp32 on CPU."""
    if request != "auto":
        return request
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def seed_all(seed: int) -> None:
    """torch (every device), NumPy and Python's ``random``: what masks, drop path and timm's Mixup draw from."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class NonFiniteLossError(UserError, RuntimeError):
    """The loss stayed NaN/inf after reloading a checkpoint with a lower learning rate."""


class Trainer:
    """Holds everything one run needs; :meth:`run` trains until the step budget or a stop request."""

    def __init__(self, task: Task, info: D.DistInfo, device: torch.device, overwrite: bool = False):
        self.task, self.info, self.device = task, info, device
        self.config = task.config
        t = self.config.train
        workers = worker_count(t.num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        self._workers_note = None
        if workers != t.num_workers:
            self._workers_note = (f"train.num_workers {t.num_workers} -> {workers}: one per CPU core this process "
                                  "may use")
            t.num_workers = workers  # the training loader, evaluation loaders and feature caches alike
        self.global_batch = t.batch_size
        self.micro_batch = self._micro_batch(t)
        self.amp = resolve_amp(t.amp, device)
        if self.amp == "fp16" and device.type == "cpu":
            raise ConfigError("config key 'train.amp': fp16 needs a GPU; use bf16 or fp32 on the CPU")
        self.run_dir, self.overwrite = self.config.run_dir, overwrite
        self.commit, self.command = git_commit(), command_line()  # kept in every checkpoint and model card
        self.config_changes: list[dict[str, Any]] = []  # what --resume-with-changes accepted, and when
        self._prepare_folder()
        seed_all(t.seed)  # identical initial weights on every rank
        self.model = task.build_model().to(device)
        self._cpu_bf16_attention(device)
        self._check_multiple(task.batch_multiple())
        self.dataset = task.dataset()
        size = len(cast(Sized, self.dataset))  # every task's training data has a length
        # A stream (data.source=stream) is an iterable this rank reads its own shards from; its length
        # is this rank's share of an epoch.
        self.streaming = isinstance(self.dataset, IterableDataset)
        images = size * (info.world_size if self.streaming else 1)
        self.steps_per_epoch = steps_per_epoch(images, self.global_batch)
        if self.steps_per_epoch < 1:
            raise ConfigError(f"config key 'train.batch_size': {self.global_batch} is larger than the data set "
                              f"({size} images)")
        self.total_steps = t.epochs * self.steps_per_epoch
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps) if t.epochs else t.max_steps
        self.lr_batch = task.lr_batch(self.global_batch)
        self.schedule = build_schedule(self.config.optim, self.total_steps, self.steps_per_epoch, self.lr_batch)
        self.wrapped = D.wrap(self.model, info, device, t.distributed, task.repeated_blocks(self.model),
                              param_dtype=torch.bfloat16 if self.amp == "bf16" else None)
        self.optimizer = build_optimizer(task.param_groups(D.unwrap(self.wrapped)), self.config.optim,
                                         self.schedule.peak, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == "fp16" else None
        self.sampler = None if self.streaming else ResumableSampler(size, self.global_batch, t.seed,
                                                                    info.rank, info.world_size)
        self.loader = self._loader(t)
        self.skipped = SkippedFiles(self.run_dir / "skipped.txt" if info.is_main else None, size,
                                    self.config.data.max_bad_fraction)
        if problems := getattr(self.dataset, "scan_problems", None):
            self.skipped.note(problems)
        self.metrics = MetricsLog(self.run_dir, enabled=info.is_main,
                                  columns=["step", "epoch", "loss", "lr", "img_per_s", *task.columns],
                                  trackers=t.trackers, config=self.config.to_dict(), run_name=self.config.name)
        self.evaluations = task.evaluation_steps(self.total_steps, self.steps_per_epoch)
        self.step, self.lr_scale, self.nan_streak, self.lowered_lr = 0, 1.0, 0, False
        self.current_lr = self.schedule(0)
        self.last_checkpoint: Path | None = None
        self.method_metrics: dict[str, list[float]] = {}
        self.evaluated: dict[str, float] = {}

    # ------------------------------------------------------------------ setup helpers
    def _micro_batch(self, t) -> int:
        parts = self.info.world_size * t.accum_steps
        if t.batch_size < self.info.world_size:
            raise ConfigError(f"config key 'train.batch_size': {t.batch_size} is smaller than the world size "
                              f"{self.info.world_size}; every process needs at least one image")
        if t.batch_size % parts:
            raise ConfigError(f"config key 'train.batch_size': {t.batch_size} is not divisible by world size x "
                              f"accum_steps = {self.info.world_size} x {t.accum_steps}")
        return t.batch_size // parts

    def _cpu_bf16_attention(self, device: torch.device) -> None:
        """bf16 on the CPU: attention by matmuls, as SDPA's fused CPU kernel is slower in bf16 (said)."""
        if device.type == "cpu" and self.amp == "bf16":
            matmul_layers = use_matmul_attention(self.model)
            if matmul_layers:
                log.info("bf16 on the CPU: %d attention layers use matmuls instead of SDPA's fused CPU kernel "
                         "(slower in bf16)", matmul_layers)

    def _check_multiple(self, multiple: int) -> None:
        if self.micro_batch % multiple:
            t = self.config.train
            raise ConfigError(f"config key 'train.batch_size': {self.task.name} needs micro-batches that are "
                              f"multiples of {multiple}; the micro-batch of each process ({self.micro_batch} = batch "
                              f"{t.batch_size} / {self.info.world_size} process(es) / accum_steps {t.accum_steps}) "
                              "is not")

    def _prepare_folder(self) -> None:
        """The run folder and its log; nothing in it is deleted here (``--overwrite`` acts in
        :meth:`_begin`, once the model, the data and the trackers are known to work)."""
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(self.run_dir if self.info.is_main else None, self.info.is_main)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", self.config.train.keep_checkpoints)

    def _loader(self, t) -> DataLoader:
        workers = t.num_workers
        # Persistent workers keep the sampler's order in the main process; a stream's workers hold its
        # epoch themselves, so they start again each epoch.
        return DataLoader(self.dataset, batch_size=self.micro_batch, sampler=self.sampler,
                          collate_fn=self.task.collate, num_workers=workers,
                          pin_memory=t.pin_memory and self.device.type == "cuda",
                          worker_init_fn=_worker_init if workers else None, prefetch_factor=4 if workers else None,
                          persistent_workers=workers > 0 and not self.streaming)

    def _set_epoch(self, epoch: int, step_in_epoch: int) -> None:
        if self.streaming:  # the stream counts this rank's micro-batches
            cast("ShardStream", self.dataset).set_epoch(epoch, step_in_epoch * self.config.train.accum_steps)
        else:
            assert self.sampler is not None  # made whenever the data is not a stream
            self.sampler.set_epoch(epoch, step_in_epoch)

    @property
    def fsdp(self) -> bool:
        return self.config.train.distributed == "fsdp" and self.info.enabled

    def autocast(self):
        dtype = AMP_DTYPES[self.amp]
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def module(self) -> nn.Module:
        """The trained module without DDP's wrapper (FSDP's sharded module as it is)."""
        return D.unwrap(self.wrapped)

    # ------------------------------------------------------------------ the RunContext a task sees
    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    @contextlib.contextmanager
    def full_module(self):
        """The module whole for evaluation: FSDP's root parameters gathered (its blocks gather in their
        own forward), DDP's wrapper taken off."""
        if not self.fsdp:
            yield self.module()
            return
        self.wrapped.unshard()
        try:
            yield self.wrapped
        finally:
            self.wrapped.reshard()

    def full_state_dict(self) -> dict[str, Any]:
        return D.full_state_dict(self.wrapped, self.config.train.distributed)

    def load_full_state_dict(self, state: dict[str, Any]) -> None:
        D.load_states(self.wrapped, None, state, None, self.config.train.distributed)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        mode = self.config.train.distributed
        return {
            "model": self.full_state_dict(),
            "optimizer": D.optimizer_state(self.wrapped, self.optimizer, mode),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step, "epoch": self.step / self.steps_per_epoch,
            "lr_scale": self.lr_scale, "lowered_lr": self.lowered_lr, "world_size": self.info.world_size,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "config": self.config.to_dict(), "task": self.task.state_dict(), **self.task.checkpoint_extras(),
            "trackers": self.metrics.tracker_state(),  # a resumed run continues the same W&B / MLflow run
            "commit": self.commit, "command": self.command, "config_changes": self.config_changes,
        }

    def save_checkpoint(self) -> Path | None:
        state = self.state()  # every rank takes part (FSDP gathers)
        path = None
        if self.info.is_main:
            path = self.checkpoints.save(state, self.step)
            if path is not None:
                self.last_checkpoint = path
                log.info("checkpoint %s", path)
        D.barrier()
        return path

    def load(self, path: Path) -> dict[str, Any]:
        state = load_checkpoint(path)
        self.task.load_state_dict(state.get("task") or {}, path)
        _check_architecture(path, state["model"], self.module().state_dict())
        D.load_states(self.wrapped, self.optimizer, state["model"], state["optimizer"], self.config.train.distributed)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.lowered_lr = bool(state.get("lowered_lr", False))
        self.config_changes = list(state.get("config_changes") or [])
        self.metrics.resume(state.get("trackers"))
        self.last_checkpoint = path
        return state

    # ------------------------------------------------------------------ one step
    def _sync_context(self, last: bool):
        if self.info.enabled and not last and isinstance(self.wrapped, nn.parallel.DistributedDataParallel):
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def train_step(self, micro_batches: list[dict]) -> float | None:
        """One optimiser update; returns the mean loss, or None when the step was skipped (non-finite)."""
        t = self.config.train
        self.current_lr = self.schedule(self.step) * self.lr_scale
        set_lr(self.optimizer, self.current_lr)
        self.wrapped.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for a, batch in enumerate(micro_batches):
            self.skipped.add(batch.get("skipped", []))
            batch = self.task.to_device(batch, self.device)
            seed_all(sample_seed(t.seed + 1, self.step, self.info.rank * t.accum_steps + a))
            last = a == len(micro_batches) - 1
            if self.fsdp:
                cast("FSDPModule", self.wrapped).set_requires_gradient_sync(last)  # fully_shard made it one
            try:
                with self._sync_context(last):
                    with self.autocast():
                        out = self.task.step(self.wrapped, batch)
                    scaled = out.loss / len(micro_batches)
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            except torch.OutOfMemoryError:
                raise UserError(self._out_of_memory_advice(len(batch.get("index", ())) or None)) from None
            losses.append(out.loss.detach().float())
            for key, value in out.metrics.items():
                self.method_metrics.setdefault(key, []).append(float(value))
        # One host sync and one collective per step, not per micro-batch: a non-finite loss only
        # poisons gradients, which are dropped here on every rank before they reach the weights.
        loss = torch.stack(losses).mean()
        if D.any_true(not bool(torch.isfinite(loss)), self.device):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self._update()
        return float(loss)

    def _out_of_memory_advice(self, micro: int | None) -> str:
        """One line for a micro-batch that does not fit the device: the ``train.accum_steps`` that keeps
        the global batch in micro-batches half the size (a recipe's batch 1024 is 8 GPUs' batch)."""
        t = self.config.train
        micro = micro or t.batch_size // max(1, self.info.world_size * t.accum_steps)
        doubled = t.accum_steps * 2
        hint = (f"try train.accum_steps={doubled} (the same global batch {t.batch_size} in micro-batches of "
                f"{max(1, micro // 2)})" if micro > 1 else "the batch cannot be split further; try a smaller "
                "model.img_size or model.grad_checkpointing=true")
        if micro > 1 and not getattr(getattr(self.config, "model", None), "grad_checkpointing", True):
            hint += ", or model.grad_checkpointing=true"
        return (f"out of memory on {self.device} at step {self.step + 1} with micro-batches of {micro} images "
                f"(train.batch_size {t.batch_size} over {self.info.world_size} process(es) x train.accum_steps "
                f"{t.accum_steps}): {hint}")

    def _update(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), self.config.optim.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _on_nonfinite(self) -> bool:
        """Count a skipped step; after ``nan_patience`` in a row reload the last checkpoint and halve the
        learning rate, once. Returns True when the data position moved (reload)."""
        self.nan_streak += 1
        patience = self.config.train.nan_patience
        log.warning("step %d: loss is not finite; step skipped, weights untouched (%d/%d in a row)",
                    self.step + 1, self.nan_streak, patience)
        if self.nan_streak < patience:
            return False
        if self.lowered_lr:
            raise NonFiniteLossError(
                f"loss not finite for {patience} steps in a row even after reloading a checkpoint with a halved "
                f"learning rate (step {self.step + 1}); last good checkpoint: {self.last_checkpoint}")
        latest = self.checkpoints.latest()
        self.nan_streak = 0
        self.lowered_lr = True
        if latest is None:
            self.lr_scale *= 0.5
            log.warning("no checkpoint to reload yet; halved the learning rate (scale %.3g) and continue",
                        self.lr_scale)
            return False
        self.load(latest)  # restores the checkpoint's lr_scale; halve it below
        self.lowered_lr = True
        if self.info.is_main:
            self.metrics.truncate_after(self.step)  # the steps after it are trained again
        self.lr_scale *= 0.5
        log.warning("reloaded %s (step %d) and halved the learning rate (scale %.3g)", latest, self.step, self.lr_scale)
        return True

    # ------------------------------------------------------------------ the loop
    def run(self, resume: bool = False, allow_changes: bool = False) -> dict[str, Any]:
        self._begin(resume, allow_changes)
        self.started = time.perf_counter()
        self.progress = self._progress_bar()
        with StopRequest() as stop:
            while self.step < self.total_steps and self.stopped is None:
                epoch = self.step // self.steps_per_epoch
                self._set_epoch(epoch, self.step % self.steps_per_epoch)
                if self._run_epoch(stop):
                    self.skipped.end_epoch(epoch)
        if self.progress is not None:
            self.progress.close()
        return self._finish()

    def _begin(self, resume: bool, allow_changes: bool = False) -> None:
        """Everything is built and checked: now the folder may change (earlier files removed with
        ``--overwrite``, a checkpoint resumed, config.yaml written) and the trackers start."""
        if self.info.is_main:
            self.checkpoints.remove_stale()  # a save killed half-way
            remove_stale_temporaries(self.run_dir)
            if self.overwrite:
                clear_run(self.run_dir)
        D.barrier()
        if resume:
            latest = self.checkpoints.latest()
            if latest is None and self.checkpoints.all_steps():
                raise CheckpointError(f"--resume: every checkpoint in {self.checkpoints.folder} is damaged (see the "
                                      "warnings above); nothing was changed. Move them away to start again, or "
                                      "--overwrite to delete them")
            if latest is None:
                log.warning("--resume: no checkpoint in %s, starting from step 0", self.checkpoints.folder)
            else:
                state = self.load(latest)
                changes = check_resume_config(latest, self._as_config(state.get("config") or {}), self.config.to_dict(),
                                              allow_changes)
                self.config_changes += [{"step": self.step, "key": k, "from": a, "to": b} for k, a, b in changes]
                log.info("resumed from %s at step %d", latest, self.step)
        elif self.checkpoints.all_steps():
            raise ConfigError(f"{self.run_dir} already holds checkpoints; pass --resume to continue that run, "
                              f"--overwrite to start it again, or choose another name (name=...)")
        if self.info.is_main:
            atomic_write_text(self.run_dir / "config.yaml", dump_config(self.config))
            self.metrics.truncate_after(self.step)
            self.metrics.start()  # a tracker that cannot start stops the run here, before step 1
        log.info("%s", self.task.describe(self))
        if self._workers_note:
            log.info("%s", self._workers_note)
        log.info("%d steps of batch %d (%d x %d process(es) x %d accumulation), peak lr %.3g, %s on %s",
                 self.total_steps, self.global_batch, self.micro_batch, self.info.world_size,
                 self.config.train.accum_steps, self.schedule.peak, self.amp, self.device)
        self.stopped: str | None = None
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self._window = {"loss": 0.0, "steps": 0, "start": time.perf_counter(), "paused": 0.0}
        if self.step == 0 and 0 in self.evaluations:
            values = self.task.evaluate(self, 0)
            if values:
                self.metrics.write(0, {"epoch": 0.0, **values})

    def _as_config(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's config with every default filled in as this version fills it, so that a field
        added since (or a section written out in full) is not taken for a change."""
        try:
            return build_dataclass(type(self.config), saved).to_dict()
        except (ConfigError, TypeError, ValueError):
            return saved

    def _progress_bar(self):
        if not (self.info.is_main and self.config.train.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, desc=self.config.name)

    def _run_epoch(self, stop: StopRequest) -> bool:
        """Train through the rest of one epoch; False when it was cut short (stop, end, NaN reload)."""
        t = self.config.train
        micro: list[dict] = []
        self._iterator: Iterator[dict] | None = iter(self.loader)
        for batch in self._iterator:
            micro.append(batch)
            if len(micro) < t.accum_steps:
                continue
            loss, micro = self.train_step(micro), []
            if loss is None:
                if self._on_nonfinite():
                    return False  # weights and step went back to the checkpoint: restart the epoch's order
            else:
                self._count(loss)
            if self.progress is not None:
                self.progress.update(self.step - self.progress.n)
            self._log_if_due(self._evaluate_if_due())
            if D.any_true(stop.requested(), self.device):
                self.stopped = stop.signal_name or "a signal on another process"
                return False
            if self.step >= self.total_steps:
                return False
            self._periodic()
        return True

    def close(self) -> None:
        """Stop the data workers and the trackers (after a normal end, a stop or an error)."""
        _shutdown_loader(getattr(self, "loader", None), getattr(self, "_iterator", None))
        self._iterator = None
        if hasattr(self, "metrics"):
            self.metrics.close()

    def _count(self, loss: float) -> None:
        self.nan_streak = 0
        self.step += 1
        self._window["loss"] += loss
        self._window["steps"] += 1
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.last_loss = loss

    def _evaluate_if_due(self) -> dict[str, float]:
        """The task's evaluation at the steps it asked for (every process takes part); its time is kept
        out of the window's images/s."""
        if self.step not in self.evaluations:
            return {}
        start = time.perf_counter()
        self.evaluated = self.task.evaluate(self, self.step)
        self._window["paused"] += time.perf_counter() - start
        return self.evaluated

    def _log_if_due(self, evaluated: dict[str, float]) -> None:
        """A metrics row every ``train.log_every`` steps, at the end, and with every evaluation."""
        w, t = self._window, self.config.train
        if not w["steps"] or not (self.step % t.log_every == 0 or self.step == self.total_steps or evaluated):
            return
        elapsed = time.perf_counter() - w["start"] - w["paused"]
        values = {"epoch": self.step / self.steps_per_epoch, "loss": D.all_mean(w["loss"] / w["steps"], self.device),
                  "lr": self.current_lr, "img_per_s": w["steps"] * self.global_batch / max(elapsed, 1e-9)}
        values.update({k: D.all_mean(sum(v) / len(v), self.device) for k,
                       v in sorted(self.method_metrics.items()) if v})
        self.method_metrics.clear()
        values.update(evaluated)
        self.metrics.write(self.step, values)
        if self.progress is not None:
            self.progress.set_postfix(epoch=f"{values['epoch']:.2f}", loss=f"{values['loss']:.4f}",
                                      lr=f"{self.current_lr:.2e}", img_s=f"{values['img_per_s']:.1f}",
                                      **{k: f"{v:.1f}" for k, v in self.evaluated.items()})
        self._window = {"loss": 0.0, "steps": 0, "start": time.perf_counter(), "paused": 0.0}

    def _periodic(self) -> None:
        t = self.config.train
        if self.step % t.checkpoint_every == 0:
            self.save_checkpoint()
            self._reporting(self.task.on_checkpoint)
        if t.picture_every and self.step % t.picture_every == 0:
            self._reporting(self.task.on_pictures)

    def _reporting(self, hook) -> None:
        """A task's files along the way (curves, pictures): one that cannot be written (a full disk) is
        reported and training goes on, as for checkpoints."""
        try:
            hook(self)
        except (UserError, OSError) as exc:
            log.error("step %d: %s; training continues", self.step, one_line(exc))

    def _finish(self) -> dict[str, Any]:
        path = self.save_checkpoint()
        summary = {"run_dir": str(self.run_dir), "step": self.step, "total_steps": self.total_steps,
                   "first_loss": self.first_loss, "last_loss": self.last_loss, "stopped": self.stopped,
                   "checkpoint": str(path) if path else None, "skipped": len(self.skipped.seen),
                   "seconds": time.perf_counter() - self.started}
        self.task.finish(self, summary)
        self.metrics.close()
        if self.stopped is not None:
            if self.info.is_main:
                log.warning("stopped by %s at step %d of %d; checkpoint %s. Resume with the same command plus "
                            "--resume", self.stopped, self.step, self.total_steps, path)
        else:
            log.info("done: %d steps; files in %s", self.step, self.run_dir)
        return summary


def _check_run_dir(run_dir: Path) -> None:
    """The run folder, or the first existing folder above it, must be a folder."""
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            if not path.is_dir():
                raise ConfigError(f"the run folder {run_dir} cannot be made: {path} is a file (check output_dir and "
                                  "name)")
            return


def _shutdown_loader(loader: DataLoader | None, iterator: Any = None) -> None:
    """Stop a DataLoader's worker processes now, whatever state they are in. The workers ignore SIGTERM
    (the main process stops them, see signals._worker_init), so the interpreter's own clean-up at exit,
    which sends SIGTERM and waits, would wait forever after an error; and they must not outlive it."""
    for it in (iterator, getattr(loader, "_iterator", None)):
        if it is None or not hasattr(it, "_shutdown_workers"):
            continue
        try:
            it._shutdown_workers()
        except Exception:  # noqa: BLE001 - shutting down must not hide the error that got us here
            pass
        for worker in getattr(it, "_workers", []):
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)
    if loader is not None and hasattr(loader, "_iterator"):
        loader._iterator = None


def _check_architecture(path: Path, saved: dict, mine: dict) -> None:
    problem = state_mismatch(saved, mine)
    if problem:
        raise CheckpointError(f"checkpoint {path} is of another architecture: {problem}")


@contextlib.contextmanager
def processes(device_request: str = "auto"):
    """``(info, device)`` of this process: torchrun's process group joined (or one process), left at the end."""
    info, device = D.setup(device_request)
    try:
        yield info, device
    finally:
        D.teardown()


def train(task: Task, resume: bool = False, overwrite: bool = False, allow_changes: bool = False) -> dict[str, Any]:
    """Set up the processes (torchrun or one), train ``task`` to its step budget or a stop; a summary.
    The run folder is locked for the run (one run per folder); ``allow_changes``
    (``--resume-with-changes``) accepts a resumed config that alters the trajectory."""
    _check_run_dir(task.config.run_dir)
    with processes(task.config.train.device) as (info, device):
        trainer = None
        try:
            with RunLock(task.config.run_dir, enabled=info.is_main):
                trainer = Trainer(task, info, device, overwrite=overwrite)
                return trainer.run(resume or allow_changes, allow_changes)
        finally:
            if trainer is not None:
                trainer.close()
