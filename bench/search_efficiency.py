"""Search efficiency: hypervolume against trials spent, per sampler, on the embedded study.

A reference front comes from a dense grid of recipes: for every method of the space and a few
densities, a shared weight per objective group (the helpful language experts, the safety expert) on
7 levels across the weight range. Each sampler then runs the study from scratch, 5 seeds each, on the
same warm workers, and we count the trials it needs to reach 95% of the grid's hypervolume (helpfulness
up, harm down, reference point (0, 1)). `cmaes` optimises the combined score, as mergekit-evolve and
Sakana's evolutionary merging do; its hypervolume is read from the same two objectives.

    python bench/search_efficiency.py [--budget 60] [--seeds 5] [--samplers tpe,nsga2,gp,random,cmaes]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    completed,
    hv_curve,
    machine,
    machine_line,
    ray_pool,
    recipe_params,
    run_recipes,
    with_search,
    write_json,
)

from mergeopt.objectives import hypervolume, objective_values  # noqa: E402
from mergeopt.space import Range, Space, load_space  # noqa: E402

TARGET = 0.95


def reference_grid(space: Space, levels: int = 7) -> list[dict]:
    """Recipes on a grid: per method (and density for the sparsifying ones), one weight per objective
    group on `levels` points spanning the weight range; coefficients at 1."""
    groups: dict[str, list[str]] = {}
    for m in space.models:
        groups.setdefault(m.objective or m.key, []).append(m.key)
    w = space.ranges.weight
    lo, hi = (w.low, w.high) if isinstance(w, Range) else (float(w), float(w))
    values = [float(x) for x in np.linspace(lo, hi, levels)]
    densities = {"task_arithmetic": [1.0], "ties": [0.3, 0.5, 0.7, 1.0], "dare_linear": [0.3, 0.5, 0.7, 0.9]}
    out = []
    for method in space.methods:
        for d in densities.get(method, [1.0]):
            for combo in np.array(np.meshgrid(*[values] * len(groups), indexing="ij")).reshape(len(groups), -1).T:
                weights = {k: float(v) for g, v in zip(groups.values(), combo, strict=True) for k in g}
                out.append(recipe_params(space, method, weights, d))
    return out


def trials_to(curve: list[float], level: float) -> int | None:
    return next((i + 1 for i, v in enumerate(curve) if v >= level), None)


def plot(curves: dict[str, list[list[float]]], ref: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, runs in curves.items():
        a = np.array(runs) / ref
        x = np.arange(1, a.shape[1] + 1)
        ax.plot(x, a.mean(0), label=name)
        ax.fill_between(x, a.min(0), a.max(0), alpha=0.15)
    ax.axhline(TARGET, color="k", lw=0.8, ls="--", label=f"{TARGET:.0%} of the grid's hypervolume")
    ax.set_xlabel("trials")
    ax.set_ylabel("hypervolume / grid reference")
    ax.set_ylim(0, max(1.1, float(max(np.max(np.array(r) / ref) for r in curves.values())) + 0.02))
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("search efficiency on the embedded study (mean and range over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="search_spaces/safety_multilingual.yaml")
    ap.add_argument("--budget", type=int, default=60, help="trials per sampler run")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--samplers", default="cmaes,tpe,nsga2,gp,random")
    ap.add_argument("--levels", type=int, default=7, help="grid points per objective group")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default="runs/bench/search_efficiency.json")
    args = ap.parse_args()
    space = load_space(args.space)
    m = machine()
    print(f"machine: {machine_line(m)}; {args.workers} workers")
    t_all = time.perf_counter()
    pool = ray_pool(space, args.workers)
    try:
        with tempfile.TemporaryDirectory() as d:
            grid = reference_grid(space, args.levels)
            t = time.perf_counter()
            gstudy = run_recipes(space, grid, Path(d) / "grid", pool)
            gdone = completed(gstudy)
            ref_hv = hypervolume(space, [objective_values(space, t.user_attrs["metrics"]) for t in gdone])
            best_grid = max(gdone, key=lambda t: t.user_attrs["metrics"]["combined"])
            print(f"reference grid: {len(grid)} recipes ({len(gdone)} complete) in {time.perf_counter() - t:.0f} s; "
                  f"hypervolume {ref_hv:.4f}; best combined {best_grid.user_attrs['metrics']['combined']:+.3f}")
            curves: dict[str, list[list[float]]] = {}
            rows = []
            default = space.search.sampler
            for sampler in args.samplers.split(","):
                curves[sampler] = []
                for seed in range(args.seeds):
                    from mergeopt.search import run_study

                    s = with_search(space, sampler=sampler, seed=seed, n_trials=args.budget)
                    t = time.perf_counter()
                    study = run_study(s, Path(d) / f"{sampler}-{seed}", n_trials=args.budget, workers=pool.size, pool=pool)
                    secs = time.perf_counter() - t
                    curve = hv_curve(space, study, args.budget)
                    curves[sampler].append(curve)
                    best = max(completed(study), key=lambda t: t.user_attrs["metrics"]["combined"])
                    n95 = trials_to(curve, TARGET * ref_hv)
                    rows.append({"sampler": sampler, "seed": seed, "trials_to_95": n95, "final_hv": curve[-1],
                                 "final_share": curve[-1] / ref_hv, "best_combined": best.user_attrs["metrics"]["combined"],
                                 "seconds": secs, "curve": curve})
                    print(f"  {sampler:7s} seed {seed}: 95% after {n95 if n95 else f'>{args.budget}'} trials; "
                          f"{curve[-1] / ref_hv:.1%} of the grid after {args.budget}; best combined "
                          f"{best.user_attrs['metrics']['combined']:+.3f}; {secs:.0f} s")
    finally:
        pool.close()
    summary = []
    for sampler in curves:
        rs = [r for r in rows if r["sampler"] == sampler]
        reached = [r["trials_to_95"] for r in rs if r["trials_to_95"]]
        # a run that never reached the target counts as budget + 1 (a lower bound on what it would need)
        mean = float(np.mean([r["trials_to_95"] or args.budget + 1 for r in rs]))
        summary.append({"sampler": sampler, "default": sampler == default, "mean_trials_to_95": mean,
                        "censored": len(reached) < len(rs), "reached": f"{len(reached)}/{len(rs)}",
                        "per_seed": [r["trials_to_95"] for r in rs],
                        "mean_final_share": float(np.mean([r["final_share"] for r in rs])),
                        "mean_best_combined": float(np.mean([r["best_combined"] for r in rs])),
                        "mean_seconds": float(np.mean([r["seconds"] for r in rs]))})
    print(f"\ntrials to reach {TARGET:.0%} of the grid's hypervolume ({len(grid)} recipes), mean over {args.seeds} seeds:")
    for s in summary:
        mark = ">=" if s["censored"] else ""
        print(f"  {s['sampler']:7s}{' (default)' if s['default'] else '          '} {mark}{s['mean_trials_to_95']:.1f} "
              f"(per seed {['>' + str(args.budget) if x is None else x for x in s['per_seed']]}); "
              f"{s['mean_final_share']:.1%} of the grid after {args.budget}; best combined {s['mean_best_combined']:+.3f}")
    by = {s["sampler"]: s["mean_trials_to_95"] for s in summary}
    if default in by:
        others = {k: v for k, v in by.items() if k != default}
        ok = by[default] <= 40 and all(by[default] <= by[k] for k in ("random", "cmaes") if k in by)
        print(f"default sampler {default}: {by[default]:.1f} trials (target: <= 40, and no more than random search "
              f"and scalarized CMA-ES): {'met' if ok else 'NOT met'}; the others: "
              f"{', '.join(f'{k} {v:.1f}' for k, v in others.items())}")
    out = Path(args.json)
    plot(curves, ref_hv, out.with_suffix(".png"))
    write_json(out, {"machine": m, "space": args.space, "budget": args.budget, "seeds": args.seeds,
                     "grid_recipes": len(grid), "grid_complete": len(gdone), "reference_hv": ref_hv,
                     "grid_best_combined": best_grid.user_attrs["metrics"]["combined"],
                     "grid_best_params": best_grid.params, "summary": summary, "runs": rows,
                     "seconds": time.perf_counter() - t_all})
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    sys.exit(main())
