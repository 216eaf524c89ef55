"""The pretraining loop, for any method module (``out = method(images)`` with ``out.loss``).

One step = ``accum_steps`` micro-batches per process, then one AdamW update. Randomness is a pure
function of (seed, step, micro-batch): the data order and augmentation come from
:class:`~mixmim.data.sampler.ResumableSampler`, and the global RNG is re-seeded before every
micro-batch (masks, drop path). So a resumed run, or the same global batch split over a different
number of processes, follows the same trajectory.
"""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from mixmim.config import ConfigError, RunConfig, dump_config
from mixmim.data import build_pretrain_dataset, collate
from mixmim.data.sampler import ResumableSampler, sample_seed, steps_per_epoch
from mixmim.interop.export import save_encoder
from mixmim.methods.factory import create_pretrainer
from mixmim.training import distributed as D
from mixmim.interop.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from mixmim.training.logs import MetricsLog, SkippedFiles, log, setup_logging
from mixmim.training.optim import build_optimizer, peak_lr
from mixmim.training.schedule import lr_at, set_lr
from mixmim.utils.files import atomic_write_text

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_amp(request: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs that have it, fp16 (with a scaler) on older GPUs, fp32 on CPU."""
    if request != "auto":
        return request
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def build_method(config: RunConfig) -> nn.Module:
    m = config.model
    method = create_pretrainer(method=config.method_name(), model=m.name, **m.encoder_overrides(),
                               **config.method_options())
    encoder = getattr(method, "encoder", None)
    if encoder is not None and m.grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    return method


def _worker_init(_: int) -> None:
    # Ctrl-C and the scheduler's SIGTERM are for the main process, which checkpoints and stops the
    # workers itself; a worker dying first would turn a clean stop into a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the next step boundary and exits 0."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: the caller handles signals
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: finishing this step, then writing a checkpoint", self.signal_name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN/inf after reloading a checkpoint with a lower learning rate."""


class Pretraining:
    """Holds everything one run needs; :meth:`run` trains until the step budget or a stop request."""

    def __init__(self, config: RunConfig, info: D.DistInfo, device: torch.device, method: nn.Module | None = None,
                 overwrite: bool = False):
        self.config, self.info, self.device = config, info, device
        t = config.train
        self.run_dir = config.run_dir
        self.global_batch = t.batch_size
        parts = info.world_size * t.accum_steps
        if t.batch_size < info.world_size:
            raise ConfigError(f"config key 'train.batch_size': {t.batch_size} is smaller than the world size "
                              f"{info.world_size}; every process needs at least one image")
        if t.batch_size % parts:
            raise ConfigError(f"config key 'train.batch_size': {t.batch_size} is not divisible by world size x "
                              f"accum_steps = {info.world_size} x {t.accum_steps}")
        self.micro_batch = t.batch_size // parts
        self.amp = resolve_amp(t.amp, device)
        if self.amp != "fp32" and device.type == "cpu" and self.amp == "fp16":
            raise ConfigError("config key 'train.amp': fp16 needs a GPU; use bf16 or fp32 on the CPU")

        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(self.run_dir if info.is_main else None, info.is_main)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", t.keep_checkpoints)
        if overwrite and info.is_main:
            for _, path in self.checkpoints.all_steps():
                path.unlink(missing_ok=True)
                path.with_name(path.name + ".sha256").unlink(missing_ok=True)
            (self.run_dir / "metrics.csv").unlink(missing_ok=True)
            (self.run_dir / "skipped.txt").unlink(missing_ok=True)
        D.barrier()

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.method = (method if method is not None else build_method(config)).to(device)
        multiple = int(getattr(self.method, "batch_multiple", 1))
        if self.micro_batch % multiple:
            raise ConfigError(f"config key 'train.batch_size': {config.method_name()} mixes groups of {multiple} "
                              f"images; the micro-batch of each process ({self.micro_batch} = batch {t.batch_size} / "
                              f"{info.world_size} process(es) / accum_steps {t.accum_steps}) must be a multiple of it")
        if config.model.compile:
            self._compile_blocks()
        self.dataset = build_pretrain_dataset(config.data, config.model.img_size)
        self.steps_per_epoch = steps_per_epoch(len(self.dataset), self.global_batch)
        if self.steps_per_epoch < 1:
            raise ConfigError(f"config key 'train.batch_size': {self.global_batch} is larger than the data set "
                              f"({len(self.dataset)} images)")
        self.total_steps = t.epochs * self.steps_per_epoch
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps) if t.epochs else t.max_steps
        o = config.optim
        warmup = o.warmup_steps if o.warmup_steps is not None else round(o.warmup_epochs * self.steps_per_epoch)
        self.warmup_steps = min(warmup, self.total_steps)
        self.monitor_every = t.monitor.every or max(1, self.total_steps // 10)
        self.peak_lr = peak_lr(o, self.global_batch)

        self.model = D.wrap(self.method, info, device, t.distributed)
        self.optimizer = build_optimizer(self.method if t.distributed == "ddp" else self.model, o, self.global_batch,
                                         device)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == "fp16" else None
        self.sampler = ResumableSampler(len(self.dataset), self.global_batch, t.seed, info.rank, info.world_size)
        workers = t.num_workers
        self.loader = DataLoader(self.dataset, batch_size=self.micro_batch, sampler=self.sampler, collate_fn=collate,
                                 num_workers=workers, pin_memory=t.pin_memory and device.type == "cuda",
                                 worker_init_fn=_worker_init if workers else None,
                                 prefetch_factor=4 if workers else None, persistent_workers=False)
        self.skipped = SkippedFiles(self.run_dir / "skipped.txt" if info.is_main else None, len(self.dataset),
                                    config.data.max_bad_fraction)
        if getattr(self.dataset, "scan_problems", None):
            self.skipped.note(self.dataset.scan_problems)
        self.monitor = None
        monitor_columns: list[str] = []
        if t.monitor.data:
            from mixmim.training.monitor import RepresentationMonitor

            self.monitor = RepresentationMonitor(t.monitor, config.model.img_size, device, t.seed, info.rank,
                                                 info.world_size)
            monitor_columns = ["knn"] + (["linprobe"] if t.monitor.linprobe else [])
        self.metrics = MetricsLog(self.run_dir, enabled=info.is_main,
                                  columns=["step", "epoch", "loss", "lr", "img_per_s", *monitor_columns])
        self.step = 0
        self.method_metrics: dict[str, list[float]] = {}  # what the method reports besides its loss
        self.lr_scale = 1.0
        self.nan_streak = 0
        self.lowered_lr = False
        self.last_checkpoint: Path | None = None

    # ------------------------------------------------------------------ setup helpers
    def _compile_blocks(self) -> None:
        encoder = getattr(self.method, "encoder", self.method)
        compile_blocks = getattr(encoder, "compile_blocks", None)
        if compile_blocks is not None:
            compile_blocks()
            return
        for module in encoder.modules():
            if module.__class__.__name__ == "MixMIMBlock":
                module.compile()

    def _picture_batch(self) -> torch.Tensor:
        groups = int(getattr(self.method, "num_groups", 2))
        n = min(len(self.dataset), max(8, groups) // groups * groups)
        items = [self.dataset[(i, sample_seed(self.config.train.seed, -1, i))]["image"] for i in range(n)]
        return torch.stack(items)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        mode = self.config.train.distributed
        return {
            "model": D.full_state_dict(self.model, mode),
            "optimizer": D.optimizer_state(self.model, self.optimizer, mode),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "lr_scale": self.lr_scale,
            "lowered_lr": self.lowered_lr,
            "world_size": self.info.world_size,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "config": self.config.to_dict(),
            "method": self.config.method_name(),
            "model_name": self.config.model.name,
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

    def load(self, path: Path) -> None:
        state = load_checkpoint(path)
        mine = D.unwrap(self.model).state_dict() if self.config.train.distributed == "ddp" else self.method.state_dict()
        self._check_architecture(path, state["model"], mine)
        D.load_states(self.model, self.optimizer, state["model"], state["optimizer"], self.config.train.distributed)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.lowered_lr = bool(state.get("lowered_lr", False))
        self.last_checkpoint = path

    @staticmethod
    def _check_architecture(path: Path, saved: dict, mine: dict) -> None:
        missing = sorted(set(mine) - set(saved))
        unexpected = sorted(set(saved) - set(mine))
        shapes = sorted(k for k in set(mine) & set(saved) if tuple(mine[k].shape) != tuple(saved[k].shape))
        if missing or unexpected or shapes:
            def few(keys):
                return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
            parts = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
                     "shape differs for " + few([f"{k} {tuple(saved[k].shape)} vs {tuple(mine[k].shape)}"
                                                 for k in shapes]) if shapes else ""]
            raise CheckpointError(f"checkpoint {path} is of another architecture: " + "; ".join(p for p in parts if p))

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        dtype = AMP_DTYPES[self.amp]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _sync_context(self, last: bool):
        if not self.info.enabled or last:
            return contextlib.nullcontext()
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def train_step(self, micro_batches: list[dict]) -> float | None:
        """One optimiser update; returns the mean loss, or None when the step was skipped (non-finite)."""
        t = self.config.train
        o = self.config.optim
        lr = lr_at(self.step, self.total_steps, self.warmup_steps, self.peak_lr, o.min_lr, schedule=o.schedule,
                   step_fractions=o.step_fractions, step_gamma=o.step_gamma) * self.lr_scale
        set_lr(self.optimizer, lr)
        self.current_lr = lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        fsdp = t.distributed == "fsdp" and self.info.enabled
        for a, batch in enumerate(micro_batches):
            self.skipped.add(batch["skipped"])
            images = batch["image"].to(self.device, non_blocking=True)
            micro_index = self.info.rank * t.accum_steps + a
            torch.manual_seed(sample_seed(t.seed + 1, self.step, micro_index))
            last = a == len(micro_batches) - 1
            if fsdp:
                self.model.set_requires_gradient_sync(last)
            with self._sync_context(last):
                with self._autocast():
                    out = self.model(images)
                scaled = out.loss / len(micro_batches)
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            losses.append(out.loss.detach().float())
            for key, value in (out.metrics or {}).items():
                self.method_metrics.setdefault(key, []).append(float(value))
        # One host sync and one collective per step, not per micro-batch: a non-finite loss only
        # poisons gradients, which are dropped here on every rank before they reach the weights.
        loss = torch.stack(losses).mean()
        if D.any_true(not bool(torch.isfinite(loss)), self.device):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return float(loss)

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
        if latest is not None:
            self.load(latest)  # restores the checkpoint's lr_scale; halve it below
            if self.info.is_main:
                self.metrics.truncate_after(self.step)  # the steps after it are trained again
            self.lr_scale *= 0.5
            log.warning("reloaded %s (step %d) and halved the learning rate (scale %.3g)", latest, self.step,
                        self.lr_scale)
            self.lowered_lr = True
            return True
        self.lowered_lr = True
        self.lr_scale *= 0.5
        log.warning("no checkpoint to reload yet; halved the learning rate (scale %.3g) and continue", self.lr_scale)
        return False

    # ------------------------------------------------------------------ representation monitor
    def evaluate_representation(self) -> dict[str, float]:
        """The monitor's accuracies of the current encoder (every process takes part)."""
        fsdp = self.config.train.distributed == "fsdp" and self.info.enabled
        encoder = getattr(self.method, "encoder", self.method)
        if fsdp:
            self.model.unshard()  # the root's own parameters; blocks unshard in their forward
        with self._autocast():
            values = self.monitor(encoder, self.step)
        if fsdp:
            self.model.reshard()
        return values

    def _restore_monitor_baseline(self) -> None:
        """On resume, the starting encoder's k-NN accuracy is the first value in metrics.csv."""
        path = self.run_dir / "metrics.csv"
        if self.monitor is None or not path.is_file():
            return
        from mixmim.viz.curves import read_metrics

        knn = [v for v in read_metrics(path).get("knn", []) if v == v]
        if knn:
            self.monitor.baseline = knn[0]

    # ------------------------------------------------------------------ pictures
    @torch.no_grad()
    def save_pictures(self) -> None:
        from mixmim.viz.curves import save_loss_curves
        from mixmim.viz.reconstruction import picture_note, reconstruction_rows, save_reconstruction_grid

        model = self.model if self.config.train.distributed == "fsdp" else D.unwrap(self.model)
        was_training = model.training
        model.eval()
        images = self._picture_batch().to(self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.config.train.seed)
            with self._autocast():
                out = model(images)
        model.train(was_training)
        if not self.info.is_main:
            return
        cell = getattr(self.method, "cell", 32)
        norm_pix = bool(getattr(getattr(self.method, "config", None), "norm_pix_loss", False))
        title = (f"{self.config.name}: {self.config.method_name()} on {self.config.model.name}, step {self.step}, "
                 f"loss {float(out.loss):.4f}")
        # With a normalised-pixel target the usual picture borrows each hidden cell's brightness and
        # contrast from the original; the raw one shows only what the model predicts.
        for raw, name in ((False, "reconstruction.png"), (True, "reconstruction_raw.png")):
            if raw and not norm_pix:
                continue
            rows = reconstruction_rows(out, images, cell, norm_pix, self.config.data.mean, self.config.data.std, raw)
            save_reconstruction_grid(rows, self.run_dir / name, cell=cell, title=title, note=picture_note(norm_pix, raw))
        if (self.run_dir / "metrics.csv").is_file():
            save_loss_curves(self.run_dir / "metrics.csv", self.run_dir / "loss.png", title=self.config.name)

    def export_encoder(self) -> None:
        encoder = getattr(D.unwrap(self.model), "encoder", None)
        if encoder is None or not self.info.is_main:
            return
        if self.config.train.distributed == "fsdp" and self.info.enabled:
            return  # sharded weights: the checkpoint holds the full encoder; `mixmim export` writes it
        save_encoder(encoder, self.run_dir / "encoder",
                     metadata={"method": self.config.method_name(), "step": self.step, "model": self.config.model.name})

    # ------------------------------------------------------------------ the loop
    def run(self, resume: bool = False) -> dict[str, Any]:
        t = self.config.train
        if resume:
            latest = self.checkpoints.latest()
            if latest is None:
                log.warning("--resume: no checkpoint in %s, starting from step 0", self.checkpoints.folder)
            else:
                self.load(latest)
                log.info("resumed from %s at step %d", latest, self.step)
        elif self.checkpoints.all_steps():
            raise ConfigError(f"{self.run_dir} already holds checkpoints; pass --resume to continue that run, "
                              f"--overwrite to start it again, or choose another name (name=...)")
        if self.info.is_main:
            atomic_write_text(self.run_dir / "config.yaml", dump_config(self.config))
            self.metrics.truncate_after(self.step)
        self._announce()
        monitored: dict[str, float] = {}
        if self.monitor is not None:
            self._restore_monitor_baseline()
            if self.step == 0 and t.monitor.at_start:
                monitored = self.evaluate_representation()
                self.metrics.write(0, {"epoch": 0.0, **monitored})
                log.info("step 0 (starting encoder): %s", _format(monitored))

        self.started = time.perf_counter()
        progress = None
        if self.info.is_main and t.progress:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                            desc=self.config.name)
        first_loss = last_loss = None
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        stopped = None
        with StopRequest() as stop:
            while self.step < self.total_steps and stopped is None:
                epoch = self.step // self.steps_per_epoch
                self.sampler.set_epoch(epoch, self.step % self.steps_per_epoch)
                micro: list[dict] = []
                for batch in self.loader:
                    micro.append(batch)
                    if len(micro) < t.accum_steps:
                        continue
                    loss = self.train_step(micro)
                    micro = []
                    if loss is None:
                        if self._on_nonfinite():
                            break  # weights and step went back to the checkpoint: restart the epoch's order
                    else:
                        self.nan_streak = 0
                        self.step += 1
                        window_loss += loss
                        window_steps += 1
                        first_loss = loss if first_loss is None else first_loss
                        last_loss = loss
                    if progress is not None:
                        progress.update(self.step - progress.n)
                    monitor_due = self.monitor is not None and window_steps and (
                        self.step % self.monitor_every == 0 or self.step == self.total_steps)
                    if window_steps and (self.step % t.log_every == 0 or self.step == self.total_steps or monitor_due):
                        elapsed = time.perf_counter() - window_start
                        mean_loss = D.all_mean(window_loss / window_steps, self.device)
                        rate = window_steps * self.global_batch / max(elapsed, 1e-9)
                        values = {"epoch": self.step / self.steps_per_epoch, "loss": mean_loss, "lr": self.current_lr,
                                  "img_per_s": rate}
                        values.update({k: D.all_mean(sum(v) / len(v), self.device)
                                       for k, v in sorted(self.method_metrics.items()) if v})
                        self.method_metrics.clear()
                        if monitor_due:
                            monitored = self.evaluate_representation()
                            values.update(monitored)
                        self.metrics.write(self.step, values)
                        if progress is not None:
                            progress.set_postfix(epoch=f"{values['epoch']:.2f}", loss=f"{mean_loss:.4f}",
                                                 lr=f"{self.current_lr:.2e}", img_s=f"{rate:.1f}",
                                                 **{k: f"{v:.1f}" for k, v in monitored.items()})
                        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
                    if D.any_true(stop.signal_name is not None, self.device):
                        stopped = stop.signal_name or "signal on another rank"
                        break
                    if self.step >= self.total_steps:
                        break
                    if self.step % t.checkpoint_every == 0:
                        self.save_checkpoint()
                        if self.info.is_main and (self.run_dir / "metrics.csv").is_file():
                            from mixmim.viz.curves import save_loss_curves

                            save_loss_curves(self.run_dir / "metrics.csv", self.run_dir / "loss.png", self.config.name)
                    if t.picture_every and self.step % t.picture_every == 0:
                        self.save_pictures()
                else:
                    self.skipped.end_epoch(epoch)
        if progress is not None:
            progress.close()
        path = self.save_checkpoint()
        self.export_encoder()
        self.save_pictures()
        self.metrics.close()
        if stopped is not None:
            log.warning("stopped by %s at step %d of %d; checkpoint %s. Resume with the same command plus --resume",
                        stopped, self.step, self.total_steps, path)
        else:
            log.info("done: %d steps; files in %s", self.step, self.run_dir)
        summary = {"run_dir": str(self.run_dir), "step": self.step, "total_steps": self.total_steps,
                   "first_loss": first_loss, "last_loss": last_loss, "stopped": stopped,
                   "checkpoint": str(path) if path else None, "skipped": len(self.skipped.seen),
                   "seconds": time.perf_counter() - self.started}
        if self.monitor is not None:
            share = self.monitor.seconds / max(summary["seconds"], 1e-9)
            log.info("monitor: %d evaluation(s), %.1f s, %.1f%% of the run's time; last %s",
                     len(self.monitor.history), self.monitor.seconds, 100 * share, _format(monitored))
            summary.update(monitor=self.monitor.history, monitor_seconds=self.monitor.seconds)
        return summary

    def _announce(self) -> None:
        params = sum(p.numel() for p in self.method.parameters())
        log.info("%s: %s on %s (%.2fM parameters), %s data (%d images), %d steps of batch %d (%d x %d process(es) x "
                 "%d accumulation), peak lr %.3g, %s on %s", self.config.name, self.config.method_name(),
                 self.config.model.name, params / 1e6, self.config.data.source, len(self.dataset), self.total_steps,
                 self.global_batch, self.micro_batch, self.info.world_size, self.config.train.accum_steps,
                 self.peak_lr, self.amp, self.device)


def _format(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}%" for k, v in values.items()) or "-"


def run_pretraining(config: RunConfig, resume: bool = False, method: nn.Module | None = None,
                    overwrite: bool = False) -> dict[str, Any]:
    """Train ``config`` to its step budget (or a stop signal); returns a summary dict."""
    info, device = D.setup(config.train.device)
    try:
        return Pretraining(config, info, device, method, overwrite=overwrite).run(resume)
    finally:
        D.teardown()

