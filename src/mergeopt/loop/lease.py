"""One live driver per study: a lease in the study's own storage, renewed by a heartbeat.

The driver owns every trial's bookkeeping (ask, requeue, tell), so two drivers on one study would fail
each other's running trials. The lease is a study attribute {host, pid, started, since, beat, token},
taken at start-up, renewed every `BEAT_S` seconds from a thread, and cleared at a clean stop. Another
driver's lease is live when
- its holder runs on this host and its process still exists (a stopped or slow process is alive; a
  killed one is not, at once);
- its holder runs on another host and its beat is younger than `STALE_S` seconds.

A dead driver's lease is taken over on resume without waiting; what it left behind is cleared by the
caller (store.recover_interrupted, and `clear_stale_lock` for a journal file). Two drivers that start
within the same instant can both write a lease; the later write wins, and the other driver finds a
foreign token at its next beat and stops (`lost`), before it records anything more."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import optuna

from ..errors import UserError

ATTR = "driver_lease"
BEAT_S = 10.0  # how often the holder renews its lease (and its trials' Optuna heartbeats)
STALE_S = 60.0  # a lease from another host whose beat is older than this belongs to a dead driver


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float  # the holder process's start time: a pid reused by another process is not the holder
    since: str  # ISO time the lease was taken, for the refusal's line
    beat: float  # wall-clock time of the last renewal
    token: str

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {self.since}"


def _this_process() -> tuple[str, int, float]:
    import psutil

    pid = os.getpid()
    return socket.gethostname(), pid, round(psutil.Process(pid).create_time(), 2)


def holder_of(study: optuna.Study) -> Holder | None:
    data = study.user_attrs.get(ATTR)
    if not data:
        return None
    try:
        return Holder(**data)
    except TypeError:  # written by another version: treat as no lease
        return None


def is_live(h: Holder, now: float | None = None) -> bool:
    import psutil

    host, _, _ = _this_process()
    if h.host == host:
        try:
            return abs(psutil.Process(h.pid).create_time() - h.started) < 1.0
        except psutil.Error:  # no such process
            return False
    return (now or time.time()) - h.beat < STALE_S


def refuse_if_held(study: optuna.Study, where: str) -> Holder | None:
    """One line naming the live driver that holds the study's lease, or the lease (a dead driver's, or None)."""
    h = holder_of(study)
    if h is not None and is_live(h):
        raise UserError(f"{where}: another optimize is running study {study.study_name!r} ({h.describe()}); one "
                        "driver runs a study at a time: wait for it, stop it, or add workers to it instead")
    return h


class Lease:
    """Held from `acquire` to `release`; `lost` says why it was lost meanwhile (None while held)."""

    def __init__(self, study: optuna.Study, *, where: str, trials: Callable[[], list[int]] | None = None,
                 heartbeat: Callable[[int], None] | None = None):
        self.study, self.where = study, where
        self.trials = trials or (lambda: [])  # trial ids in flight, for the storage's own heartbeats
        self.heartbeat = heartbeat
        self.token = uuid.uuid4().hex
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_ok = time.time()  # the last beat that reached the storage

    def acquire(self, on_takeover: Callable[[], None] | None = None) -> Lease:
        """Take the lease, or one line naming the live driver that holds it. `on_takeover` runs before the
        first write when the lease was a dead driver's (to clear what it left, such as a lock file)."""
        old = refuse_if_held(self.study, self.where)
        if old is not None and on_takeover is not None:
            on_takeover()
        host, pid, started = _this_process()
        since = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
        self._write(Holder(host, pid, started, since, time.time(), self.token))
        self._last_ok = time.time()
        self._thread = threading.Thread(target=self._beat, name="mergeopt-lease", daemon=True)
        self._thread.start()
        return self

    def _write(self, h: Holder) -> None:
        self.study.set_user_attr(ATTR, asdict(h))

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - a storage hiccup: the next beat tries again
                if self.lost is None and time.time() - self._last_ok > STALE_S:
                    self.lost = f"the study's storage could not be reached for {STALE_S:.0f} s ({type(e).__name__})"

    def renew(self) -> None:
        """One beat: the lease's time, and the storage's heartbeat of every trial in flight."""
        h = holder_of(self.study)
        if h is None or h.token != self.token:
            self.lost = (f"another driver took this study's lease ({h.describe()})" if h is not None
                         else "the study's lease was cleared by another process")
            self._stop.set()
            return
        self._write(Holder(h.host, h.pid, h.started, h.since, time.time(), self.token))
        if self.heartbeat is not None:
            for tid in self.trials():
                self.heartbeat(tid)
        self._last_ok = time.time()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        h = holder_of(self.study)
        if h is not None and h.token == self.token:
            self.study.set_user_attr(ATTR, None)
