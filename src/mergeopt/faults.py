"""Fault injection: kill this process at a named point, so resilience tests never race real kills.

`MERGEOPT_FAULT` holds one or more comma-separated faults, each `ROLE:POINT[@TRIAL]`:
- `worker:merge@3`, `worker:generation@3`, `worker:judge@3`: the worker running trial 3 dies at that
  phase (`*` for every trial; without `@` the first trial it runs);
- `worker:startup`: a worker dies while it starts (every start, so no replacement can be had);
- `driver:tell@4`: the driver dies right after it records the 4th finished trial of this run;
- `driver:ask@4`: the driver dies right after it asks its 4th candidate of this run.
A fault is a SIGKILL: no handler, no cleanup, no flush; what survives is what a real crash leaves. A
suffix names another signal: `driver:tell@4!INT` is a Ctrl-C at that point, `!TERM` what SLURM sends,
`!STOP` holds the process alive and idle until a SIGCONT; `!RAISE` raises `InjectedFault` instead, an
exception inside the trial (or the worker's start) rather than the death of its process."""

from __future__ import annotations

import os
import signal

ENV = "MERGEOPT_FAULT"
_trial: int | None = None  # the trial this worker is running, set by the worker around each trial


def set_trial(number: int | None) -> None:
    global _trial
    _trial = number


class InjectedFault(RuntimeError):
    """The exception a `!RAISE` fault raises."""


def _match(role: str, point: str, count: int | None) -> signal.Signals | str | None:
    """The signal of the first fault that names this point, or None."""
    for spec in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
        spec, _, sig = spec.partition("!")
        who, _, where = spec.partition(":")
        name, _, at = where.partition("@")
        if who != role or name != point:
            continue
        if not at or at == "*" or (count is not None and at.isdigit() and int(at) == count):
            return "RAISE" if sig == "RAISE" else signal.Signals[f"SIG{sig or 'KILL'}"]
    return None


def point(name: str, role: str = "worker", count: int | None = None) -> None:
    """Signal this process here if a fault names this point; `count` defaults to the worker's trial."""
    if os.environ.get(ENV) and (sig := _match(role, name, _trial if count is None else count)) is not None:
        if sig == "RAISE":
            raise InjectedFault(f"injected fault at {name}")
        os.kill(os.getpid(), sig)
