"""What a worker sends back for one trial: a typed value, so the driver never reads string keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

State = Literal["complete", "pruned", "fail"]


@dataclass
class TrialResult:
    state: State
    worker: int = -1
    pid: int = 0
    node: str = ""  # the Ray node that ran the trial ("" in-process)
    merge_s: float = 0.0
    eval_s: float = 0.0
    forward_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)  # complete: the validation metrics
    subset: dict[str, float] | None = None  # multi-fidelity: the subset stage's metrics
    reason: str = ""  # fail: why
    worker_died: bool = False  # fail: the worker process was lost (the trial runs again)

    def timing(self, wall_s: float) -> dict[str, float | int | str]:
        """The driver's record of where the trial's wall time went."""
        return {"worker": self.worker, "pid": self.pid, "node": self.node, "merge_s": self.merge_s, "eval_s": self.eval_s, "forward_s": self.forward_s,
                "wall_s": wall_s, "overhead_s": max(0.0, wall_s - self.merge_s - self.eval_s)}

    @classmethod
    def died(cls, worker: int, reason: str) -> TrialResult:
        return cls(state="fail", worker=worker, reason=reason, worker_died=True)
