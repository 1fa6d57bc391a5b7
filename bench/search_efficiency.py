"""Search efficiency on the embedded study, in two parts.

`--part picks` (the product's claim): does a search's pick beat the papers' hand grid on the held-out
test split? Each sampler searches the embedded study (`flat`: a weight per expert, a density per expert,
objective coefficients) and its layer-wise form (`layer`: weight and density per expert and layer
group, 4 groups on the 4-layer default zoo: 34 numbers and the method), 5 seeds each, for the largest budget. Its pick
after the first 40, 100 and 200 trials (best combined score on the Pareto front of those trials,
chosen on validation) is scored on test, against the best cell of the papers' 25-cell grid (chosen on
validation, scored on test) and the data-mix model. No sampler's settings depend on the budget at these
sizes (start-up trials: the baselines + 10), so a run's first 40 trials are a 40-trial run.

`--part oracle` adds every grid cell's test score to that JSON: the best the grid holds on test.

`--part hypervolume`: hypervolume against trials spent, per sampler.

A reference front comes from a dense grid of recipes: for every method of the space and a few
densities, a shared weight per objective group (the helpful language experts, the safety expert) on
7 levels across the weight range. Each sampler then runs the study from scratch, 5 seeds each, on the
same warm workers, and we count the trials it needs to reach 95% of the grid's hypervolume (helpfulness
up, harm down, reference point (0, 1)). `cmaes` optimises the combined score, as mergekit-evolve and
Sakana's evolutionary merging do; its hypervolume is read from the same two objectives.

    python bench/search_efficiency.py [--part picks|hypervolume|all] [--seeds 5]
        [--budgets 40,100,200] [--spaces flat,layer] [--samplers surrogate,cmaes,tpe,gp,random]
        [--budget 60 --hv-samplers cmaes,tpe,nsga2,gp,random]   (hypervolume part)
"""

from __future__ import annotations

import argparse
import json
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
    objective_grid,
    prefix_pick,
    ray_pool,
    recipe_params,
    run_recipes,
    score_model,
    test_worker,
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


def hypervolume_part(args: argparse.Namespace) -> None:
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
            for sampler in args.hv_samplers.split(","):
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


def layer_wise(space: Space, groups: int) -> Space:
    data = space.model_dump(mode="json", by_alias=True)
    data["ranges"].update({"layer_groups": groups, "layer_wise": ["weight", "density"]})
    return Space.model_validate(data)


def picks_part(args: argparse.Namespace) -> None:
    import torch

    from mergeopt.search import run_study
    from mergeopt.zoo.modeling import SIZES

    base = load_space(args.space)
    groups = SIZES[base.evaluation.zoo or "default"].layers
    spaces = {"flat": base, "layer": layer_wise(base, groups)}
    budgets = [int(b) for b in args.budgets.split(",")]
    caps = {k: int(v) for k, v in (c.split("=") for c in args.caps.split(",") if c)}
    m = machine()
    print(f"machine: {machine_line(m)}; {args.workers} workers; budgets {budgets}; {args.seeds} seeds")
    t_all = time.perf_counter()
    torch.set_num_threads(1)
    test = test_worker(base)
    data_mix = score_model(test, "zoo:data_mix" if base.evaluation.zoo == "default" else f"zoo-{base.evaluation.zoo}:data_mix")
    memo: dict[tuple, dict] = {}

    def on_test(space: Space, trial) -> dict:
        key = (json.dumps(space.recipe(trial.params, 0).model_dump(mode="json"), sort_keys=True), trial.user_attrs["seed"])
        if key not in memo:
            test.space = space  # same models and evaluation; only the parameters' names differ
            memo[key] = test.run(trial.params, int(trial.user_attrs["seed"])).metrics
        return memo[key]

    runs, grid = [], {}
    wanted = args.spaces.split(",")
    with tempfile.TemporaryDirectory() as d:
        # A pool's workers read parameters by their space's names: one pool per space, the grid on the flat one.
        for sname in ["flat"] + [x for x in wanted if x != "flat"]:
            space = spaces[sname]
            pool = ray_pool(space, args.workers)
            try:
                if sname == "flat":
                    gstudy = run_recipes(base, objective_grid(base), Path(d) / "grid", pool)
                    gbest = max(completed(gstudy), key=lambda t: (t.user_attrs["metrics"]["combined"], -t.number))
                    gtest = on_test(base, gbest)
                    grid = {"validation_combined": gbest.user_attrs["metrics"]["combined"], "test": gtest,
                            "params": gbest.params, "evaluations": len(objective_grid(base))}
                    print(f"grid (25 cells): validation {grid['validation_combined']:+.3f}, test "
                          f"{gtest['combined']:+.3f}; data mix test {data_mix['combined']:+.3f}")
                    if "flat" not in wanted:
                        continue
                bs = budgets if sname == "layer" else [int(b) for b in args.flat_budgets.split(",")]
                for sampler in args.samplers.split(","):
                    for seed in range(args.seeds):
                        n = min(max(bs), caps.get(sampler, max(bs)))
                        s = with_search(space, sampler=sampler, seed=seed, n_trials=n)
                        t = time.perf_counter()
                        study = run_study(s, Path(d) / f"{sname}-{sampler}-{seed}", n_trials=n, workers=pool.size,
                                          pool=pool)
                        secs = time.perf_counter() - t
                        row = {"space": sname, "sampler": sampler, "seed": seed, "seconds": secs, "picks": {}}
                        for b in (b for b in bs if b <= n):
                            best = prefix_pick(s, study, b)
                            met = on_test(s, best)
                            row["picks"][str(b)] = {"trial": best.number, "method": best.params.get("method"),
                                                    "validation_combined": best.user_attrs["metrics"]["combined"],
                                                    "test": met}
                        runs.append(row)
                        print(f"  {sname:5s} {sampler:9s} seed {seed}: " + "; ".join(
                            f"{b}: val {p['validation_combined']:+.3f} test {p['test']['combined']:+.3f}"
                            for b, p in row["picks"].items()) + f" ({secs:.0f} s)", flush=True)
            finally:
                pool.close()
    g, mix = grid["test"]["combined"], data_mix["combined"]
    summary = []
    for sname in wanted:
        for sampler in args.samplers.split(","):
            rs = [r for r in runs if r["space"] == sname and r["sampler"] == sampler]
            for b in sorted({int(k) for r in rs for k in r["picks"]}):
                vals = [r["picks"][str(b)]["test"]["combined"] for r in rs]
                mean = float(np.mean(vals))
                summary.append({"space": sname, "sampler": sampler, "budget": b, "mean_test_combined": mean,
                                "per_seed": vals, "margin_over_grid": mean - g,
                                "gap_closed": (mean - g) / (mix - g) if mix != g else None,
                                "mean_validation_combined": float(np.mean(
                                    [r["picks"][str(b)]["validation_combined"] for r in rs])),
                                "mean_seconds": float(np.mean([r["seconds"] for r in rs]))})
    print(f"\ntest combined of the pick, mean over {args.seeds} seeds (grid {g:+.3f}, data mix {mix:+.3f}):")
    for s in summary:
        print(f"  {s['space']:5s} {s['sampler']:9s} {s['budget']:4d} trials: {s['mean_test_combined']:+.3f} "
              f"({s['margin_over_grid']:+.3f} over the grid; {s['gap_closed']:.0%} of the gap to the data mix)")
    at40 = [s for s in summary if s["budget"] == min(budgets)]
    best40 = max(at40, key=lambda s: s["mean_test_combined"])
    print(f"best within {min(budgets)} evaluations: {best40['space']} {best40['sampler']} "
          f"{best40['margin_over_grid']:+.3f} over the grid (target +0.05): "
          f"{'met' if best40['margin_over_grid'] >= 0.05 else 'NOT met'}")
    write_json(args.picks_json, {"command": "bench/search_efficiency.py --part picks", "machine": m, "space": args.space, "layer_groups": groups, "budgets": budgets,
                                 "seeds": args.seeds, "grid": grid, "data_mix": data_mix, "summary": summary,
                                 "runs": runs, "seconds": time.perf_counter() - t_all})
    print(f"wrote {args.picks_json}")


def oracle_part(args: argparse.Namespace) -> None:
    """Every cell of the papers' grid scored on test, added to the picks JSON: the best a choice among
    those cells could do if it could see the test split, so the headroom a search has over the grid's
    validation pick."""
    base = load_space(args.space)
    test = test_worker(base)
    cells = []
    for params in objective_grid(base):
        met = test.run(params, 0).metrics  # task arithmetic draws nothing at random
        cells.append({"params": params, "test_combined": met["combined"]})
        print(f"  {params}: test {met['combined']:+.3f}")
    best = max(cells, key=lambda c: c["test_combined"])
    data = json.loads(Path(args.picks_json).read_text())
    data["grid"]["test_oracle"] = best
    data["grid"]["test_cells"] = cells
    write_json(args.picks_json, data)
    print(f"best grid cell on test: {best['test_combined']:+.3f}; wrote {args.picks_json}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("picks", "oracle", "hypervolume", "all"), default="all")
    ap.add_argument("--space", default="search_spaces/safety_multilingual.yaml")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--budgets", default="40,100,200", help="picks: trials after which each run's pick is scored")
    ap.add_argument("--spaces", default="flat,layer", help="picks: flat, layer (layer-wise weight and density)")
    ap.add_argument("--flat-budgets", default="40,100", help="picks: the budgets of the flat space")
    ap.add_argument("--caps", default="gp=100", help="picks: sampler=N runs that sampler for at most N trials "
                    "(the GP's cost per trial grows with the trials)")
    ap.add_argument("--samplers", default="surrogate,cmaes,tpe,gp,random", help="picks: samplers compared")
    ap.add_argument("--picks-json", default="runs/bench/search_picks.json")
    ap.add_argument("--budget", type=int, default=60, help="hypervolume: trials per sampler run")
    ap.add_argument("--hv-samplers", default="cmaes,surrogate,tpe,nsga2,gp,random")
    ap.add_argument("--levels", type=int, default=7, help="hypervolume: grid points per objective group")
    ap.add_argument("--json", default="runs/bench/search_efficiency.json")
    args = ap.parse_args()
    if args.part in ("picks", "all"):
        picks_part(args)
    if args.part in ("oracle", "all"):
        oracle_part(args)
    if args.part in ("hypervolume", "all"):
        hypervolume_part(args)


if __name__ == "__main__":
    sys.exit(main())
