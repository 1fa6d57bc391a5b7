"""The pending-aware surrogate sampler on objectives with a known optimum (no models): it beats random
search at equal budgets, its proposals are functions of the history and the seed, its start-up sees
every categorical choice, and a running trial's fantasy removes the posterior's spread where it runs."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from mergeopt.loop.surrogate import BayesianQuadratic, SurrogateSampler, features

D = 10
OPT = np.random.default_rng(0).random(D)
BONUS = {"ties": 0.3, "dare_linear": 0.1, "task_arithmetic": 0.0}


def objective(trial: optuna.Trial) -> float:
    method = trial.suggest_categorical("method", list(BONUS))
    x = np.array([trial.suggest_float(f"w{i}", 0.0, 1.5) / 1.5 for i in range(D)])
    return BONUS[method] - float(np.sum((x - OPT) ** 2)) + 0.2 * float(np.sin(4 * x[0]))


def best_after(sampler: optuna.samplers.BaseSampler, n: int) -> float:
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(objective, n_trials=n)
    return study.best_value


@pytest.fixture(autouse=True)
def _quiet():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_beats_random_search_at_forty_trials_on_every_seed():
    for seed in range(3):
        ours = best_after(SurrogateSampler(seed=seed, n_startup_trials=10), 40)
        rand = best_after(optuna.samplers.RandomSampler(seed=seed), 40)
        assert ours > rand + 0.2, (seed, ours, rand)


def test_a_trial_is_a_function_of_the_history_and_the_seed():
    def params(seed: int) -> list[dict]:
        study = optuna.create_study(direction="maximize", sampler=SurrogateSampler(seed=seed, n_startup_trials=5))
        study.optimize(objective, n_trials=12)
        return [t.params for t in study.trials]

    assert params(1) == params(1)
    assert params(1) != params(2)


def test_start_up_cycles_through_the_categorical_choices():
    study = optuna.create_study(direction="maximize", sampler=SurrogateSampler(seed=0, n_startup_trials=6))
    study.optimize(objective, n_trials=6)
    assert {t.params["method"] for t in study.trials} == set(BONUS)


def test_a_running_trial_collapses_the_posterior_spread_where_it_runs():
    rng = np.random.default_rng(1)
    u, cats = rng.random((15, 3)), np.zeros((15, 0), dtype=int)
    y = -((u - 0.3) ** 2).sum(1)
    phi, prior = features(u, cats, [])
    pending = np.array([[0.9, 0.9, 0.9]])
    phi_p, _ = features(pending, np.zeros((1, 0), dtype=int), [])
    alone = BayesianQuadratic(phi, (y - y.mean()) / y.std(), prior)
    believed = BayesianQuadratic(np.vstack([phi, phi_p]), np.concatenate([(y - y.mean()) / y.std(),
                                                                          alone.predict(phi_p)]), prior)
    spread = [np.std([(phi_p @ m.draw(np.random.default_rng(i)))[0] for i in range(300)]) for m in (alone, believed)]
    assert spread[1] < 0.5 * spread[0], spread


def test_asks_ahead_of_running_trials_are_not_repeats():
    """With trials running (asked, not told), each new ask lands elsewhere."""
    study = optuna.create_study(direction="maximize", sampler=SurrogateSampler(seed=0, n_startup_trials=8))
    study.optimize(objective, n_trials=20)
    dists = study.trials[-1].distributions
    running = [study.ask(dists) for _ in range(3)]
    points = [np.array([t.params[f"w{i}"] for i in range(D)]) for t in running]
    assert min(np.abs(a - b).max() for i, a in enumerate(points) for b in points[i + 1:]) > 1e-3
