"""Sparsifiers of the task-arithmetic family: which entries of one task vector survive, and how the
survivors are rescaled. `density` is the keep share (DARE's drop rate p is 1 - density)."""

from __future__ import annotations

import torch

from . import rng

RESCALE_MODES = ("inverse", "l1", "none")


def _rescale(x: torch.Tensor, kept: torch.Tensor, keep_prob: torch.Tensor | float, mode: str) -> torch.Tensor:
    """`inverse`: survivors / keep probability (the DARE and DELLA papers, unbiased in expectation);
    `l1`: match the L1 norm of the whole tensor (mergekit's rule); `none`: no rescale."""
    if mode == "inverse":
        return kept / keep_prob
    if mode == "l1":
        before, after = x.abs().sum(), kept.abs().sum()
        if before < 1e-7 or after < 1e-7:
            return kept
        return kept * (before / after)
    return kept


def magnitude(x: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the entries whose magnitude is at least the k-th largest, k = max(1, floor(density
    * N)). Entries tied with the k-th largest are all kept: the rule is a threshold, the same on every
    device and in a fused kernel (mergekit keeps an arbitrary k of the tied ones)."""
    if density >= 1:
        return x
    n = x.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(x)
    k = max(1, int(density * n))
    mags = x.reshape(-1).abs().float()
    thr = torch.topk(mags, k, sorted=False).values.min()
    return x * (mags >= thr).view(x.shape)


def magnitude_outliers(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the `gamma` share of largest magnitudes and the smallest ones, keeping
    floor(density * N) entries in between."""
    if density >= 1:
        return x
    n = x.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bot = max(0, n - keep - top)
    flat = x.reshape(-1)
    order = torch.argsort(flat.abs().float(), stable=True)
    out = torch.zeros_like(flat)
    sel = order[bot: bot + keep]
    out[sel] = flat[sel]
    return out.reshape(x.shape)


def bernoulli(x: torch.Tensor, density: float, key: tuple[int, int], rescale: str) -> torch.Tensor:
    """DARE: drop each entry with probability p = 1 - density, rescale the survivors. Entry i is kept
    when its counter-based random bits (`rng`) fall below density * 2**24."""
    if density >= 1:
        return x
    if density <= 0:
        return torch.zeros_like(x)
    keep = (rng.block_bits(key, 0, x.numel(), x.device) < rng.keep_threshold(density)).view(x.shape)
    return _rescale(x, x * keep, density, rescale)


def della_magprune(x: torch.Tensor, density: float, epsilon: float, key: tuple[int, int], rescale: str) -> torch.Tensor:
    """DELLA: keep probabilities ranked by magnitude within each row, from density - epsilon (smallest)
    to density + epsilon (largest); survivors rescaled."""
    if density >= 1:
        return x
    if density <= 0:
        return torch.zeros_like(x)
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"della needs 0 < density - epsilon and density + epsilon < 1 (density {density}, epsilon {epsilon})")
    rows = x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)
    n = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows.abs().float(), dim=1, stable=True), dim=1).float()
    rn = (ranks / max(1, n - 1)).clamp(0, 1)
    p_keep = (density - epsilon) + 2 * epsilon * rn
    keep = rng.uniform(key, rows.numel(), x.device).view(rows.shape) < p_keep.to(x.device)
    kept = rows * keep
    out = _rescale(rows, kept, p_keep.to(x.dtype).to(x.device), rescale) if rescale == "inverse" else _rescale(rows, kept, 1.0, rescale)
    return out.reshape(x.shape)
