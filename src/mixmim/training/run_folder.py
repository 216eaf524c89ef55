"""What keeps a run folder safe: one run at a time (a lock), ``--overwrite`` that deletes only what an
earlier run of this project wrote, and ``--resume`` that refuses a config which would change the
trajectory unless the user says the change is intended.

Nothing here deletes a file the project did not write: a folder is recognised as a run by the
``config.yaml`` every run writes at its start, and only the run's own files are removed from it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mixmim.utils.errors import UserError

log = logging.getLogger("mixmim")

LOCK_NAME = "run.lock"

# Keys a resumed run may change without changing what it computes: where and how often it reports, how
# it loads data, how the same arithmetic is laid out (processes, accumulation with the same global
# batch, compilation, activation checkpointing, the attention kernel), the monitor (evaluated on its
# own seeds, outside the training step's random streams). Everything else alters the trajectory.
RESUMABLE_CHANGES = (
    "name", "output_dir", "train.num_workers", "train.pin_memory", "train.progress", "train.log_every",
    "train.checkpoint_every", "train.keep_checkpoints", "train.picture_every", "train.trackers", "train.device",
    "train.nan_patience", "train.accum_steps", "train.distributed", "train.monitor", "model.compile",
    "model.grad_checkpointing", "model.attention_impl", "eval.batch_size", "eval.every_epochs",
)

_PATH_KEYS = ("path", "val_path", "checkpoint")

# Files (relative to the run folder) that runs write; --overwrite removes these and nothing else.
_RUN_FILES = re.compile(r"^(metrics\.csv|skipped\.txt|checkpoints/step_\d{8,}\.pt(\.sha256)?"
                        r"|tensorboard/events\.out\.tfevents\..+)$")


class RunFolderError(UserError, ValueError):
    """The run folder is in use by another run, or a resume would silently change the run."""


# ---------------------------------------------------------------------------------------------------
# one run at a time

class RunLock:
    """``<run>/run.lock`` holds the host, pid and start of the process training in the folder; a second
    run in the same folder stops with one line. A lock whose process is gone (same host, pid not alive
    or started later than the lock) is stale and taken over with a warning; a lock of another host is
    left to the user, who is told how to remove it."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.path = Path(folder) / LOCK_NAME
        self.enabled = enabled
        self.held = False
        self.token = {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid()),
                      "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._stale(holder):
                    where = f"process {holder.get('pid')} on {holder.get('host')}, since {holder.get('time')}"
                    raise RunFolderError(
                        f"{self.path.parent} is in use by another run ({where}); wait for it, choose another name "
                        f"(name=...), or if that run is dead delete {self.path}") from None
                log.warning("removing the stale lock %s (%s)", self.path,
                            "unreadable" if holder is None else f"process {holder.get('pid')} is gone")
                self.path.unlink(missing_ok=True)
                continue
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(self.token, handle)
            except OSError as exc:  # a full disk: no empty lock left behind
                self.path.unlink(missing_ok=True)
                raise OSError(exc.errno, exc.strerror, str(self.path)) from None
            self.held = True
            return self
        raise RunFolderError(f"could not take the lock {self.path}: another process keeps taking it")

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        if self.held and self._holder() == self.token:
            self.path.unlink(missing_ok=True)
        self.held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _stale(self, holder: Mapping[str, Any]) -> bool:
        if holder.get("host") != self.token["host"]:
            return False  # cannot be checked from here
        pid = holder.get("pid")
        if not isinstance(pid, int) or not _alive(pid):
            return True
        # The pid was given to another process since (the lock's one died and the number came round).
        return holder.get("started") is not None and _process_start(pid) not in (None, holder.get("started"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the locker."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------
# --overwrite

def is_run_folder(folder: Path) -> bool:
    """A folder a run of this project wrote: it holds the ``config.yaml`` every run writes first."""
    return (Path(folder) / "config.yaml").is_file()


def run_files(folder: Path) -> list[Path]:
    """The files an earlier run left in ``folder`` that a new start replaces (checkpoints, metrics,
    skipped list, TensorBoard events); empty for a folder no run of this project wrote."""
    folder = Path(folder)
    if not is_run_folder(folder):
        return []
    out = []
    for sub in (folder, folder / "checkpoints", folder / "tensorboard"):
        if sub.is_dir():
            out += [p for p in sub.iterdir() if p.is_file() and _RUN_FILES.match(p.relative_to(folder).as_posix())]
    return sorted(out)


def clear_run(folder: Path) -> list[Path]:
    """``--overwrite``: delete the earlier run's own files (never anything else); the list."""
    removed = run_files(folder)
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        log.info("--overwrite: removed %d file(s) of the earlier run in %s", len(removed), folder)
    return removed


# ---------------------------------------------------------------------------------------------------
# --resume

def _flat(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return a == b


def _as_path(key: str, value: Any) -> Any:
    """Paths compare as paths: ``runs/x/`` and ``runs/./x`` name the same folder."""
    if isinstance(value, str) and key.rsplit(".", 1)[-1] in _PATH_KEYS and value not in ("fashion_mnist", "bundled"):
        return os.path.normpath(os.path.expanduser(value))
    return value


def config_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, new value) for every key that differs and alters the trajectory."""
    old, new = dict(_flat(saved)), dict(_flat(now))
    changed = []
    for key in sorted(set(old) | set(new)):
        if any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES):
            continue
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if not _same(_as_path(key, a), _as_path(key, b)):
            changed.append((key, a, b))
    return changed


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{key}: {a!r} -> {b!r}" for key, a, b in changes)


def check_resume_config(path: Path, saved: Mapping[str, Any], now: Mapping[str, Any],
                        allow: bool) -> list[tuple[str, Any, Any]]:
    """Refuse (one line, each changed key) a resume whose config alters the trajectory, unless ``allow``
    (``--resume-with-changes``): then the changes are logged and returned for the run's record."""
    changes = config_changes(saved, now)
    if changes and not allow:
        raise RunFolderError(f"--resume: the config differs from {path}'s in what it computes "
                             f"({describe_changes(changes)})"
                             "; resume with the same settings, or pass --resume-with-changes if the change is intended")
    if changes:
        log.warning("--resume-with-changes: continuing %s with %s", path, describe_changes(changes))
    return changes
