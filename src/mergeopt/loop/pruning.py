"""Pruning on the multi-fidelity subset stage."""

from __future__ import annotations

import optuna

from ..space import Space

MIN_FINISHED = 8


def prune_threshold(space: Space, study: optuna.Study) -> float | None:
    """Median pruner: a candidate whose subset combined score falls below the median subset score of
    the finished trials stops after the subset (once MIN_FINISHED trials have finished)."""
    if space.search.pruner != "median" or not space.evaluation.subset_fraction:
        return None
    scores = sorted(t.user_attrs["subset"]["combined"] for t in study.get_trials(deepcopy=False)
                    if "subset" in t.user_attrs and t.state == optuna.trial.TrialState.COMPLETE)
    if len(scores) < MIN_FINISHED:
        return None
    return scores[len(scores) // 2]
