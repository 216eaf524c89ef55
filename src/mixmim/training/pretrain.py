"""Pretraining as a task of the loop: a method (MixMIM, SimMIM, MAE, MixedAE) on an encoder, an image
set without labels, the method's own loss; reconstruction pictures, loss curves, the representation
monitor and the exported encoder along the way."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn

from mixmim.config import RunConfig
from mixmim.data import build_pretrain_dataset, build_stream
from mixmim.data.sampler import sample_seed
from mixmim.interop.export import save_encoder
from mixmim.methods.base import PretrainMethod
from mixmim.methods.factory import build_method
from mixmim.training.logs import log
from mixmim.training.loop import NonFiniteLossError, train
from mixmim.training.optim import decay_groups
from mixmim.training.task import RunContext, StepOutput, Task

if TYPE_CHECKING:
    from mixmim.data.stream import ShardStream
    from mixmim.training.monitor import RepresentationMonitor

__all__ = ["NonFiniteLossError", "PretrainTask", "run_pretraining"]


class PretrainTask(Task):
    """``mixmim pretrain``: ``method`` may be given instead of built from the config (tests, studies)."""

    name = "pretrain"

    def __init__(self, config: RunConfig, method: PretrainMethod | None = None):
        self.config = config
        self._method = method
        self.monitor: RepresentationMonitor | None = None  # built at its first evaluation

    # ------------------------------------------------------------------ what to train
    def build_model(self) -> nn.Module:
        method = self._method if self._method is not None else build_method(self.config)
        if self.config.model.compile:
            method.encoder.compile_blocks()
        self.method = method
        return method

    def dataset(self):
        c = self.config
        if c.data.source == "stream":
            rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
            micro = c.train.batch_size // world // c.train.accum_steps
            self.data = build_stream(c.data, c.model.img_size, micro, c.train.batch_size, c.train.seed, rank, world)
        else:
            self.data = build_pretrain_dataset(c.data, c.model.img_size)
        if c.data.normalize == "dataset":  # measured once: config.yaml and checkpoints keep the numbers
            c.data.mean, c.data.std = tuple(self.data.mean), tuple(self.data.std)
        return self.data

    def collate(self, items: list[dict]) -> dict:
        return self.data.collate_fn(items)

    def to_device(self, batch: dict, device: torch.device) -> dict:
        # data.decode=gpu: the workers only read and crop-plan; decoding happens here, on the device.
        return super().to_device(self.data.finish_batch(batch, device), device)

    def batch_multiple(self) -> int:
        return self.method.batch_multiple

    def lr_batch(self, global_batch: int) -> int:
        return self.method.lr_batch(global_batch)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return decay_groups(model, self.config.optim.weight_decay)

    def repeated_blocks(self, model: nn.Module) -> list[nn.Module]:
        return cast(PretrainMethod, model).repeated_blocks()  # the model build_model made

    def step(self, model: nn.Module, batch: dict) -> StepOutput:
        out = model(batch["image"])
        return StepOutput(out.loss, out.metrics or {})

    # ------------------------------------------------------------------ the representation monitor
    @property
    def columns(self) -> list[str]:
        m = self.config.train.monitor
        return (["knn"] + (["linprobe"] if m.linprobe else [])) if m.data else []

    def evaluation_steps(self, total_steps: int, steps_per_epoch: int) -> set[int]:
        m = self.config.train.monitor
        if not m.data:
            return set()
        every = m.every or max(1, total_steps // 10)
        return set(range(every, total_steps + 1, every)) | {total_steps} | ({0} if m.at_start else set())

    def evaluate(self, run: RunContext, step: int) -> dict[str, float]:
        """The monitor's accuracies of the current encoder (every process takes part)."""
        if self.monitor is None:
            from mixmim.training.monitor import RepresentationMonitor

            t = self.config.train
            self.monitor = RepresentationMonitor(t.monitor, self.config.model.img_size, run.device, t.seed,
                                                 run.rank, run.world_size)
            self._restore_baseline(run)
        with run.full_module(), run.autocast():  # the encoder's own parameters gathered under FSDP
            values = self.monitor(self.method.encoder, step)
        if step == 0:
            log.info("step 0 (starting encoder): %s", _format(values))
        return values

    def _restore_baseline(self, run: RunContext) -> None:
        """On resume, the starting encoder's k-NN accuracy is the first value in metrics.csv."""
        path = run.run_dir / "metrics.csv"
        if run.step == 0 or not path.is_file():
            return
        from mixmim.utils.metrics_csv import read_metrics

        knn = [v for v in read_metrics(path).get("knn", []) if v == v]
        if knn:
            assert self.monitor is not None  # evaluate made it before calling this
            self.monitor.baseline = knn[0]

    # ------------------------------------------------------------------ checkpoints, pictures, the end
    def checkpoint_extras(self) -> dict[str, Any]:
        return {"method": self.config.method_name(), "model_name": self.config.model.name}

    def on_checkpoint(self, run: RunContext) -> None:
        self._curves(run)

    def on_pictures(self, run: RunContext) -> None:
        self.save_pictures(run)

    def finish(self, run: RunContext, summary: dict[str, Any]) -> None:
        self.export_encoder(run)
        self.save_pictures(run)
        if self.monitor is not None:
            share = self.monitor.seconds / max(summary["seconds"], 1e-9)
            log.info("monitor: %d evaluation(s), %.1f s, %.1f%% of the run's time; last %s",
                     len(self.monitor.history), self.monitor.seconds, 100 * share, _format(run.evaluated))
            summary.update(monitor=self.monitor.history, monitor_seconds=self.monitor.seconds)

    def describe(self, run: RunContext) -> str:
        params = sum(p.numel() for p in self.method.parameters())
        c = self.config
        return (f"{c.name}: {c.method_name()} on {c.model.name} ({params / 1e6:.2f}M parameters), {c.data.source} "
                f"data ({len(self.data)} images)")

    def _curves(self, run: RunContext) -> None:
        if run.is_main and (run.run_dir / "metrics.csv").is_file():
            from mixmim.viz.curves import save_loss_curves

            save_loss_curves(run.run_dir / "metrics.csv", run.run_dir / "loss.png", self.config.name)

    def _picture_batch(self, device: torch.device) -> torch.Tensor:
        """The same images at every picture: the first of the data set (of a stream: of its first
        shards), under a fixed augmentation seed."""
        groups = self.method.num_groups
        n = min(len(self.data), max(8, groups) // groups * groups)
        if isinstance(self.data, torch.utils.data.IterableDataset):
            stream = cast("ShardStream", self.data)  # data.source=stream
            where = stream.epoch, stream.start_batch  # a loader without workers reads them as it goes
            stream.set_epoch(0)
            items = list(itertools.islice(iter(stream), n))
            stream.set_epoch(*where)
        else:
            items = [self.data[(i, sample_seed(self.config.train.seed, -1, i))] for i in range(n)]
        return self.to_device(self.collate(items), device)["image"]

    @torch.no_grad()
    def save_pictures(self, run: RunContext) -> None:
        from mixmim.viz.reconstruction import picture_note, reconstruction_rows, save_reconstruction_grid

        images = self._picture_batch(run.device)
        with run.full_module() as model:
            was_training = model.training
            model.eval()
            with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
                torch.manual_seed(self.config.train.seed)
                with run.autocast():
                    out = model(images, picture=True)
            model.train(was_training)
        if not run.is_main:
            return
        cell, norm_pix = out.picture.cell, out.picture.norm_pix
        c = self.config
        title = f"{c.name}: {c.method_name()} on {c.model.name}, step {run.step}, loss {float(out.loss):.4f}"
        # With a normalised-pixel target the usual picture borrows each hidden cell's brightness and
        # contrast from the original; the raw one shows only what the model predicts.
        for raw, name in ((False, "reconstruction.png"), (True, "reconstruction_raw.png")):
            if raw and not norm_pix:
                continue
            rows = reconstruction_rows(out, images, self.data.mean, self.data.std, raw)
            save_reconstruction_grid(rows, run.run_dir / name, cell=cell, title=title,
                                     note=picture_note(norm_pix, raw))
        self._curves(run)

    def export_encoder(self, run: RunContext) -> None:
        if not run.is_main or (run.world_size > 1 and self.config.train.distributed == "fsdp"):
            return  # sharded weights: the checkpoint holds the full encoder; `mixmim export` writes it
        save_encoder(self.method.encoder, run.run_dir / "encoder",
                     metadata={"method": self.config.method_name(), "step": run.step,
                               "model": self.config.model.name}, overwrite=True)  # the run's own export


def _format(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}%" for k, v in values.items()) or "-"


def run_pretraining(config: RunConfig, resume: bool = False, method: PretrainMethod | None = None,
                    overwrite: bool = False, allow_changes: bool = False) -> dict[str, Any]:
    """Train ``config`` to its step budget (or a stop signal); returns a summary dict."""
    return train(PretrainTask(config, method), resume=resume, overwrite=overwrite, allow_changes=allow_changes)
