"""Linear merge (model soup, arXiv 2203.05482): a weighted average of full weights."""

from __future__ import annotations

import torch

from . import fused
from .registry import REQUIRED, MethodSpec, TensorContext, register


def linear(base: torch.Tensor, taus: list[torch.Tensor], models: list[dict], params: dict, ctx: TensorContext) -> torch.Tensor:
    """sum_i w_i * theta_i, divided by sum_i w_i when `normalize`; theta_i = base + tau_i. Float32 inside.

    Computed as base * sum_i w_i + sum_i w_i tau_i, so each task vector is read once and no full
    expert weights are materialised (normalize folds the division into the weights); the pass is the
    task-arithmetic kernel's (`fused.py`) with a factor on the base."""
    weights = [float(m["weight"]) for m in models]
    total = sum(weights)
    norm = total if params["normalize"] else 1.0
    out = ctx.destination(base)
    if not taus:
        out.copy_(base)
        return out
    args = fused.Args.build([w / norm for w in weights], weights, [0.0] * len(weights), 1.0, base.device,
                            base_coef=total / norm)
    return fused.run(fused.Plan(mask="none", consensus=False, normalize=False), out, base, list(taus), args)


register(MethodSpec("linear", linear, model_params={"weight": REQUIRED}, global_params={"normalize": True},
                    doc="weighted average of full weights", mergekit_name="linear",
                    paper="Model soups (arXiv 2203.05482)"))
