"""The task-arithmetic family as one fused pass over memory.

`merge_pass` computes, for every entry, trim or random drop, weighting, TIES sign election, disjoint
mean and the final add to the base. Written eagerly, that is about a dozen tensor passes per expert;
`torch.compile` turns the same function into one loop (C++ on CPU, Triton on GPU) that reads each input
once, which is what brings TIES and DARE near the memory-bandwidth bound.

Both paths run the same function, in float32, with the same order of operations; inductor builds
without floating-point contraction or reassociation, so they give the same bits. A compiled kernel is
checked against the eager one on first use and dropped, with a warning, if any bit differs, so the
weights a search evaluates and the ones `mergeopt merge` writes never depend on whether a compiler was
present. `MERGEOPT_COMPILE` = `auto` (default: compile tensors of at least `MERGEOPT_COMPILE_MIN`
entries, 2**18, when a compiler works), `1` (every tensor) or `0` (never).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass

import torch

from . import rng

log = logging.getLogger(__name__)

CHUNK = 1 << 16  # eager block on a CPU: a block of every task vector and the temporaries stay in cache
# Eager block elsewhere (a GPU): large, since each block costs a dozen kernel launches (64K-entry blocks
# made an H100 merge at 14 GB/s, bench/merge_speed.py --device cuda), yet bounded, since a block's
# temporaries (a few per expert) share the GPU with the resident model.
DEVICE_CHUNK = 1 << 24


@dataclass(frozen=True)
class Plan:
    """What the kernel computes; everything here is fixed at compile time."""

    mask: str  # none | threshold (keep |x| >= thr) | random (keep hash bits < keep threshold)
    consensus: bool  # TIES sign election and disjoint sum
    normalize: bool  # consensus only: divide by the summed weights that agreed


@dataclass
class Args:
    """Per-expert values of one tensor merge, as tensors on the merge's device.

    coef: the factor on each kept entry (weight x rescale, and x lambda / sum of weights without
    consensus); weight: the weight that counts in the TIES divisor; thr: magnitude threshold (float32);
    keep: random keep threshold (int32, out of 2**24); key: mask keys (int32, [experts, 2]; the first
    word is the tensor's, the same for every expert); lam: lambda; base_coef: the factor on the base
    without consensus (1, or the summed weights for a linear merge)."""

    coef: torch.Tensor
    weight: torch.Tensor
    thr: torch.Tensor
    keep: torch.Tensor
    key: torch.Tensor
    lam: torch.Tensor
    base_coef: torch.Tensor

    @classmethod
    def build(cls, coef: list[float], weight: list[float], thr: list[float], lam: float, device: torch.device,
              keep: list[int] | None = None, key: list[tuple[int, int]] | None = None, base_coef: float = 1.0) -> Args:
        """Two small host-to-device copies per tensor merge, not six (this runs once per tensor and
        candidate); the random-mask fields only when the plan draws masks."""
        k = len(coef)
        floats = torch.tensor([*coef, *weight, *thr, lam, base_coef], dtype=torch.float32, device=device)
        if key is None:  # no random mask: placeholders the kernel never reads
            ints = _placeholder(k, device)
        else:
            ints = torch.tensor([*(keep or [rng.ONE] * k), *(v for pair in key for v in pair)], dtype=torch.int32,
                                device=device)
        return cls(coef=floats[:k], weight=floats[k:2 * k], thr=floats[2 * k:3 * k], keep=ints[:k],
                   key=ints[k:].view(k, 2), lam=floats[3 * k], base_coef=floats[3 * k + 1])


_placeholders: dict[tuple, torch.Tensor] = {}


def _placeholder(k: int, device: torch.device) -> torch.Tensor:
    t = _placeholders.get((k, str(device)))
    if t is None:
        t = _placeholders[(k, str(device))] = torch.zeros(3 * k, dtype=torch.int32, device=device)
    return t


def merge_pass(plan: Plan, base: torch.Tensor, taus: list[torch.Tensor], a: Args, start: torch.Tensor | int) -> torch.Tensor:
    """Merged float32 values of one block; `start` is the block's first flat index (a 0-d int32 tensor
    when compiled, so that it is not baked into the kernel).

    Written with float arithmetic where eager torch would otherwise run slow boolean kernels: with the
    elected sign e = +-1, an agreeing delta d has d * e > 0, so relu(d * e) is |d| for agreeing deltas
    and 0 otherwise, e * sum relu(d * e) is exactly the sum of the agreeing deltas (negation is exact),
    and sign(relu(d * e)) is the 0/1 indicator that picks the weights of the TIES divisor."""
    deltas = []
    shared = None
    for i, tau in enumerate(taus):
        x = tau.float()
        if plan.mask == "threshold":
            x = x * (x.abs() >= a.thr[i])
        elif plan.mask == "random":
            if shared is None:  # the first hash round: the key's first word is the tensor's, shared by the models
                shared = rng.stream(torch.arange(x.numel(), dtype=torch.int32, device=x.device) + start, a.key[0, 0])
            x = x * (rng.bits_from(shared, a.key[i, 1]) < a.keep[i])
        deltas.append(x * a.coef[i])
    if not plan.consensus:
        acc = base.float() * a.base_coef + deltas[0]
        for d in deltas[1:]:
            acc += d
        return acc
    total = deltas[0]
    for d in deltas[1:]:
        total = total + d
    elected = torch.where(total >= 0, 1.0, -1.0)
    mixed = torch.zeros_like(total)
    div = torch.zeros_like(total)
    for i, d in enumerate(deltas):
        agreeing = torch.clamp_min(d * elected, 0.0)
        mixed = mixed + agreeing
        if plan.normalize:
            div = div + torch.sign(agreeing) * a.weight[i]
    mixed = mixed * elected
    if plan.normalize:
        mixed = mixed / torch.where(div == 0, 1.0, div)
    return base.float() + mixed * a.lam


def _compiled_body(plan: Plan):
    def body(out: torch.Tensor, base: torch.Tensor, taus: list[torch.Tensor], a: Args, start: torch.Tensor) -> None:
        out.copy_(merge_pass(plan, base, taus, a, start))
    return body


_lock = threading.Lock()
_kernels: dict[tuple, object] = {}  # (plan, experts, dtype, device type) -> compiled fn, or None when refused
_broken: list[str] = []  # the first compile failure: no further attempts in this process
calls: Counter = Counter()  # tensors merged by each path in this process ("compiled", "eager")


def _mode() -> str:
    return os.environ.get("MERGEOPT_COMPILE", "auto").strip().lower() or "auto"


def _min_size() -> int:
    return int(float(os.environ.get("MERGEOPT_COMPILE_MIN", 2**18)))


def wants_compile(numel: int) -> bool:
    mode = _mode()
    if mode in ("0", "off", "false", "no") or _broken:
        return False
    if mode in ("1", "on", "true", "yes"):
        return True
    return numel >= _min_size()


def _self_check(plan: Plan, fn, experts: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Compare the compiled kernel with the eager function, bit for bit, on random data of an odd size
    (vector tails) with ties, zeros and mixed signs. Returns what differs, or None."""
    g = torch.Generator().manual_seed(1234)
    n = 3 * 4099
    base = torch.randn(n, generator=g).to(dtype).to(device)
    taus = []
    for _ in range(experts):
        t = (torch.randn(n, generator=g) * 0.01)
        t[::7] = 0.0
        t[1::11] = 0.005
        taus.append(t.to(dtype).to(device))
    a = Args(coef=torch.linspace(-0.5, 1.3, experts), weight=torch.linspace(-0.4, 1.1, experts),
             thr=torch.full((experts,), 0.005), keep=torch.full((experts,), rng.keep_threshold(0.4), dtype=torch.int32),
             key=torch.arange(2 * experts, dtype=torch.int32).view(experts, 2) * 7919 - 40000, lam=torch.tensor(0.9),
             base_coef=torch.tensor(1.1))
    a = Args(*(v.to(device) for v in (a.coef, a.weight, a.thr, a.keep, a.key, a.lam, a.base_coef)))
    start = torch.tensor(12345, dtype=torch.int32, device=device)
    want = merge_pass(plan, base, taus, a, start).to(dtype)
    got = torch.empty_like(base)
    fn(got, base, taus, a, start)
    if not torch.equal(got, want):
        return f"{int((got != want).sum())} of {n} entries differ, max |diff| {float((got.float() - want.float()).abs().max()):.1e}"
    return None


def kernel(plan: Plan, experts: int, dtype: torch.dtype, device: torch.device):
    """The compiled kernel for this plan, or None (use the eager function)."""
    k = (plan, experts, dtype, device.type)
    with _lock:
        if k in _kernels:
            return _kernels[k]
        fn = None
        if not _broken:
            try:
                fn = torch.compile(_compiled_body(plan), dynamic=True, fullgraph=True)
                bad = _self_check(plan, fn, experts, dtype, device)
                if bad:
                    log.warning("compiled %s merge differs from the eager one (%s); merging eagerly", plan, bad)
                    fn = None
            except Exception as e:  # no C++ compiler / Triton, or an inductor limitation
                _broken.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                log.warning("torch.compile unavailable (%s); merging eagerly", _broken[0])
                fn = None
        _kernels[k] = fn
        return fn


def run(plan: Plan, out: torch.Tensor, base: torch.Tensor, taus: list[torch.Tensor], a: Args) -> torch.Tensor:
    """Merge into `out` (same shape as base): compiled in one call when wanted and available, else
    eagerly in blocks (cache-sized on a CPU). Entries are independent, so the block size never changes
    a result."""
    n = base.numel()
    flat_out, flat_base, flat_taus = out.view(-1), base.reshape(-1), [t.reshape(-1) for t in taus]
    if plan.mask == "random" and n > 2**31 - 1:
        raise ValueError(f"random masks index tensors of up to 2**31 - 1 entries, not {n}")
    fn = kernel(plan, len(taus), base.dtype, base.device) if wants_compile(n) else None
    if fn is not None:
        fn(flat_out, flat_base, flat_taus, a, torch.zeros((), dtype=torch.int32, device=base.device))
        calls["compiled"] += 1
        return out
    calls["eager"] += 1
    block = CHUNK if base.device.type == "cpu" else DEVICE_CHUNK
    for s in range(0, n, block):
        e = min(n, s + block)
        flat_out[s:e] = merge_pass(plan, flat_base[s:e], [t[s:e] for t in flat_taus], a, s)
    return out
