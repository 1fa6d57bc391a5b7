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

CHUNK = 1 << 18  # elements per block: a block of every task vector stays in cache across the passes


def _sparsify(kind: str, tau: torch.Tensor, m: dict, params: dict, ctx: TensorContext, i: int) -> torch.Tensor:
    """Whole-tensor sparsification (the reference path, and the one for rules that need the whole tensor)."""
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


class _Blockwise:
    """Per-block view of one sparsified task vector, so that the merge streams through memory once.

    DARE masks are drawn block after block from the same generator, which yields exactly the numbers a
    single whole-tensor draw would. The TIES trim keeps |tau| >= the k-th largest magnitude (exact k
    unless non-zero magnitudes tie at the threshold, where the whole-tensor path is used instead)."""

    def __init__(self, kind: str, tau: torch.Tensor, m: dict, params: dict, ctx: TensorContext, i: int):
        self.flat = tau.reshape(-1)
        self.kind, self.scale, self.keep_prob, self.threshold, self.gen = kind, 1.0, 1.0, None, None
        density = float(m.get("density", 1.0))
        if kind == "bernoulli" and density < 1:
            if density <= 0:
                self.kind = "zero"
            else:
                self.gen, self.keep_prob, self.scale = ctx.generator(i), density, 1.0 / density
        elif kind == "magnitude" and density < 1:
            n = self.flat.numel()
            if density <= 0 or n == 0:
                self.kind = "zero"
            else:
                k = max(1, int(density * n))
                ranked = ctx.remember(("abs_sorted", i), lambda: torch.sort(self.flat.abs().float()).values)
                thr = ranked[n - k]
                if thr > 0 and n - k > 0 and ranked[n - k - 1] == thr:  # ties at the threshold: exact top-k instead
                    self.kind, self.flat = "dense", sparsify.magnitude(tau, density).reshape(-1)
                else:
                    self.threshold = float(thr)
        else:
            self.kind = "dense"

    def block(self, s: int, e: int) -> torch.Tensor | None:
        x = self.flat[s:e]
        if self.kind == "zero":
            return None
        if self.gen is not None:
            keep = torch.rand(e - s, generator=self.gen, dtype=torch.float32).to(x.device) < self.keep_prob
            return x * keep
        if self.threshold is not None:
            return x * (x.abs() >= self.threshold)
        return x


def generalized_task_arithmetic(base: torch.Tensor, taus: list[torch.Tensor], models: list[dict], params: dict,
                                ctx: TensorContext, *, sparsifier: str, consensus: bool) -> torch.Tensor:
    weights = [float(m["weight"]) for m in models]
    lam = float(params["lambda"])
    out = ctx.destination(base)
    if not taus:
        out.copy_(base)
        return out
    blockwise = sparsifier in ("none", "magnitude") or (sparsifier == "bernoulli" and params["rescale"] != "l1")
    if blockwise:
        parts = [_Blockwise(sparsifier, t, m, params, ctx, i) for i, (t, m) in enumerate(zip(taus, models, strict=True))]
    else:  # rules that need the whole tensor (breadcrumbs' ranks, DELLA's rows, L1 rescale)
        dense = [_sparsify(sparsifier, t, m, params, ctx, i) for i, (t, m) in enumerate(zip(taus, models, strict=True))]
        parts = [_Blockwise("none", d, {}, params, ctx, i) for i, d in enumerate(dense)]
    b_flat, o_flat, n = base.reshape(-1), out.view(-1), base.numel()
    total = sum(weights)
    w_t = torch.tensor(weights, dtype=base.dtype, device=base.device).view(-1, 1)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        blocks = [p.block(s, e) for p in parts]
        if not consensus:
            scale = lam / (total if abs(total) >= 1e-8 else 1.0) if params["normalize"] else lam
            acc = b_flat[s:e].clone()
            for blk, p, w in zip(blocks, parts, weights, strict=True):
                if blk is not None:
                    acc.add_(blk, alpha=w * scale * p.scale)
            o_flat[s:e] = acc
            continue
        stacked = torch.stack([blk * (w * p.scale) if blk is not None else torch.zeros_like(b_flat[s:e])
                               for blk, p, w in zip(blocks, parts, weights, strict=True)])
        elected_pos = stacked.sum(0) >= 0
        sign = torch.sign(stacked)
        agree = torch.where(elected_pos, sign == 1, sign == -1)
        mixed = (stacked * agree).sum(0)
        if params["normalize"]:
            divisor = (agree * w_t).sum(0)
            mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        if lam != 1.0:
            mixed = mixed * lam
        o_flat[s:e] = b_flat[s:e] + mixed
    return out


def _declare(name: str, sparsifier: str, consensus: bool, normalize: bool, doc: str, extra: dict | None = None,
             rescale: str = "none") -> None:
    # density only where a sparsifier reads it: task arithmetic would silently ignore it
    model_params = {"weight": REQUIRED, **({"density": 1.0} if sparsifier != "none" else {}), **(extra or {})}
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
