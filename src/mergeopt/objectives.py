"""Metrics to objective values, the combined score, the Pareto front and its hypervolume.

The front and the hypervolume come from Optuna's own helpers, fed in minimisation form (maximised
objectives negated). Objectives are shares in [0, 1], so the reference point is the worst corner:
0 for a maximised objective, 1 for a minimised one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import optuna

from .space import Space


def combined_of(weights: dict[str, float], metrics: dict[str, float]) -> float:
    """A combined expression (parsed by `space.parse_combined`) on a metrics dict; the one place a
    combined score is computed."""
    return float(sum(c * metrics[k] for k, c in weights.items()))


def combined_score(space: Space, metrics: dict[str, float]) -> float:
    return combined_of(space.combined_weights, metrics)


def objective_values(space: Space, metrics: dict[str, float]) -> list[float]:
    return [float(metrics[o.metric]) for o in space.objectives]


def _as_loss(space: Space, values: np.ndarray) -> np.ndarray:
    sign = np.array([-1.0 if o.direction == "maximize" else 1.0 for o in space.objectives])
    return values * sign


def reference_point(space: Space) -> np.ndarray:
    return np.array([0.0 if o.direction == "maximize" else 1.0 for o in space.objectives]) * \
        np.array([-1.0 if o.direction == "maximize" else 1.0 for o in space.objectives])


def pareto_mask(space: Space, values: Sequence[Sequence[float]]) -> np.ndarray:
    """True for the points no other point dominates (duplicates all kept)."""
    from optuna.study._multi_objective import _is_pareto_front

    if len(values) == 0:
        return np.zeros(0, dtype=bool)
    return _is_pareto_front(_as_loss(space, np.asarray(values, dtype=float)), assume_unique_lexsorted=False)


def hypervolume(space: Space, values: Sequence[Sequence[float]]) -> float:
    """Hypervolume dominated by `values` inside the box bounded by the reference point."""
    from optuna._hypervolume import compute_hypervolume

    if len(values) == 0:
        return 0.0
    loss = _as_loss(space, np.asarray(values, dtype=float))
    ref = reference_point(space)
    loss = loss[(loss <= ref).all(axis=1)]
    if len(loss) == 0:
        return 0.0
    return float(compute_hypervolume(loss, ref))


def dominates(space: Space, a: Sequence[float], b: Sequence[float]) -> bool:
    la, lb = _as_loss(space, np.asarray(a, float)), _as_loss(space, np.asarray(b, float))
    return bool((la <= lb).all() and (la < lb).any())


def front_trials(space: Space, study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The complete trials on the Pareto front, best combined score first (ties: lower number)."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    mask = pareto_mask(space, [objective_values(space, t.user_attrs["metrics"]) for t in done])
    members = [t for t, m in zip(done, mask, strict=True) if m]
    return sorted(members, key=lambda t: (-t.user_attrs["metrics"]["combined"], t.number))
