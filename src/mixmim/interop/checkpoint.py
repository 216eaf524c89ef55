"""Checkpoints that survive crashes: atomic writes, a checksum per file, the last N kept.

``checkpoints/step_00001234.pt`` holds everything a run needs to continue (model, optimiser, scaler,
step, RNG states, resolved config); ``step_00001234.pt.sha256`` is written after the rename, so a
file without a matching checksum is known to be incomplete or damaged and is never resumed from.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from mixmim.utils.files import atomic_write, atomic_write_text, sha256_of

FORMAT = "mixmim-checkpoint/1"
_NAME = re.compile(r"^step_(\d{8,})\.pt$")
log = logging.getLogger("mixmim")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, damaged or of another architecture."""


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
    expected = digest_file.read_text().split()[0]
    if sha256_of(path) != expected:
        raise CheckpointError(f"checkpoint {path} is damaged or truncated (checksum mismatch, "
                              f"{path.stat().st_size} bytes on disk)")


def load_checkpoint(path: str | Path, check: bool = True) -> dict[str, Any]:
    """Read a checkpoint on the CPU; with ``check``, refuse a file whose checksum does not match."""
    path = Path(path)
    if check and path.with_name(path.name + ".sha256").exists():
        verify(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.__class__.__name__}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a mixmim training checkpoint (format {FORMAT})")
    return state


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
        for step, path in reversed(self.all_steps()):
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
        except OSError as exc:
            log.error("could not write checkpoint %s (%s); training continues, earlier checkpoints are kept",
                      path, exc.strerror or exc)
            return None
        self.prune()
        return path

    def prune(self) -> None:
        """Delete all but the newest ``keep`` verified checkpoints; never the only good one."""
        good = []
        for step, path in reversed(self.all_steps()):
            try:
                verify(path)
            except CheckpointError:
                continue
            good.append(path)
        for path in good[self.keep:]:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".sha256").unlink(missing_ok=True)
