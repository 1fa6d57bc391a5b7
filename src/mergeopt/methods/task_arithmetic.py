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

import torch

from . import sparsify
from .registry import REQUIRED, MethodSpec, TensorContext, register


def _sparsify(kind: str, tau: torch.Tensor, m: dict, params: dict, ctx: TensorContext, i: int) -> torch.Tensor:
    if kind == "none":
        return tau
    if kind == "magnitude":
        return sparsify.magnitude(tau, m["density"])
    if kind == "outliers":
        return sparsify.magnitude_outliers(tau, m["density"], m["gamma"])
    if kind == "bernoulli":
        return sparsify.bernoulli(tau, m["density"], ctx.generator(i), params["rescale"])
    if kind == "della":
        return sparsify.della_magprune(tau, m["density"], m["epsilon"], ctx.generator(i), params["rescale"])
    raise ValueError(kind)


def generalized_task_arithmetic(base: torch.Tensor, taus: list[torch.Tensor], models: list[dict], params: dict,
                                ctx: TensorContext, *, sparsifier: str, consensus: bool) -> torch.Tensor:
    weights = [float(m["weight"]) for m in models]
    lam = float(params["lambda"])
    if not taus:
        return base.clone()
    if not consensus:
        # Accumulate in place: one pass over each task vector, no stacked copies.
        total = sum(weights)
        scale = lam / (total if abs(total) >= 1e-8 else 1.0) if params["normalize"] else lam
        out = base.clone()
        for i, (tau, m, w) in enumerate(zip(taus, models, weights, strict=True)):
            out.add_(_sparsify(sparsifier, tau, m, params, ctx, i), alpha=w * scale)
        return out
    stacked = torch.stack([_sparsify(sparsifier, tau, m, params, ctx, i) * w
                           for i, (tau, m, w) in enumerate(zip(taus, models, weights, strict=True))])
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = torch.sign(stacked) == elected
    mixed = (stacked * agree).sum(0)
    if params["normalize"]:
        w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * base.dim()))
        divisor = (agree * w).sum(0)
        mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    if lam != 1.0:
        mixed = mixed * lam
    return (base + mixed).to(base.dtype)


def _declare(name: str, sparsifier: str, consensus: bool, normalize: bool, doc: str, extra: dict | None = None,
             rescale: str = "none") -> None:
    model_params = {"weight": REQUIRED, "density": 1.0, **(extra or {})}
    global_params = {"lambda": 1.0, "normalize": normalize, "rescale": rescale}
    register(MethodSpec(name, partial(generalized_task_arithmetic, sparsifier=sparsifier, consensus=consensus),
                        model_params=model_params, global_params=global_params,
                        random=sparsifier in ("bernoulli", "della"), doc=doc, mergekit_name=name))


_declare("task_arithmetic", "none", False, False, "base + lambda * sum_i w_i tau_i")
_declare("ties", "magnitude", True, True, "trim to top-density magnitudes, elect signs, average agreeing values")
_declare("dare_linear", "bernoulli", False, False, "drop with p = 1 - density, rescale, task arithmetic",
         rescale="inverse")
_declare("dare_ties", "bernoulli", True, False, "drop with p = 1 - density, rescale, TIES sign election",
         rescale="inverse")
_declare("breadcrumbs", "outliers", False, False, "drop largest (gamma) and smallest magnitudes", {"gamma": 0.01})
_declare("breadcrumbs_ties", "outliers", True, False, "breadcrumbs with TIES sign election", {"gamma": 0.01})
_declare("della", "della", True, True, "magnitude-ranked drop probabilities, rescaled, TIES sign election",
         {"epsilon": 0.15}, rescale="inverse")
_declare("della_linear", "della", False, False, "magnitude-ranked drop probabilities, rescaled",
         {"epsilon": 0.15}, rescale="inverse")
