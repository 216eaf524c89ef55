"""Stopping cleanly: SIGTERM, SIGUSR1 (SLURM's warning before a preemption or the time limit) and
Ctrl-C set a flag; so does a stop file named by ``$MIXMIM_STOP_FILE`` (what ``python -m mixmim.launch``
creates when it is signalled, see :mod:`mixmim.launch`). The loop checkpoints at the next step
boundary and the process exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

log = logging.getLogger("mixmim")

STOP_FILE_ENV = "MIXMIM_STOP_FILE"
SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None)


def _worker_init(_: int) -> None:
    # Ctrl-C and the scheduler's SIGTERM are for the main process, which checkpoints and stops the
    # workers itself; a worker dying first would turn a clean stop into a crash.
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopRequest:
    """Context manager: ``signal_name`` is set when a stop was asked for (a signal or the stop file)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        stop_file = os.environ.get(STOP_FILE_ENV)
        self.stop_file = Path(stop_file) if stop_file else None

    def __enter__(self) -> StopRequest:
        for sig in SIGNALS:
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

    def requested(self) -> bool:
        """Whether to stop after this step (the stop file is looked at here, once per step)."""
        if self.signal_name is None and self.stop_file is not None and self.stop_file.exists():
            self.signal_name = f"stop file {self.stop_file}"
            log.warning("%s found: finishing this step, then writing a checkpoint", self.stop_file)
        return self.signal_name is not None

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
