"""``python -m mixmim.launch [torchrun options] -m mixmim VERB ...``: torchrun with a clean stop.

torchrun treats a SIGTERM to itself as a failure: it forwards the signal to its workers, and however
cleanly they checkpoint and exit, it raises ``SignalException`` and exits 1 with a traceback, so a
requeue script cannot tell a clean stop from a crash (issue 23). This launcher runs torchrun as a child
in a session of its own, so a signal sent to the launcher (or to its process group, as SLURM's
``srun`` and ``scancel`` do) does not reach torchrun. Instead, on SIGTERM, SIGINT or SIGUSR1 it creates
the stop file the workers look at after every step (``$MIXMIM_STOP_FILE``, see
:mod:`mixmim.training.signals`): every rank finishes its step, the checkpoint is written once, the
workers exit 0, torchrun exits 0 and so does the launcher. A second signal forwards SIGTERM to torchrun
itself (stop now). The exit status is torchrun's.

Multi-node: one launcher per node (``srun``); each creates its own node-local stop file, and the loop
stops every rank when any rank sees a stop request.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from mixmim.training.signals import SIGNALS, STOP_FILE_ENV


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    folder = Path(tempfile.mkdtemp(prefix="mixmim-launch-"))
    stop_file = folder / "stop"
    env = {**os.environ, STOP_FILE_ENV: str(stop_file)}
    child = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *argv], env=env,
                             start_new_session=True)
    signals_seen: list[str] = []

    def handle(signum, frame) -> None:
        name = signal.Signals(signum).name
        signals_seen.append(name)
        if len(signals_seen) == 1:
            stop_file.touch()
            print(f"mixmim.launch: {name}: asking every rank to checkpoint after its current step "
                  f"(a second signal stops torchrun at once)", file=sys.stderr, flush=True)
        else:
            print(f"mixmim.launch: {name} again: sending SIGTERM to torchrun", file=sys.stderr, flush=True)
            child.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, handle) for sig in SIGNALS}
    try:
        while True:
            try:
                status = child.wait()
                break
            except KeyboardInterrupt:  # SIGINT's handler is ours; this is a Ctrl-C during wait's set-up
                handle(signal.SIGINT, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_file.unlink(missing_ok=True)
        folder.rmdir()
    if signals_seen and status == 0:
        print(f"mixmim.launch: stopped cleanly after {signals_seen[0]}; continue with --resume", file=sys.stderr)
    return status if status >= 0 else 128 - status  # a child killed by signal N: the shell's 128 + N


if __name__ == "__main__":
    sys.exit(main())
