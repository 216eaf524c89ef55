"""Experiment trackers behind one small protocol: TensorBoard (default), Weights & Biases, MLflow.

A tracker mirrors the rows of ``metrics.csv`` (which :class:`~mixmim.training.logs.MetricsLog` always
writes: the loop reads it back); it is opened on the main process only. Each has a ``run_id`` that
the checkpoint keeps (``MetricsLog.tracker_state()``), so ``--resume`` continues the same tracker run:
W&B ``wandb.init(id=..., resume="allow")``, MLflow the run of that id, TensorBoard the same folder with
the events after the resumed step purged. Where they write is the trackers' own settings
(``WANDB_PROJECT``/``WANDB_ENTITY``/``WANDB_MODE``/``WANDB_DIR``, ``MLFLOW_TRACKING_URI``/
``MLFLOW_EXPERIMENT_NAME``); W&B writes under the run folder unless ``WANDB_DIR`` says otherwise.
W&B and MLflow are optional extras: ``pip install "mixmim[wandb]"``, ``"mixmim[mlflow]"``,
``"mixmim[trackers]"`` for both.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

from mixmim.utils.errors import UserError

# tracker name -> (module it needs, the pip extra that brings it)
_NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
KNOWN = ("tensorboard", "csv", "wandb", "mlflow")  # "csv": metrics.csv, always written; accepted as a name


class Tracker(Protocol):
    """What the loop's :class:`~mixmim.training.logs.MetricsLog` drives. ``start_step``: the first step
    this process logs (a resumed run's step + 1): a tracker that can drop what an interrupted run logged
    after its last checkpoint does (TensorBoard), the others receive those steps again (the same
    values: a resumed run retrains them bit for bit)."""

    name: ClassVar[str]
    run_id: str | None

    @classmethod
    def open(cls, run_dir: Path, config: Mapping[str, Any], run_name: str, run_id: str | None = None,
             start_step: int = 0) -> Tracker: ...

    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class TrackerStartError(UserError, ValueError):
    """A tracker named in ``train.trackers`` could not start; raised before the first step."""


def start_hint(name: str) -> str:
    """What to set when ``name`` cannot start."""
    return {
        "wandb": "log in (`wandb login`, or WANDB_API_KEY), or set WANDB_MODE=offline, or drop wandb from "
                 "train.trackers",
        "mlflow": "set MLFLOW_TRACKING_URI to a tracking server (http://...) or, for a local folder, file:<path> with "
                  "MLFLOW_ALLOW_FILE_STORE=true; or drop mlflow from train.trackers",
        "tensorboard": "check that the run folder is writable, or drop tensorboard from train.trackers",
    }.get(name, f"drop {name} from train.trackers")


def check_trackers(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The names, each known and installed; otherwise one line naming the name and what to install."""
    out = []
    for name in names:
        if name not in KNOWN:
            raise ValueError(f"train.trackers: unknown tracker {name!r}; known: {', '.join(KNOWN)}")
        module, extra = _NEEDS.get(name, (None, None))
        if module and name != "tensorboard" and importlib.util.find_spec(module) is None:
            raise ValueError(f"train.trackers: {name!r} needs the {module} package: pip install \"mixmim[{extra}]\"")
        if name not in out:
            out.append(name)
    return tuple(out)


def tracker_class(name: str) -> type[Tracker] | None:
    """The class that mirrors to ``name`` (None for "csv": metrics.csv is MetricsLog's own)."""
    return {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}.get(name)


class TensorBoardTracker:
    """Scalars under ``train/`` in ``<run>/tensorboard``; on resume the events at ``start_step`` and
    after are purged (``SummaryWriter(purge_step=...)``), so the replayed steps are not drawn twice."""

    name = "tensorboard"

    def __init__(self, writer):
        self.writer, self.run_id = writer, None

    @classmethod
    def open(cls, run_dir, config, run_name, run_id=None, start_step=0):
        from torch.utils.tensorboard import SummaryWriter

        return cls(SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step or None))

    def log(self, step, values):
        for key, value in values.items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def close(self):
        self.writer.close()


class WandbTracker:
    """A W&B run (``wandb.init(id=run_id, resume="allow")``); metrics under ``train/`` with the training
    step as their x axis (``define_metric``), so the steps a resumed run logs again are accepted
    (W&B drops a ``log(step=...)`` below its own counter)."""

    name = "wandb"

    def __init__(self, run):
        self.run, self.run_id = run, run.id

    @classmethod
    def open(cls, run_dir, config, run_name, run_id=None, start_step=0):
        import wandb

        settings = {} if os.environ.get("WANDB_DIR") else {"dir": str(run_dir)}
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mixmim"), name=run_name, id=run_id,
                         resume="allow", config=dict(config), **settings)
        run.define_metric("train/step")
        run.define_metric("train/*", step_metric="train/step")
        return cls(run)

    def log(self, step, values):
        self.run.log({"train/step": step, **{f"train/{k}": v for k, v in values.items()}})

    def close(self):
        self.run.finish()


class MlflowTracker:
    """An MLflow run in experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``mixmim``) of the tracking
    server or store ``$MLFLOW_TRACKING_URI`` names; the config as flattened params (once, at creation:
    MLflow refuses to change a param). Through ``MlflowClient``, so no global active run is left behind."""

    name = "mlflow"

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, run_dir, config, run_name, run_id=None, start_step=0):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            return cls(client, run_id)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mixmim")
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        run = client.create_run(experiment_id, run_name=run_name, tags={"mixmim.run_dir": str(run_dir)})
        params = [Param(k, v[:6000]) for k, v in sorted(flatten(config).items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run.info.run_id, params=params[i:i + 100])
        return cls(client, run.info.run_id)

    def log(self, step, values):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def close(self):
        self.client.set_terminated(self.run_id)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": "1"}`` (lists as JSON)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return out
