"""Linear merge (model soup, arXiv 2203.05482): a weighted average of full weights."""

from __future__ import annotations

import torch

from .registry import REQUIRED, MethodSpec, TensorContext, register


def linear(base: torch.Tensor, taus: list[torch.Tensor], models: list[dict], params: dict, ctx: TensorContext) -> torch.Tensor:
    """sum_i w_i * theta_i, divided by sum_i w_i when `normalize`; theta_i = base + tau_i. Float32 inside."""
    acc = torch.zeros_like(base, dtype=torch.float32)
    total = 0.0
    for tau, m in zip(taus, models, strict=True):
        w = float(m["weight"])
        acc.add_(base.float() + tau.float(), alpha=w)
        total += w
    if params["normalize"]:
        acc /= total
    return acc.to(base.dtype)


register(MethodSpec("linear", linear, model_params={"weight": REQUIRED}, global_params={"normalize": True},
                    doc="weighted average of full weights", mergekit_name="linear"))
