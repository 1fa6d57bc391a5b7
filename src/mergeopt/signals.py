"""SIGTERM and SIGHUP stop a study as Ctrl-C does. SLURM and Kubernetes send SIGTERM before they kill a
job; a closed terminal sends SIGHUP. Each raises `Stopped` in the driver's main thread, a
KeyboardInterrupt, so the same bookkeeping runs: results received are recorded, trials in flight are
requeued, and the CLI prints the command that resumes the study, exiting with 128 + the signal."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _raise(signum: int, _frame) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within: SIGTERM and SIGHUP raise `Stopped` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def keep_handlers() -> Iterator[None]:
    """Restore this process's SIGTERM and SIGHUP handlers after a library replaces them (ray.init makes
    SIGTERM a bare `sys.exit(15)`, which skips the study's bookkeeping)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            if h is not None:
                signal.signal(s, h)
