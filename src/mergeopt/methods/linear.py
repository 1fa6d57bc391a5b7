"""Linear merge (model soup, arXiv 2203.05482): a weighted average of full weights."""

from __future__ import annotations

import torch

from .fused import CHUNK
from .registry import REQUIRED, MethodSpec, TensorContext, register


def linear(base: torch.Tensor, taus: list[torch.Tensor], models: list[dict], params: dict, ctx: TensorContext) -> torch.Tensor:
    """sum_i w_i * theta_i, divided by sum_i w_i when `normalize`; theta_i = base + tau_i. Float32 inside.

    Computed as base * sum_i w_i + sum_i w_i tau_i, so each task vector is read once and no full
    expert weights are materialised (normalize folds the division into the weights)."""
    weights = [float(m["weight"]) for m in models]
    total = sum(weights)
    norm = total if params["normalize"] else 1.0
    out = ctx.destination(base)
    b, o, n = base.reshape(-1), out.view(-1), base.numel()
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        acc = b[s:e].float() * (total / norm)
        for tau, w in zip(taus, weights, strict=True):
            acc.add_(tau.reshape(-1)[s:e].float(), alpha=w / norm)
        o[s:e] = acc
    return out


register(MethodSpec("linear", linear, model_params={"weight": REQUIRED}, global_params={"normalize": True},
                    doc="weighted average of full weights", mergekit_name="linear"))
