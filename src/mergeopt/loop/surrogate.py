"""A pending-aware surrogate sampler: a Bayesian quadratic model of the combined score.

Why a quadratic: merge metrics are smooth in the merge coefficients, and a quadratic in them fits
them well from few evaluations (MAP, arXiv 2406.07529, approximates each metric by a quadratic in
the task-vector weights). Here the quadratic is Bayesian (ridge with a Gaussian prior whose scale and
noise are chosen by the marginal likelihood), so it has a posterior to sample.

Why pending-aware: with several asynchronous workers, the next candidate is asked while others run.
Each running trial enters the model as a fantasy observation at the posterior mean ("kriging
believer"): that collapses the posterior's spread there, so a Thompson draw has no reason to propose
the same region again, as in asynchronous pending-aware merging (AP-BMM, arXiv 2512.09972).

Each proposal maximizes one Thompson draw over candidates inside a trust region around the best
trial (as TuRBO does), whose side doubles after an improvement and halves after a run of
non-improvements. The region and every random draw are functions of the trial history, the trials
running and the seed: with one worker a study is reproducible and a resumed one continues as it would
have; with several, what runs at each ask depends on timing, as with every sampler.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

_NOISE = (1e-3, 1e-2, 3e-2, 0.1, 0.3)  # noise variances tried, on standardized scores
_SCALE = (0.03, 0.1, 0.3, 1.0, 3.0)  # prior variances of the coefficients tried, on standardized scores


class _Encoding:
    """The search space as a unit cube of floats plus one-hot categoricals."""

    def __init__(self, space: dict[str, BaseDistribution]) -> None:
        self.floats = [k for k, d in space.items() if isinstance(d, FloatDistribution | IntDistribution)]
        self.cats = [k for k, d in space.items() if isinstance(d, CategoricalDistribution)]
        self.space = space

    def unit(self, name: str, value: Any) -> float:
        d = self.space[name]
        lo, hi, v = float(d.low), float(d.high), float(value)
        if d.log:
            lo, hi, v = math.log(lo), math.log(hi), math.log(v)
        return 0.0 if hi == lo else (v - lo) / (hi - lo)

    def value(self, name: str, u: float) -> Any:
        d = self.space[name]
        lo, hi = float(d.low), float(d.high)
        u = min(max(float(u), 0.0), 1.0)
        x = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if d.log else lo + u * (hi - lo)
        if d.step is not None:
            x = lo + round((x - lo) / d.step) * d.step
        x = min(max(x, lo), hi)
        return int(round(x)) if isinstance(d, IntDistribution) else float(x)

    def encode(self, params: dict[str, Any]) -> tuple[np.ndarray, tuple[int, ...]]:
        u = np.array([self.unit(k, params[k]) for k in self.floats])
        c = tuple(self.space[k].to_internal_repr(params[k]) for k in self.cats)  # type: ignore[attr-defined]
        return u, tuple(int(i) for i in c)

    def decode(self, u: np.ndarray, c: Sequence[int]) -> dict[str, Any]:
        out = {k: self.value(k, x) for k, x in zip(self.floats, u, strict=True)}
        out.update({k: self.space[k].to_external_repr(i) for k, i in zip(self.cats, c, strict=True)})  # type: ignore[attr-defined]
        return out


def features(u: np.ndarray, cats: np.ndarray, n_choices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Quadratic features of rows of unit-cube points (n, d) and categorical indices (n, k), and the
    prior variance of each feature's coefficient relative to the others: interactions and the
    categorical-by-linear terms are shrunk harder, since there are many more of them."""
    n, d = u.shape
    z = u - 0.5
    cols = [np.ones((n, 1)), z, z**2 - 1.0 / 12.0]
    prior = [np.full(1, 1.0), np.full(d, 1.0), np.full(d, 1.0)]
    if d > 1:
        i, j = np.triu_indices(d, 1)
        cols.append(z[:, i] * z[:, j])
        prior.append(np.full(len(i), 1.0 / d))
    for k, m in enumerate(n_choices):
        onehot = np.eye(m)[cats[:, k]]
        cols.append(onehot)
        prior.append(np.full(m, 1.0))
        cols.append((onehot[:, :, None] * z[:, None, :]).reshape(n, -1))
        prior.append(np.full(m * d, 0.5))
    return np.hstack(cols), np.concatenate(prior)


class BayesianQuadratic:
    """Bayesian linear regression on quadratic features; noise and prior scale by marginal likelihood.
    Worked in the n x n form (n observations, far fewer than the features), with posterior draws by
    Matheron's rule, so a proposal costs milliseconds at hundreds of trials."""

    def __init__(self, phi: np.ndarray, y: np.ndarray, prior: np.ndarray) -> None:
        best = None
        base = (phi * prior) @ phi.T
        for noise in _NOISE:
            for scale in _SCALE:
                try:
                    chol = np.linalg.cholesky(scale * base + noise * np.eye(len(y)))
                except np.linalg.LinAlgError:
                    continue
                a = np.linalg.solve(chol, y)
                evidence = -0.5 * a @ a - np.log(np.diag(chol)).sum()
                if best is None or evidence > best[0]:
                    best = (evidence, noise, scale * prior, chol)
        assert best is not None
        _, self.noise, self.lam, self._chol = best
        self.phi, self.y = phi, y
        self.mean = self._posterior(y)

    def _posterior(self, residual_target: np.ndarray) -> np.ndarray:
        """Lambda Phi^T K^-1 r: the posterior mean for observations r."""
        a = np.linalg.solve(self._chol.T, np.linalg.solve(self._chol, residual_target))
        return self.lam * (self.phi.T @ a)

    def predict(self, phi: np.ndarray) -> np.ndarray:
        return phi @ self.mean

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """Coefficients of one function from the posterior (Matheron's rule: a prior draw, corrected by
        the posterior mean of its residuals)."""
        prior = np.sqrt(self.lam) * rng.standard_normal(len(self.lam))
        noise = np.sqrt(self.noise) * rng.standard_normal(len(self.y))
        return prior + self._posterior(self.y - self.phi @ prior - noise)


class SurrogateSampler(BaseSampler):
    """Thompson sampling from a Bayesian quadratic of the (single) objective, in a trust region, with
    running trials fantasized at the posterior mean. Start-up trials are random, and they cycle through
    every categorical choice so that no method goes unseen."""

    def __init__(self, *, seed: int = 0, n_startup_trials: int = 10, n_candidates: int = 2048,
                 success_tolerance: float = 1e-3, failures_to_shrink: int = 3) -> None:
        self._seed = seed
        self._n_startup = n_startup_trials
        self._n_candidates = n_candidates
        self._tol = success_tolerance
        self._failures_to_shrink = failures_to_shrink

    def reseed_rng(self) -> None:
        pass  # every draw is seeded from the trial's number

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if len(study.directions) > 1:
            raise ValueError("the surrogate sampler models one objective (the combined score)")
        return optuna.search_space.intersection_search_space(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def _rng(self, trial: FrozenTrial) -> np.random.Generator:
        return np.random.default_rng([self._seed, trial.number])

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if all(k in t.params for k in search_space) and math.isfinite(float(t.value))]  # type: ignore[arg-type]
        if not search_space or len(done) < self._n_startup:
            return {}
        enc = _Encoding(search_space)
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
        done.sort(key=lambda t: t.number)
        x = [enc.encode(t.params) for t in done]
        y = np.array([sign * float(t.value) for t in done])  # type: ignore[arg-type]
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.number != trial.number and all(k in t.params for k in search_space)]
        pend = [enc.encode(t.params) for t in running]
        n_choices = [len(search_space[k].choices) for k in enc.cats]  # type: ignore[attr-defined]

        def phi_of(rows: Sequence[tuple[np.ndarray, tuple[int, ...]]]) -> tuple[np.ndarray, np.ndarray]:
            u = np.array([r[0] for r in rows]).reshape(len(rows), len(enc.floats))
            c = np.array([r[1] for r in rows], dtype=int).reshape(len(rows), len(enc.cats))
            return features(u, c, n_choices)

        mu, sd = y.mean(), y.std()
        if sd <= 1e-12 * max(1.0, abs(mu)):  # all alike: nothing to model but rounding
            sd = 1.0
        ys = (y - mu) / sd
        phi, prior = phi_of(x)
        model = BayesianQuadratic(phi, ys, prior)
        if pend:  # the kriging believer: running trials score what the model expects of them
            phi_p, _ = phi_of(pend)
            model = BayesianQuadratic(np.vstack([phi, phi_p]), np.concatenate([ys, model.predict(phi_p)]), prior)
        rng = self._rng(trial)
        theta = model.draw(rng)
        best = int(np.argmax(y))
        side = self._side(y)
        center, best_cat = x[best]
        cands_u = center + side * (rng.random((self._n_candidates, len(enc.floats))) - 0.5)
        # half the candidates move only a few coordinates, as TuRBO's perturbation masks do in many dimensions
        few = rng.random(cands_u.shape) < min(1.0, 5.0 / max(1, len(enc.floats)))
        half = self._n_candidates // 2
        cands_u[half:] = np.where(few[half:], cands_u[half:], center)
        cands_u = np.clip(cands_u, 0.0, 1.0)
        cats = np.array([best_cat] * len(cands_u), dtype=int).reshape(len(cands_u), len(enc.cats))
        if enc.cats:  # a quarter of them try another choice of each categorical
            other = rng.random(len(cands_u)) < 0.25
            for k, m in enumerate(n_choices):
                cats[other, k] = rng.integers(0, m, int(other.sum()))
        phi_c, _ = features(cands_u, cats, n_choices)
        pick = int(np.argmax(phi_c @ theta))
        return enc.decode(cands_u[pick], cats[pick])

    def _side(self, y: np.ndarray) -> float:
        """The trust region's side, replayed from the history: start at 0.4 after start-up, double after
        an improvement on the best (up to 0.8), halve after `failures_to_shrink` trials in a row without
        one (down to 1/64, then start over at 0.4)."""
        side, fails = 0.4, 0
        best = float(np.max(y[: self._n_startup]))
        for v in y[self._n_startup:]:
            if v > best + self._tol * max(1.0, abs(best)):
                best, fails, side = float(v), 0, min(0.8, side * 2)
            else:
                fails += 1
                if fails >= self._failures_to_shrink:
                    fails, side = 0, side / 2
                    if side < 1 / 64:
                        side = 0.4
        return side

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        """Start-up draws, a function of (seed, trial number, parameter): categoricals cycle through
        their choices by trial number, so every method is seen early whatever the baselines used."""
        if isinstance(param_distribution, CategoricalDistribution):
            return param_distribution.choices[trial.number % len(param_distribution.choices)]
        key = int.from_bytes(hashlib.blake2b(param_name.encode(), digest_size=8).digest(), "little")
        u = np.random.default_rng([self._seed, trial.number, key]).random()
        return _Encoding({param_name: param_distribution}).value(param_name, u)
