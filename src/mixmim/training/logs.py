"""Where a run reports: ``metrics.csv``, the experiment trackers (TensorBoard by default), ``log.txt`` and
``skipped.txt``."""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

from mixmim.data.images import DataQualityError

__all__ = ["DataQualityError", "MetricsLog", "SkippedFiles", "log", "setup_logging"]

log = logging.getLogger("mixmim")


class _TqdmHandler(logging.StreamHandler):
    """Log lines that do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never kill a run
            super().emit(record)


class _LogFile(logging.FileHandler):
    """log.txt; when it cannot be written (a full disk) that is said once, in one line, and the log goes
    on on the console only (logging's default prints a traceback for every record)."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        sys.stderr.write(f"mixmim: warning: cannot write {self.baseFilename} ({error}); logging to the console only\n")
        log.removeHandler(self)


def setup_logging(run_dir: Path | None, is_main: bool) -> None:
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if run_dir is not None and is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        file_handler = _LogFile(run_dir / "log.txt")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file_handler)


class MetricsLog:
    """Appends one CSV row per logged step to ``metrics.csv`` (always: the loop reads it back) and
    mirrors it to the experiment trackers named in ``trackers`` (:mod:`mixmim.training.trackers`:
    ``tensorboard``, ``wandb``, ``mlflow``; ``csv`` names the CSV itself). Trackers open on first use,
    so a resumed run can hand over the checkpoint's :meth:`tracker_state` (``resume_state=`` or
    :meth:`resume`) after the log was built; nothing opens where ``enabled`` is False (other ranks)."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True, columns: list[str] | None = None,
                 trackers: tuple[str, ...] | list[str] = ("tensorboard",), config: dict | None = None,
                 run_name: str | None = None, resume_state: dict | None = None):
        from mixmim.training.trackers import check_trackers

        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.csv"
        self.enabled = enabled
        self.declared = columns  # header of a new file; None: the first row's keys
        self.columns: list[str] | None = None
        names = [t for t in trackers if tensorboard or t != "tensorboard"]
        self.tracker_names = check_trackers(names) if enabled else ()
        self.config = dict(config or {})
        self.run_name = run_name or self.run_dir.name
        self.resume_state = dict(resume_state or {})
        self.start_step = 0
        self.trackers: list | None = None  # None: not opened yet
        self._failed: set[str] = set()

    def resume(self, state: dict | None) -> None:
        """Continue the tracker runs of a checkpoint's :meth:`tracker_state` (call before the first write)."""
        self.resume_state = dict(state or {})

    def start(self) -> None:
        """Open the trackers now, before the first step: one that cannot start (no login, no server, a
        store its version refuses) stops the run with one line naming it and what to set."""
        if self.enabled:
            self._open(strict=True)

    def _open(self, strict: bool = False) -> list:
        """The open trackers. Opened again later (after a resume rewinds them), a tracker that fails is
        left out with a warning: a tracker never costs a run that has started."""
        if self.trackers is None:
            from mixmim.training.trackers import TrackerStartError, start_hint, tracker_class

            self.trackers = []
            for name in self.tracker_names:
                cls = tracker_class(name)
                if cls is None or name in self._failed:
                    continue
                run_id = (self.resume_state.get(name) or {}).get("run_id")
                try:
                    self.trackers.append(cls.open(self.run_dir, self.config, self.run_name, run_id, self.start_step))
                except ImportError:  # tensorboard is optional at run time
                    log.warning("%s is not installed; not logging to it", name)
                except Exception as exc:  # noqa: BLE001 - each tracker library raises its own kinds
                    reason = " ".join(str(exc).split())[:300] or exc.__class__.__name__
                    if strict:
                        self.close()
                        raise TrackerStartError(f"train.trackers: {name} could not start ({exc.__class__.__name__}: "
                                                f"{reason}); {start_hint(name)}") from None
                    self._failed.add(name)
                    log.warning("%s: could not reopen (%s); metrics.csv has every row", name, reason)
        return self.trackers

    def tracker_state(self) -> dict[str, dict[str, str]]:
        """``{tracker: {"run_id": ...}}`` for the checkpoint, so that ``--resume`` continues the same runs."""
        if not self.enabled:
            return {}
        return {t.name: {"run_id": t.run_id} for t in self._open() if t.run_id}

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows the interrupted run logged after its last checkpoint; trackers already
        open are reopened on the same runs, so TensorBoard purges its events after ``step`` too."""
        if not self.enabled:
            return
        self.start_step = step + 1
        if self.trackers:
            self.resume_state = self.tracker_state()
            self.close()
            self.trackers = None
        if not self.path.is_file():
            return
        with open(self.path, newline="") as handle:
            rows = list(csv.reader(handle))
        if not rows:
            return
        header, body = rows[0], rows[1:]
        keep = [r for r in body if r and float(r[0]) <= step]
        with open(self.path, "w", newline="") as handle:
            csv.writer(handle).writerows([header, *keep])
        self.columns = header

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **values}
        if self.columns is None:
            if self.path.is_file() and self.path.stat().st_size > 0:
                with open(self.path, newline="") as handle:
                    self.columns = next(csv.reader(handle))
            else:
                self.columns = list(self.declared or row)
                with open(self.path, "w", newline="") as handle:
                    csv.writer(handle).writerow(self.columns)
        new = [k for k in row if k not in self.columns]
        if new:  # a method reported a new metric: widen the header, keep the rows
            with open(self.path, newline="") as handle:
                old_rows = list(csv.reader(handle))[1:]
            self.columns = self.columns + new
            with open(self.path, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(self.columns)
                writer.writerows(r + [""] * len(new) for r in old_rows)
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerow([_fmt(row.get(c, "")) for c in self.columns])
        for tracker in self._open():
            try:
                tracker.log(step, values)
            except Exception as exc:  # a tracker's server being away must not stop training
                if tracker.name not in self._failed:
                    self._failed.add(tracker.name)
                    log.warning("%s: could not log step %d (%s: %s); metrics.csv has every row", tracker.name,
                                step, exc.__class__.__name__, exc)

    def close(self) -> None:
        for tracker in self.trackers or []:
            try:
                tracker.close()
            except Exception as exc:  # pragma: no cover - closing must never kill a run
                log.warning("%s: could not close (%s)", tracker.name, exc)
        self.trackers = []


def _fmt(value) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


class SkippedFiles:
    """Unreadable files seen so far, each listed once in ``skipped.txt`` with its reason. Stops the run
    when more than ``max_fraction`` of the data set has proved unreadable (a single bad file never
    does: on a small set one file is already more than 1%)."""

    def __init__(self, path: Path | None, total: int, max_fraction: float):
        self.path, self.total, self.max_fraction = path, total, max_fraction
        self.seen: dict[str, str] = {}
        self.new_this_epoch = 0

    def add(self, entries: list[tuple[str, str]]) -> None:
        fresh = [(p, r) for p, r in entries if p not in self.seen]
        for p, r in fresh:
            self.seen[p] = r
        self.new_this_epoch += len(fresh)
        if fresh and self.path is not None:
            with open(self.path, "a") as handle:
                handle.writelines(f"{p}\t{r}\n" for p, r in fresh)
        if len(self.seen) > max(1.0, self.max_fraction * self.total):
            raise DataQualityError(
                f"{len(self.seen)} of {self.total} images are unreadable, more than data.max_bad_fraction="
                f"{self.max_fraction:g}; see {self.path} (raise data.max_bad_fraction to go on anyway)")

    def note(self, entries: list[tuple[str, str]]) -> None:
        """List folders the scan could not enter; they are not images, so they do not count."""
        if entries and self.path is not None:
            with open(self.path, "a") as handle:
                handle.writelines(f"{p}\t{r}\n" for p, r in entries)
            log.warning("%d folder(s) could not be scanned, listed in %s", len(entries), self.path)

    def end_epoch(self, epoch: int) -> None:
        if self.new_this_epoch:
            log.warning("epoch %d: skipped %d unreadable image(s) (%d so far), listed in %s",
                        epoch, self.new_this_epoch, len(self.seen), self.path)
        self.new_this_epoch = 0
