"""What the driver shows while a study runs: the phase, the trials finished, the front."""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from ..objectives import hypervolume, objective_values, pareto_mask
from ..space import Space


@dataclass
class Progress:
    phase: str = "starting"
    done: int = 0
    total: int = 0
    best_combined: float = float("-inf")
    front_size: int = 0
    hypervolume: float = 0.0
    workers: int = 0  # workers able to take a trial now
    restarts: int = 0  # workers replaced so far


class Front:
    """The finished trials' objective values and best combined score, kept by the driver as results
    arrive, so progress costs no storage read per trial."""

    def __init__(self, space: Space, study: optuna.Study):
        self.space = space
        self.values: list[list[float]] = []
        self.best = float("-inf")
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            self.add(t.user_attrs["metrics"])

    def add(self, metrics: dict[str, float]) -> None:
        self.values.append(objective_values(self.space, metrics))
        self.best = max(self.best, metrics["combined"])

    def stats(self) -> tuple[float, int, float]:
        if not self.values:
            return float("-inf"), 0, 0.0
        return self.best, int(pareto_mask(self.space, self.values).sum()), hypervolume(self.space, self.values)
