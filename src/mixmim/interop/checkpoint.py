"""Checkpoints that survive crashes: atomic writes, a checksum per file, the last N kept.

``checkpoints/step_00001234.pt`` holds everything a run needs to continue (model, optimiser, scaler,
step, RNG states, resolved config); ``step_00001234.pt.sha256`` is written after the rename, so a
file without a matching checksum is known to be incomplete or damaged and is never resumed from.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from mixmim.interop.meta import CHECKPOINT_FORMAT
from mixmim.interop.torch_files import CheckpointError, load_torch_file, verify_checksum
from mixmim.utils.files import WriteError, atomic_write, atomic_write_text, remove_stale_temporaries, sha256_of

FORMAT = CHECKPOINT_FORMAT
_NAME = re.compile(r"^step_(\d{8,})\.pt$")
_TARGETS = re.compile(r"^step_\d{8,}\.pt(\.sha256)?$")
log = logging.getLogger("mixmim")


__all__ = ["CheckpointError", "CheckpointManager", "checkpoint_name", "load_checkpoint", "resolve_checkpoint",
           "verify"]


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def verify(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` matches the checksum written beside it."""
    digest_file = path.with_name(path.name + ".sha256")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not digest_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no checksum file {digest_file.name}: the write did "
                              "not finish, so the file may be incomplete")
    verify_checksum(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint of this project, read on the CPU without running code from it (the checksum
    beside it verified first: :func:`mixmim.interop.torch_files.load_torch_file`)."""
    path = Path(path)
    state = load_torch_file(path)
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a mixmim training checkpoint (format {FORMAT})")
    return state


def open_weights_file(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(the file, its dict) for a path a user gives: a run folder means its newest checkpoint whose
    checksum matches (verified once, then read), a file is read as it is (its checksum checked when it
    has one). Read weights-only: :func:`mixmim.interop.torch_files.load_torch_file`."""
    path = Path(path)
    if path.is_dir():
        return (found := resolve_checkpoint(path)), load_torch_file(found, verified=True)
    return path, load_torch_file(resolve_checkpoint(path))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or for a run folder (``runs/<name>``) its newest good checkpoint."""
    path = Path(path)
    if path.is_dir():
        found = CheckpointManager(path / "checkpoints").latest()
        if found is None:
            raise FileNotFoundError(f"no good checkpoint under {path / 'checkpoints'}")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


class CheckpointManager:
    """Saves into ``folder`` and keeps the newest ``keep`` verified checkpoints."""

    def __init__(self, folder: str | Path, keep: int = 2):
        self.folder = Path(folder)
        self.keep = max(1, keep)

    def all_steps(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest checkpoint whose checksum matches; damaged newer ones are reported and passed over."""
        for _step, path in reversed(self.all_steps()):
            try:
                verify(path)
            except CheckpointError as exc:
                log.warning("%s; trying an older one", exc)
                continue
            return path
        return None

    def save(self, state: dict[str, Any], step: int) -> Path | None:
        """Write atomically; on failure (disk full, quota, permissions) log it, keep the old
        checkpoints and return None so training continues."""
        path = self.folder / checkpoint_name(step)
        state = {"format": FORMAT, **state}
        try:
            atomic_write(path, lambda tmp: torch.save(state, tmp))
            atomic_write_text(path.with_name(path.name + ".sha256"), f"{sha256_of(path)}  {path.name}\n")
        except Exception as exc:  # noqa: BLE001 - disk full is a RuntimeError from torch.save, quota an OSError
            # A file whose checksum was not written is never resumed from: remove it, so it is not
            # reported as damaged later (atomic_write has already removed its temporary file).
            try:
                verify(path)  # an older save of this step, intact: keep it
            except CheckpointError:
                path.unlink(missing_ok=True)
                path.with_name(path.name + ".sha256").unlink(missing_ok=True)
            cause = exc.__cause__ if isinstance(exc, WriteError) and exc.__cause__ is not None else exc
            reason = getattr(cause, "strerror", None) or " ".join(str(cause).split())[:200] or cause.__class__.__name__
            try:
                free = f"; {shutil.disk_usage(self.folder).free / 2**20:.0f} MiB free there"
            except OSError:
                free = ""
            log.error("could not write checkpoint %s (%s: %s%s); training continues, earlier checkpoints are kept",
                      path, cause.__class__.__name__, reason, free)
            return None
        self.prune()
        return path

    def remove_stale(self) -> list[Path]:
        """Temporary files of a save that a killed process left behind (at the start of a run)."""
        return remove_stale_temporaries(self.folder, _TARGETS)

    def prune(self) -> None:
        """Delete all but the newest ``keep`` verified checkpoints; never the only good one."""
        good = []
        for _step, path in reversed(self.all_steps()):
            try:
                verify(path)
            except CheckpointError:
                continue
            good.append(path)
        for path in good[self.keep:]:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".sha256").unlink(missing_ok=True)
