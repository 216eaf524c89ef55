"""Experiment trackers behind MetricsLog: what each writes, read back with the tracker's own reader, and a
resumed run continuing the same tracker run (the id kept in the checkpoint's tracker_state)."""

from __future__ import annotations

import csv
import glob
import struct
from pathlib import Path

import pytest

from mixmim.training import trackers as T
from mixmim.training.logs import MetricsLog

CONFIG = {"name": "r", "train": {"batch_size": 8, "lr": 1e-3}, "model": {"depths": [1, 1, 2, 1]}}


def _interrupted_then_resumed(run: Path, names: tuple[str, ...]) -> tuple[dict, dict]:
    """Steps 1-4 logged, the checkpoint at step 2 (its tracker_state), then a new process resumes from it
    and logs steps 3-4 again (other values, to tell the two apart) and step 5."""
    run.mkdir(parents=True, exist_ok=True)
    first = MetricsLog(run, trackers=names, config=CONFIG, run_name="r", columns=["step", "loss"])
    first.truncate_after(0)
    state = {}
    for step in (1, 2, 3, 4):
        first.write(step, {"loss": 1.0 / step})
        if step == 2:
            state = first.tracker_state()
    first.close()
    second = MetricsLog(run, trackers=names, config=CONFIG, run_name="r", columns=["step", "loss"])
    second.resume(state)
    second.truncate_after(2)
    for step in (3, 4, 5):
        second.write(step, {"loss": 10.0 + step})
    resumed = second.tracker_state()
    second.close()
    return state, resumed


WANT = {1: 1.0, 2: 0.5, 3: 13.0, 4: 14.0, 5: 15.0}


def test_csv_is_always_written_and_tensorboard_purges_the_replayed_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    state, resumed = _interrupted_then_resumed(tmp_path, ("tensorboard", "csv"))
    assert state == resumed == {}  # neither has a run id
    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = {int(r["step"]): float(r["loss"]) for r in csv.DictReader(handle)}
    assert rows == WANT
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == [1, 2, 3, 4, 5]  # the interrupted run's steps 3-4 are purged
    assert {e.step: e.value for e in scalars} == pytest.approx(WANT)


def test_names_are_checked_in_one_line(monkeypatch):
    with pytest.raises(ValueError, match="unknown tracker 'comet'"):
        MetricsLog(Path("unused"), trackers=("comet",))
    real = T.importlib.util.find_spec
    monkeypatch.setattr(T.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ValueError, match=r'needs the wandb package: pip install "mixmim\[wandb\]"'):
        MetricsLog(Path("unused"), trackers=("wandb",))
    assert MetricsLog(Path("unused"), enabled=False, trackers=("wandb",)).tracker_state() == {}  # other ranks


def test_a_failing_tracker_does_not_stop_the_run(tmp_path, monkeypatch, caplog):
    class Away:
        name, run_id = "away", "id-1"

        @classmethod
        def open(cls, *args, **kwargs):
            return cls()

        def log(self, step, values):
            raise ConnectionError("server unreachable")

        def close(self):
            pass

    monkeypatch.setattr("mixmim.training.trackers.tracker_class", lambda name: Away)
    metrics = MetricsLog(tmp_path, trackers=("tensorboard",))
    metrics.write(1, {"loss": 1.0})
    metrics.write(2, {"loss": 0.5})
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 3
    assert metrics.tracker_state() == {"away": {"run_id": "id-1"}}
    metrics.close()


def _wandb_records(path: str):
    """The records of a W&B ``.wandb`` file (W&B's LevelDB-style log: a 7-byte header, 32 KiB blocks of
    checksum/length/type-framed chunks), parsed with W&B's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if room >= 7 else (0, 0, 0)
        if room < 7 or (length == 0 and kind == 0):
            pos += room
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def test_wandb_offline_resume_continues_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    import json

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    state, resumed = _interrupted_then_resumed(tmp_path / "run", ("wandb",))
    run_id = state["wandb"]["run_id"]
    assert resumed == state
    files = sorted(glob.glob(str(tmp_path / "wandb_dir" / "wandb" / "offline-run-*" / f"run-{run_id}.wandb")))
    assert files  # one per process (the same folder when both start within a second), one run id
    rows: list[tuple[float, int, float]] = []
    config = {}
    for path in files:
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":  # the config travels in the run record
                assert record.run.run_id == run_id
                config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
            elif kind == "history":  # keys with a "/" are stored as nested keys
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                rows.append((items["_timestamp"], int(items["train/step"]), items["train/loss"]))
    got = {step: loss for _, step, loss in sorted(rows)}  # a replayed step: the later value
    assert got == pytest.approx(WANT)
    assert config["train"] == CONFIG["train"]


def test_mlflow_file_store_resume_continues_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:" + str(tmp_path / "mlruns"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
    state, resumed = _interrupted_then_resumed(tmp_path / "run", ("mlflow", "tensorboard"))
    run_id = state["mlflow"]["run_id"]
    assert resumed == state
    client = MlflowClient()
    experiment = client.get_experiment_by_name("tests")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    history = client.get_metric_history(run_id, "loss")
    latest = {}
    for metric in sorted(history, key=lambda m: m.timestamp):
        latest[metric.step] = metric.value
    assert latest == pytest.approx(WANT)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert run.data.params["train.batch_size"] == "8" and run.data.params["model.depths"] == "[1, 1, 2, 1]"


def test_a_resumed_pretraining_run_continues_its_mlflow_run(tmp_path, monkeypatch):
    """Through the loop: the checkpoint holds the tracker's run id and ``--resume`` logs into that run."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow.tracking import MlflowClient

    from conftest import crashing_step, tiny_run
    from mixmim.config import load_config
    from mixmim.training.pretrain import run_pretraining

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:" + str(tmp_path / "mlruns"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "loop")
    config = load_config(None, tiny_run(tmp_path, "train.trackers=[csv,mlflow]"))
    with crashing_step(5), pytest.raises(RuntimeError, match="simulated crash"):
        run_pretraining(config)
    run_pretraining(config, resume=True)
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("loop").experiment_id])
    assert len(runs) == 1
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")}
    assert steps == set(range(1, 7))
