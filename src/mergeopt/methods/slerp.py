"""SLERP: spherical interpolation between the base and one other model."""

from __future__ import annotations

import math

import torch

from .registry import REQUIRED, MethodSpec, TensorContext, register

PARALLEL = 0.9995  # |cos| above this: interpolate linearly, the arc is numerically flat


def slerp(base: torch.Tensor, taus: list[torch.Tensor], models: list[dict], params: dict, ctx: TensorContext) -> torch.Tensor:
    t = float(params["t"])
    v0 = base.reshape(-1).float()
    v1 = (base.float() + taus[0].float()).reshape(-1)
    n0, n1 = float(v0.norm()), float(v1.norm())
    n0, n1 = (n0 if n0 > 1e-8 else 1.0), (n1 if n1 > 1e-8 else 1.0)
    dot = max(-1.0, min(1.0, float(torch.dot(v0 / n0, v1 / n1))))
    if abs(dot) > PARALLEL or v0.numel() == 0:
        out = (1 - t) * v0 + t * v1
    else:
        theta = math.acos(dot)
        s = math.sin(theta)
        out = (math.sin((1 - t) * theta) / s) * v0 + (math.sin(t * theta) / s) * v1
    return out.reshape(base.shape).to(base.dtype)


register(MethodSpec("slerp", slerp, model_params={}, global_params={"t": REQUIRED}, exact_models=1,
                    doc="spherical interpolation between the base (t=0) and one expert (t=1)", mergekit_name="slerp",
                    paper="SLERP (Shoemake, 1985), as used for model merging by mergekit"))
