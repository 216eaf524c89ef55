"""How many CPU cores this process may use, and how many DataLoader workers that allows."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """The cores this process may run on (its affinity mask, which containers and schedulers set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def worker_count(requested: int, local_processes: int = 1) -> int:
    """``requested`` DataLoader workers, at most one per core this process's share of the machine has
    (the cores divided among the ``local_processes`` of torchrun on this node): more only queue for the
    same cores, and torch warns at every epoch."""
    share = max(1, available_cpus() // max(1, local_processes))
    return max(0, min(int(requested), share))
