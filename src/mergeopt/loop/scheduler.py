"""The ask/tell loop over a worker pool, as a state machine.

The study is RUNNING while it may ask for candidates, DRAINING once it may not (the trials asked for
are all out, or the timeout passed) and the trials in flight finish, then it ends in one of DONE,
TIMED_OUT or NO_WORKERS. Each worker slot is IDLE, BUSY (a trial), BACKOFF (lost; its replacement
starts at a set time), STARTING (the replacement prepares) or LOST (replaced too often).

The driver's work comes in units (record one result, ask one candidate), the most urgent first;
between units it collects whatever finished, so a worker waits on the driver for one unit at most.
With several asynchronous workers, each worker's next candidate is asked while its current trial
runs (the sampler's constant liar stands in for running trials). One worker stays strictly
sequential, so the same seed gives the same trials, resumed or not."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from enum import Enum

import optuna

from .. import faults
from ..result import TrialResult
from ..signals import STOP_SIGNALS
from ..space import Space
from .lease import Lease
from .pools import Started, WorkerPool
from .progress import Front, Progress
from .pruning import prune_threshold
from .store import ask, finished, record, requeue

START_TIMEOUT_S = 1800.0  # a replacement that has not started by then (no free GPU, a hung node) is given up


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, *STOP_SIGNALS)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Phase(str, Enum):
    RUNNING = "running"
    DRAINING = "draining"
    DONE = "done"
    TIMED_OUT = "timed out"
    NO_WORKERS = "no workers"
    LEASE_LOST = "lease lost"  # another driver took the study: this one stops and touches nothing more


class SlotState(Enum):
    IDLE = "idle"
    BUSY = "busy"
    BACKOFF = "backoff"
    STARTING = "starting"
    LOST = "lost"


@dataclass
class Slot:
    state: SlotState = SlotState.IDLE
    trial: optuna.trial.Trial | None = None  # the trial it runs
    ahead: optuna.trial.Trial | None = None  # its next candidate, asked while it runs
    since: float = 0.0  # when its trial was submitted
    restarts: int = 0  # replacements started so far
    due: float = 0.0  # BACKOFF: when its replacement starts
    reason: str = ""  # why its last worker was lost


class Scheduler:
    def __init__(self, space: Space, study: optuna.Study, pool: WorkerPool, *, n_trials: int,
                 on_progress: Callable[[Progress], None] | None = None, lease: Lease | None = None):
        self.space, self.study, self.pool, self.n_trials, self.lease = space, study, pool, n_trials, lease
        self.on_progress = on_progress or (lambda _: None)
        self.max_restarts = space.search.worker_restarts if pool.replaceable else 0
        self.backoff_s = space.search.restart_backoff
        self.deadline = time.perf_counter() + space.search.timeout if space.search.timeout else math.inf
        self.slots = [Slot() for _ in range(pool.size)]
        self.calls: dict[Hashable, int] = {}  # call in flight -> its slot
        self.received: deque[tuple[optuna.trial.Trial, TrialResult, float]] = deque()  # not yet recorded
        self.asked = self.recorded = 0
        self.front = Front(space, study)
        self.progress = Progress(phase=Phase.RUNNING.value, total=n_trials, done=len(finished(study)))
        self.ask_ahead = pool.asynchronous and pool.size > 1
        for slot, reason in pool.failed_at_start.items():
            self._lost(slot, reason)

    # ------------------------------------------------------------------ the loop
    def run(self) -> Phase:
        self._show()
        phase = Phase.RUNNING
        try:
            while (phase := self.step()) in (Phase.RUNNING, Phase.DRAINING):
                pass
        finally:
            if phase is not Phase.LEASE_LOST:
                with _no_interrupts():  # a second Ctrl-C or SIGTERM must not cut the bookkeeping short
                    self._settle()
        self.progress.phase = phase.value
        self._show()
        return phase

    def step(self) -> Phase:
        """One unit of the driver's work; the phase after it."""
        now = time.perf_counter()
        for i, s in enumerate(self.slots):
            if s.state is SlotState.BACKOFF and s.due <= now:
                s.state, s.due = SlotState.STARTING, now + START_TIMEOUT_S
                self.calls[self.pool.start(i)] = i
            elif s.state is SlotState.STARTING and s.due <= now:  # e.g. no free GPU for it: give up on it
                self.calls = {k: v for k, v in self.calls.items() if v != i}
                self._lost(i, f"a replacement worker did not start within {START_TIMEOUT_S:.0f} s")
            if s.state is SlotState.IDLE and s.ahead is not None and now < self.deadline:
                self._submit(i, s.ahead)
                s.ahead = None
        if self.calls and (got := self.pool.wait(list(self.calls), timeout=0)) is not None:
            self._receive(*got)
            return self.phase()
        if self.received:
            self._record(*self.received.popleft())
            return self.phase()
        if self._room():
            idle = [i for i, s in enumerate(self.slots) if s.state is SlotState.IDLE]
            if idle:
                self._submit(idle[0], self._ask())
                return self.phase()
            behind = [s for s in self.slots if s.state is SlotState.BUSY and s.ahead is None] if self.ask_ahead else []
            if behind:
                behind[0].ahead = self._ask()
                return self.phase()
        phase = self.phase()
        if phase not in (Phase.RUNNING, Phase.DRAINING):
            return phase
        due = [s.due for s in self.slots if s.state in (SlotState.BACKOFF, SlotState.STARTING)]
        timeout = max(0.0, min(due) - time.perf_counter()) if due else None
        if self.calls:
            if (got := self.pool.wait(list(self.calls), timeout=timeout)) is not None:
                self._receive(*got)
        elif timeout is not None:  # only replacements to wait for
            time.sleep(timeout)
        return self.phase()

    def _settle(self) -> None:
        """What a stop leaves: results received are recorded, trials asked ahead or in flight are
        requeued, and so is any trial this driver asked but had not handed out yet (a stop between
        Optuna's ask and the hand-over): with the study's lease held, every RUNNING trial is this driver's."""
        while self.received:  # finished before an interruption: recorded, not run again
            self._record(*self.received.popleft())
        for s in self.slots:
            if s.ahead is not None:  # asked but never started (timeout)
                requeue(self.study, s.ahead, "not started: the study stopped first")
                s.ahead = None
            if s.trial is not None:  # only when the loop was interrupted: it runs again on resume
                requeue(self.study, s.trial, "interrupted: the study was stopped while it ran")
                s.trial = None
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            requeue(self.study, t, "interrupted: the study was stopped while it ran")

    def trial_ids(self) -> list[int]:
        """Storage ids of the trials in flight or asked ahead, for the storage's heartbeat."""
        return [t._trial_id for s in self.slots for t in (s.trial, s.ahead) if t is not None]

    def phase(self) -> Phase:
        """Replacements still starting keep the study going only while there are trials to give them."""
        if self.lease is not None and self.lease.lost:
            return Phase.LEASE_LOST
        if self.received or any(s.state is SlotState.BUSY for s in self.slots):
            return Phase.RUNNING if self._room() else Phase.DRAINING
        if self.progress.done >= self.n_trials:
            return Phase.DONE
        if time.perf_counter() >= self.deadline:
            return Phase.TIMED_OUT
        if all(s.state is SlotState.LOST for s in self.slots):
            return Phase.NO_WORKERS
        return Phase.RUNNING

    def lost_reason(self) -> str:
        reasons = sorted({s.reason for s in self.slots if s.reason})
        return "; ".join(reasons) or "no worker could be started"

    # ------------------------------------------------------------------ units
    def _room(self) -> bool:
        open_trials = sum(s.trial is not None for s in self.slots) + sum(s.ahead is not None for s in self.slots)
        return (self.progress.done + open_trials + len(self.received) < self.n_trials
                and time.perf_counter() < self.deadline
                and any(s.state in (SlotState.IDLE, SlotState.BUSY) for s in self.slots))

    def _ask(self) -> optuna.trial.Trial:
        trial = ask(self.space, self.study)
        self.asked += 1
        faults.point("ask", role="driver", count=self.asked)
        return trial

    def _submit(self, i: int, trial: optuna.trial.Trial) -> None:
        s = self.slots[i]
        seed = int(trial.user_attrs["seed"])
        key = self.pool.submit(i, trial.number, trial.params, seed, prune_threshold(self.space, self.study))
        self.calls[key] = i
        s.state, s.trial, s.since = SlotState.BUSY, trial, time.perf_counter()

    def _receive(self, key: Hashable, result: TrialResult | Started) -> None:
        """A finished call: a worker that finished a trial starts its next candidate at once; the result
        is recorded in a later unit."""
        i = self.calls.pop(key)
        s = self.slots[i]
        if isinstance(result, Started):
            if result.ok:
                s.state, s.reason = SlotState.IDLE, ""
                self.progress.restarts += 1
            else:
                self._lost(i, result.reason)
            self._show()
            return
        trial, wall = s.trial, time.perf_counter() - s.since
        s.trial = None
        if result.worker_died:
            self._lost(i, result.reason)
        elif s.ahead is not None and time.perf_counter() < self.deadline:
            self._submit(i, s.ahead)
            s.ahead = None
        else:
            s.state = SlotState.IDLE
        self.received.append((trial, result, wall))

    def _lost(self, i: int, reason: str) -> None:
        """A worker is gone: replace it after a backoff that doubles each time, up to the bound."""
        s = self.slots[i]
        s.reason = reason
        if s.ahead is not None:  # back to the queue, for whichever worker is free first
            requeue(self.study, s.ahead, "not started: its worker was lost")
            s.ahead = None
        if s.restarts < self.max_restarts:
            s.state, s.due = SlotState.BACKOFF, time.perf_counter() + self.backoff_s * 2**s.restarts
            s.restarts += 1
            return
        s.state = SlotState.LOST

    def _record(self, trial: optuna.trial.Trial, result: TrialResult, wall: float) -> None:
        if record(self.space, self.study, trial, result, wall):
            self.progress.done += 1
        self.recorded += 1
        faults.point("tell", role="driver", count=self.recorded)
        if result.state == "complete":
            self.front.add(result.metrics)
        self._show()

    def _show(self) -> None:
        p = self.progress
        p.best_combined, p.front_size, p.hypervolume = self.front.stats()
        p.workers = sum(s.state in (SlotState.IDLE, SlotState.BUSY) for s in self.slots)
        self.on_progress(p)
