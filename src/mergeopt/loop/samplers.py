"""The samplers a space file may name: one table that drives the schema, the CLI's choices and
construction. Every argument is pinned, since Optuna's defaults change between releases."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna

from .surrogate import SurrogateSampler

if TYPE_CHECKING:
    from ..space import Space


def _startup(space: Space) -> int:
    """Random trials before a model-based sampler models anything. The enqueued baselines come on top:
    they all use the first method, so counted as start-up trials they left TPE a `method` categorical
    that had only ever seen one value, and it never tried another."""
    baselines = len(space.baselines()) if space.search.baselines else 0
    return baselines + min(10, max(4, space.search.n_trials // 4))


def _population(space: Space) -> int:
    """NSGA's generation: at least one candidate per worker, so no worker waits for a generation to end."""
    if space.search.population is not None:
        return space.search.population
    return max(space.search.workers, min(50, max(8, space.search.n_trials // 5)))


def _cmaes(space: Space) -> optuna.samplers.BaseSampler:
    """CMA-ES, its population at least the number of workers: with parallel workers Optuna discards a
    trial told after its generation has moved on, so a generation smaller than the workers wastes trials."""
    import math

    dims = sum(not isinstance(d, optuna.distributions.CategoricalDistribution) for d in space.distributions().values())
    default = 4 + math.floor(3 * math.log(max(dims, 1)))  # CMA-ES's own default population
    popsize = space.search.population or max(default, space.search.workers)
    return optuna.samplers.CmaEsSampler(seed=space.search.seed, popsize=popsize, warn_independent_sampling=False)


def _grid(space: Space) -> optuna.samplers.BaseSampler:
    import numpy as np

    grid: dict[str, list[Any]] = {}
    for name, d in space.distributions().items():
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            grid[name] = list(d.choices)
        else:
            grid[name] = [float(x) for x in np.linspace(d.low, d.high, space.search.grid_points)]
    return optuna.samplers.GridSampler(grid, seed=space.search.seed)


@dataclass(frozen=True)
class SamplerSpec:
    build: Callable[[Space], optuna.samplers.BaseSampler]
    single_objective: bool  # True: the study maximizes the combined score instead of the objectives
    description: str


SAMPLERS: dict[str, SamplerSpec] = {
    "cmaes": SamplerSpec(
        _cmaes, True,
        "CMA-ES on the combined score (the mergekit-evolve way); starts at the centre of the box"),
    "tpe": SamplerSpec(
        lambda s: optuna.samplers.TPESampler(seed=s.search.seed, multivariate=True, constant_liar=True,
                                             n_startup_trials=_startup(s)), False,
        "multi-objective TPE with the constant liar for running trials"),
    "nsga2": SamplerSpec(
        lambda s: optuna.samplers.NSGAIISampler(seed=s.search.seed, population_size=_population(s)), False,
        "NSGA-II, a genetic algorithm on the Pareto ranks"),
    "nsga3": SamplerSpec(
        lambda s: optuna.samplers.NSGAIIISampler(seed=s.search.seed, population_size=_population(s)), False,
        "NSGA-III, NSGA-II with reference points for three or more objectives"),
    "gp": SamplerSpec(
        lambda s: optuna.samplers.GPSampler(seed=s.search.seed, n_startup_trials=_startup(s),
                                            warn_independent_sampling=False), False,
        "Gaussian-process Bayesian optimization (log expected hypervolume improvement for several objectives)"),
    "surrogate": SamplerSpec(
        lambda s: SurrogateSampler(seed=s.search.seed, n_startup_trials=_startup(s)), True,
        "Thompson sampling from a Bayesian quadratic of the combined score in a trust region; running trials "
        "count as expected (pending-aware)"),
    "random": SamplerSpec(lambda s: optuna.samplers.RandomSampler(seed=s.search.seed), False,
                          "independent uniform draws: the baseline every sampler should beat"),
    "grid": SamplerSpec(_grid, False, "every combination of search.grid_points values per parameter"),
}


def make_sampler(space: Space) -> optuna.samplers.BaseSampler:
    return SAMPLERS[space.search.sampler].build(space)


def directions(space: Space) -> list[str]:
    if SAMPLERS[space.search.sampler].single_objective:
        return ["maximize"]
    return [o.direction for o in space.objectives]


def metric_names(space: Space) -> list[str]:
    """The study's objective names, in the order of `directions`."""
    if SAMPLERS[space.search.sampler].single_objective:
        return ["combined"]
    return [o.metric for o in space.objectives]
