"""Writing files so that a crash never leaves a half-written one in place."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from mixmim.utils.errors import UserError


# What atomic_write names its temporary files: ".<target name>.<random>.tmp" (tempfile.mkstemp).
class WriteError(UserError):
    """A file could not be written (a full disk or quota, reported by the writing library its own way)."""


_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]{8}\.tmp$")
_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask (it can only be read by setting it, so set it back at once)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def public_mode(path: str | Path, executable: bool = False) -> None:
    """Give a file the mode an ordinary ``open()`` would (0666 or 0777 less the umask): temporary files
    are created 0600, and a run's files renamed from them would stay private to their owner."""
    os.chmod(path, (0o777 if executable else 0o666) & ~current_umask())


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, flush it to disk, then rename it over
    ``path``. A process killed (or an exception raised) inside ``write`` leaves the old file intact
    and no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        public_mode(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None and exc.strerror:  # say which file could not be written
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except Exception as exc:  # noqa: BLE001 - the writer's library reports a full disk in its own way
        tmp.unlink(missing_ok=True)
        reason = " ".join(str(exc).split())[:200] or exc.__class__.__name__
        raise WriteError(f"could not write {path} ({exc.__class__.__name__}: {reason})") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temporaries(folder: str | Path, targets: re.Pattern[str] | None = None) -> list[Path]:
    """Delete the temporary files a process killed inside :func:`atomic_write` left in ``folder`` (only
    names this module gives, ``.<name>.<8 characters>.tmp``, and with ``targets`` only those whose
    target name matches it); the list of what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TEMPORARY.match(path.name)
        if match and path.is_file() and (targets is None or targets.match(match.group("target"))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
