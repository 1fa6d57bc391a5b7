"""An experiment for the TIES speed target, not code mergeopt runs: the project's eager blockwise TIES
(trim, sign election, disjoint mean; `methods/task_arithmetic.py`) against the same arithmetic fused
into one loop by `torch.compile`, on random task vectors, one thread. Prints ns per element for each
and checks that they agree. Needs a C++ compiler for the compiled side; without one it says so.

    python bench/ties_fused.py [--blocks 40] [--experts 4] [--json runs/bench/ties_fused.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, write_json  # noqa: E402

from mergeopt.methods import TensorContext, get_method  # noqa: E402
from mergeopt.methods.task_arithmetic import CHUNK  # noqa: E402


def fused(xs: torch.Tensor, thr: torch.Tensor, w: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """TIES on a [experts, n] block, written to be fused: trim by threshold, elect by summed mass,
    average the agreeing values by their weights."""
    d = torch.where(xs.abs() >= thr, xs, torch.zeros((), dtype=xs.dtype)) * w
    pos_mass, neg_mass = d.clamp(min=0).sum(0), d.clamp(max=0).sum(0)
    pos_w, neg_w = ((d > 0) * w).sum(0), ((d < 0) * w).sum(0)
    elected = (pos_mass + neg_mass) >= 0
    mixed = torch.where(elected, pos_mass, neg_mass)
    div = torch.where(elected, pos_w, neg_w)
    return base + mixed / torch.where(div == 0, torch.ones_like(div), div)


def timed(fn, repeats: int = 3) -> tuple[float, torch.Tensor]:
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=40, help="tensor size in the merge's 256K-element blocks")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--json", default="runs/bench/ties_fused.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n = CHUNK * args.blocks
    base = torch.randn(n, generator=g)
    taus = [torch.randn(n, generator=g) * 0.01 for _ in range(args.experts)]
    weights = [0.7 + 0.2 * i for i in range(args.experts)]
    spec = get_method("ties")
    models = [spec.resolve_model({"weight": w, "density": 0.5}) for w in weights]
    params = spec.resolve_globals({})
    memo: dict = {}
    ctx = TensorContext("bench.weight", 0, memo=memo)
    eager_s, want = timed(lambda: spec.fn(base, taus, models, params, ctx))  # the memo holds the sorted magnitudes
    print(f"machine: {machine_line(machine())}; {n / 1e6:.1f}M elements, {args.experts} experts")
    print(f"eager blockwise TIES (mergeopt): {eager_s * 1e9 / n:.1f} ns per element")
    row = {"elements": n, "experts": args.experts, "eager_ns": eager_s * 1e9 / n}
    thr = torch.tensor([memo[("bench.weight", "abs_sorted", i)][n - int(0.5 * n)] for i in range(args.experts)]).view(-1, 1)
    w = torch.tensor(weights).view(-1, 1)
    stacked = torch.stack(taus)
    try:
        t = time.perf_counter()
        kernel = torch.compile(fused, dynamic=False)
        kernel(stacked[:, :CHUNK], thr, w, base[:CHUNK])
        row["compile_s"] = time.perf_counter() - t

        def run() -> torch.Tensor:
            out = torch.empty_like(base)
            for s in range(0, n, CHUNK):
                out[s:s + CHUNK] = kernel(stacked[:, s:s + CHUNK], thr, w, base[s:s + CHUNK])
            return out

        fused_s, got = timed(run)
    except Exception as e:  # no compiler, or an inductor limitation on this machine
        print(f"torch.compile unavailable here ({type(e).__name__}: {str(e)[:200]})")
        write_json(args.json, row)
        return
    diff = float((got - want).abs().max())
    row.update(fused_ns=fused_s * 1e9 / n, speedup=eager_s / fused_s, max_abs_diff=diff)
    print(f"fused with torch.compile: {row['fused_ns']:.1f} ns per element ({row['speedup']:.1f}x faster; "
          f"compile {row['compile_s']:.0f} s); max |diff| against eager {diff:.1e}")
    print(f"wrote {write_json(args.json, row)}")


if __name__ == "__main__":
    sys.exit(main())
