"""The task-arithmetic family: task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs(_ties),
della(_linear). One algorithm, declared once, varied by sparsifier and sign consensus:

    delta_i = sparsify(tau_i) * w_i
    mixed   = sum_i delta_i                       (no consensus), or
              sum_i [sign(delta_i) == elected] * delta_i   (TIES sign election by summed mass, 0 counts as +)
    mixed  /= sum of the weights that contributed (when normalize)
    theta   = base + lambda * mixed
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import numpy as np
import torch

from . import fused, rng, sparsify
from .registry import REQUIRED, MethodSpec, TensorContext, register


def _sparsify(kind: str, tau: torch.Tensor, m: dict, params: dict, ctx: TensorContext, i: int) -> torch.Tensor:
    """Whole-tensor sparsification, for the rules that need the whole tensor (breadcrumbs' ranks, DELLA's
    rows, the L1 rescale)."""
    if kind == "outliers":
        return sparsify.magnitude_outliers(tau, m["density"], m["gamma"])
    if kind == "bernoulli":
        return sparsify.bernoulli(tau, m["density"], ctx.mask_key(i), params["rescale"])
    if kind == "della":
        return sparsify.della_magprune(tau, m["density"], m["epsilon"], ctx.mask_key(i), params["rescale"])
    raise ValueError(kind)


SKETCH_POINTS = 1024  # S: the sketch keeps S + 1 order statistics of |tau| (fewer for tensors of <= S entries)


class _Sketch(NamedTuple):
    """Order statistics of a task vector's |tau| (float32) at the S + 1 evenly spaced ascending ranks
    r_j = j * (n - 1) // S (r_0 = 0, r_S = n - 1), each with the number of entries below it and at or
    below it (so ties are exact). Any rank lies between two neighbouring points: O(S) memory, not O(n)."""

    values: np.ndarray  # float32, ascending
    below: np.ndarray  # count of |tau| < values[j]
    upto: np.ndarray  # count of |tau| <= values[j]


def _magnitudes(tau: torch.Tensor) -> torch.Tensor:
    return tau.reshape(-1).abs().float()  # exact for float32, bfloat16 and float16 task vectors


def _ranks(n: int, s: int) -> np.ndarray:
    return np.arange(s + 1, dtype=np.int64) * (n - 1) // max(s, 1)


def _sketch(tau: torch.Tensor) -> _Sketch:
    """One sort of one tensor (transient); what is kept is O(S)."""
    mags = _magnitudes(tau)
    n = mags.numel()
    ranks = _ranks(n, min(SKETCH_POINTS, n - 1))
    count = np.int32 if n < 2**31 else np.int64
    if mags.device.type == "cpu":  # numpy's vectorised sort is several times faster than torch.sort on the CPU
        srt = np.sort(mags.numpy())
        values = srt[ranks]
        below, upto = np.searchsorted(srt, values, "left"), np.searchsorted(srt, values, "right")
    else:
        srt = torch.sort(mags).values
        v = srt[torch.from_numpy(ranks).to(srt.device)]
        values = v.cpu().numpy()
        below = torch.searchsorted(srt, v).cpu().numpy()
        upto = torch.searchsorted(srt, v, right=True).cpu().numpy()
    return _Sketch(values.astype(np.float32), below.astype(count), upto.astype(count))


def _select(tau: torch.Tensor, sketch: _Sketch, t: int) -> float:
    """The t-th smallest |tau| (0-based), exactly: the sketch brackets it between two neighbouring
    points, and one pass selects among the entries strictly between them (about n / S of them)."""
    values, below, upto = sketch
    j = int(np.searchsorted(_ranks(tau.numel(), len(values) - 1), t, "right")) - 1  # r_j <= t < r_{j+1}
    if t < upto[j]:  # below[j] <= r_j <= t < upto[j]: tied with point j
        return float(values[j])
    if t >= below[j + 1]:  # below[j+1] <= t < r_{j+1} (j < S here, as upto[S] = n)
        return float(values[j + 1])
    lo, hi, idx = values[j], values[j + 1], t - int(upto[j])  # strictly between: ranks upto[j] .. below[j+1]-1
    mags = _magnitudes(tau)
    if mags.device.type == "cpu":
        m = mags.numpy()
        inside = m[(m > lo) & (m < hi)]
        return float(np.partition(inside, idx)[idx])
    inside = mags[(mags > float(lo)) & (mags < float(hi))]
    return float(torch.kthvalue(inside, idx + 1).values)


def _magnitude_threshold(tau: torch.Tensor, density: float, ctx: TensorContext, i: int) -> float:
    """The TIES trim as a threshold: keep |tau| >= the k-th largest magnitude, k = max(1, floor(density
    * N)) (`sparsify.magnitude`). A single merge selects it directly (numpy's introselect: linear time).
    A search worker does not keep a sorted copy of every task vector (4 bytes per parameter and expert,
    hundreds of GB for large models): it memoises a small quantile sketch per tensor and expert, and
    each candidate selects exactly among the few entries the sketch leaves between two of its points."""
    n = tau.numel()
    if density >= 1:
        return 0.0
    if density <= 0 or n == 0:
        return float("inf")
    k = max(1, int(density * n))
    if ctx.memo is None:  # one merge (`mergeopt merge`): a selection, not a sort
        mags = _magnitudes(tau)
        if mags.device.type == "cpu":
            return float(np.partition(mags.numpy(), n - k)[n - k])
        return float(torch.kthvalue(mags, n - k + 1).values)
    return _select(tau, ctx.remember(("abs_sketch", i), lambda: _sketch(tau)), n - k)


def generalized_task_arithmetic(base: torch.Tensor, taus: list[torch.Tensor], models: list[dict], params: dict,
                                ctx: TensorContext, *, sparsifier: str, consensus: bool) -> torch.Tensor:
    weights = [float(m["weight"]) for m in models]
    lam = float(params["lambda"])
    out = ctx.destination(base)
    if not taus:
        out.copy_(base)
        return out
    k = len(taus)
    inputs, coef, thr, keep = list(taus), [1.0] * k, [0.0] * k, [rng.ONE] * k
    mask = {"none": "none", "magnitude": "threshold", "bernoulli": "random"}.get(sparsifier, "none")
    if sparsifier == "bernoulli" and params["rescale"] == "l1":
        mask = "none"
    for i, (t, m) in enumerate(zip(taus, models, strict=True)):
        density = float(m.get("density", 1.0))
        if mask == "threshold":
            thr[i] = _magnitude_threshold(t, density, ctx, i)
        elif mask == "random":
            keep[i] = rng.keep_threshold(density) if density < 1 else rng.ONE
            if 0 < density < 1 and params["rescale"] == "inverse":
                coef[i] = 1.0 / density
        elif sparsifier != "none":  # whole-tensor rules, merged without a mask
            inputs[i] = _sparsify(sparsifier, t, m, params, ctx, i)
    total = sum(weights)
    scale = 1.0 if consensus else (lam / (total if abs(total) >= 1e-8 else 1.0) if params["normalize"] else lam)
    args = fused.Args.build([c * w * scale for c, w in zip(coef, weights, strict=True)], weights, thr, lam,
                            base.device, keep, [ctx.mask_key(i) for i in range(k)] if mask == "random" else None)
    plan = fused.Plan(mask=mask, consensus=consensus, normalize=bool(params["normalize"]) and consensus)
    return fused.run(plan, out, base, inputs, args)


# methods that select a magnitude threshold per task vector (memory planning): per worker a small sketch per
# tensor and expert plus one float32 |tau| temporary of the largest tensor
RANKED_METHODS: set[str] = set()


def _declare(name: str, sparsifier: str, consensus: bool, normalize: bool, doc: str, paper: str,
             extra: dict | None = None, rescale: str = "none") -> None:
    # density only where a sparsifier reads it: task arithmetic would silently ignore it
    model_params = {"weight": REQUIRED, **({"density": 1.0} if sparsifier != "none" else {}), **(extra or {})}
    if sparsifier == "magnitude":
        RANKED_METHODS.add(name)
    global_params = {"lambda": 1.0, "normalize": normalize, "rescale": rescale}
    register(MethodSpec(name, partial(generalized_task_arithmetic, sparsifier=sparsifier, consensus=consensus),
                        model_params=model_params, global_params=global_params,
                        random=sparsifier in ("bernoulli", "della"), doc=doc, mergekit_name=name, paper=paper))


_declare("task_arithmetic", "none", False, False, "base + lambda * sum_i w_i tau_i",
         "Task arithmetic (arXiv 2212.04089)")
_declare("ties", "magnitude", True, True, "trim to top-density magnitudes, elect signs, average agreeing values",
         "TIES-Merging (arXiv 2306.01708)")
_declare("dare_linear", "bernoulli", False, False, "drop with p = 1 - density, rescale, task arithmetic",
         "DARE (arXiv 2311.03099)", rescale="inverse")
_declare("dare_ties", "bernoulli", True, False, "drop with p = 1 - density, rescale, TIES sign election",
         "DARE with TIES (arXiv 2311.03099)", rescale="inverse")
_declare("breadcrumbs", "outliers", False, False, "drop largest (gamma) and smallest magnitudes",
         "Model Breadcrumbs (arXiv 2312.06795)", {"gamma": 0.01})
_declare("breadcrumbs_ties", "outliers", True, False, "breadcrumbs with TIES sign election",
         "Model Breadcrumbs with TIES (arXiv 2312.06795)", {"gamma": 0.01})
_declare("della", "della", True, True, "magnitude-ranked drop probabilities, rescaled, TIES sign election",
         "DELLA-Merging (arXiv 2406.11617)", {"epsilon": 0.15}, rescale="inverse")
_declare("della_linear", "della", False, False, "magnitude-ranked drop probabilities, rescaled",
         "DELLA-Merging, linear (arXiv 2406.11617)", {"epsilon": 0.15}, rescale="inverse")
