"""The worker pool interface: slots that each run one trial at a time.

A call (a trial, or the start of a replacement worker) returns a key at once; `wait` gives back one
finished call. A worker that dies answers its call with a `TrialResult.died` (a trial) or a
`Started(ok=False)` (a start). The pool only runs calls; when to replace a worker is the scheduler's."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from ..result import TrialResult

PhaseCallback = Callable[[str], None]


@dataclass
class Started:
    """The answer to a start call: the worker is ready (its evaluation prepared), or it died starting."""
    slot: int
    ok: bool
    info: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


class WorkerPool(ABC):
    asynchronous: bool = False  # True: trials run while the driver asks and tells
    replaceable: bool = False  # True: a lost worker can be replaced (`start`)
    failed_at_start: dict[int, str] = {}  # noqa: RUF012 - slot -> why its first worker never came up (read-only here)

    @property
    @abstractmethod
    def size(self) -> int:
        """The number of slots."""

    @abstractmethod
    def submit(self, slot: int, trial: int, params: dict, seed: int, prune_below: float | None) -> Hashable:
        """Run trial number `trial` on the slot's worker."""

    def start(self, slot: int) -> Hashable:
        """Start a new worker in the slot, replacing a lost one."""
        raise NotImplementedError(f"{type(self).__name__} cannot replace workers")

    @abstractmethod
    def wait(self, keys: list[Hashable], timeout: float | None = None) -> tuple[Hashable, TrialResult | Started] | None:
        """One finished call among `keys`, or None when none finished within `timeout` seconds."""

    def workers(self) -> list[dict[str, Any]]:
        """What each live worker reported when it started (worker, pid, node, device, ...)."""
        return []

    @abstractmethod
    def close(self) -> None: ...
