"""The seed papers' comparison on the embedded zoo, scored on its held-out test split.

One row each, in the manner of Table 1 and Figure 5 of *Mix Data or Merge Models?* (Aakanksha et al.
2024): the base; each expert alone; the data-mix model (one model fine-tuned on all the experts' data);
objective-based merging (task arithmetic of the helpful experts and the safety expert, the best of the
papers' grid {0, 0.3, 0.5, 0.7, 1} per objective weight); language-based merging (TIES over the language
experts and the safety expert); the paper's own language-based setting, per-language experts each
trained with 15% safety data (bench/language_experts.py builds them), merged on a grid of weights and
densities; DARE at drop rates 0.5 and 0.9; and mergeopt's Pareto-best after 40-trial searches, per
expert and layer-wise in the objective setting, per expert in the paper's language setting. Every choice among candidates (grid cell, density, search winner) is made on the
validation split; the table reports the test split, and the evaluations each row spent.

    python bench/paper_table.py [--trials 40] [--json runs/bench/paper_table.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PAPER_GRID,
    completed,
    machine,
    machine_line,
    objective_grid,
    ray_pool,
    recipe_params,
    run_recipes,
    score_model,
    test_worker,
    with_search,
    write_json,
)

from mergeopt.space import Space, load_space  # noqa: E402


def best_on_validation(space: Space, candidates: list[dict], run_dir: Path, pool):
    study = run_recipes(space, candidates, run_dir, pool)
    done = completed(study)
    best = max(done, key=lambda t: (t.user_attrs["metrics"]["combined"], -t.number))
    return best, len(candidates)


def language_space(space: Space, experts: dict[str, Path]) -> Space:
    """The paper's language-based merge as a space: the per-language experts trained with 15% safety
    data (bench/language_experts.py), no separate safety expert."""
    data = space.model_dump(mode="json", by_alias=True)
    data["name"] = f"{space.name}_language"
    data["models"] = [{"path": str(p), "name": f"lang_safe_{lg}", "language": lg, "objective": "helpful"}
                      for lg, p in experts.items()]
    data["ranges"]["objective_coefficients"] = None
    return Space.model_validate(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="search_spaces/safety_multilingual.yaml")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--sampler", default=None, help="the searches' sampler; default: the space file's")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default="runs/bench/paper_table.json")
    args = ap.parse_args()
    import torch
    from language_experts import build as build_language_experts
    from search_efficiency import layer_wise

    from mergeopt.objectives import combined_score
    from mergeopt.pick import pick
    from mergeopt.search import run_study
    from mergeopt.zoo.modeling import SIZES

    torch.set_num_threads(1)
    t_all = time.perf_counter()
    space = load_space(args.space)
    if args.sampler:
        space = with_search(space, sampler=args.sampler)
    m = machine()
    print(f"machine: {machine_line(m)}")
    keys = [x.key for x in space.models]
    rows = []

    def add(setting: str, name: str, metrics: dict, evals: int | None, val: float | None, recipe: str) -> None:
        metrics = dict(metrics)
        metrics["combined"] = combined_score(space, metrics)
        rows.append({"setting": setting, "row": name, "evaluations": evals, "validation_combined": val,
                     "recipe": recipe, "metrics": {k: v for k, v in metrics.items() if not k.startswith("time/")}})
        print(f"  {name:44s} help {metrics['helpfulness']:.3f} harm {metrics['harm']:.3f} "
              f"over-refusal {metrics.get('over_refusal', 0):.3f} combined {metrics['combined']:+.3f}")

    def add_trial(test, sp: Space, setting: str, name: str, trial, evals: int, recipe: str) -> None:
        test.space = sp
        res = test.run(trial.params, int(trial.user_attrs["seed"]))
        add(setting, name, res.metrics, evals, trial.user_attrs["metrics"]["combined"], recipe)

    def search(test, sp: Space, setting: str, label: str, run_dir: Path, pool) -> None:
        study = run_study(with_search(sp, n_trials=args.trials), run_dir, n_trials=args.trials, workers=pool.size,
                          pool=pool)
        best = pick(sp, study)
        add_trial(test, sp, setting, f"mergeopt, {label} ({sp.search.sampler}, {args.trials} trials, Pareto-best)",
                  best, args.trials, f"trial {best.number}: {best.params.get('method', sp.methods[0])}")

    # The given models: the base, each expert, the data-mix model, loaded into the test worker's model.
    experts = build_language_experts(space.evaluation.zoo or "default")
    lang = language_space(space, experts)
    test = test_worker(space)
    data_mix = "zoo:data_mix" if space.evaluation.zoo == "default" else f"zoo-{space.evaluation.zoo}:data_mix"
    for name, ref in [("base", space.base_model)] + [(f"expert {x.key} alone", x.path) for x in space.models] + \
            [(f"expert {x.key} alone (15% safety data)", x.path) for x in lang.models] + \
            [("data mix (all experts' data, one fine-tune)", data_mix)]:
        add("models", name, score_model(test, ref), None, None, ref)

    groups = SIZES[space.evaluation.zoo or "default"].layers
    pool = ray_pool(space, args.workers)
    try:
        with tempfile.TemporaryDirectory() as d:
            grid = objective_grid(space)
            best, n = best_on_validation(space, grid, Path(d) / "objective", pool)
            helpful = next(x.key for x in space.models if x.objective != "safety")
            safety = next(x.key for x in space.models if x.objective == "safety")
            add_trial(test, space, "objective", "objective merge (task arithmetic, grid)", best, n,
                      f"helpful {best.params[f'weight/{helpful}']:g}, safety {best.params[f'weight/{safety}']:g}")
            search(test, space, "objective", "per expert", Path(d) / "search", pool)
            if "ties" in space.methods:
                cands = [recipe_params(space, "ties", dict.fromkeys(keys, 1.0), dens) for dens in (0.3, 0.5, 0.7)]
                best, n = best_on_validation(space, cands, Path(d) / "language", pool)
                add_trial(test, space, "language (zoo experts)", "language merge (TIES, language + safety experts)",
                          best, n, f"weights 1, density {best.params[f'density/{keys[0]}']:g}")
            if "dare_linear" in space.methods:
                for p in (0.5, 0.9):
                    best, n = best_on_validation(space, [recipe_params(space, "dare_linear", dict.fromkeys(keys, 1.0), 1 - p)],
                                                 Path(d) / f"dare{p}", pool)
                    add_trial(test, space, "DARE", f"DARE p = {p} (task arithmetic, all experts)", best, n,
                              f"weights 1, drop {p}")
    finally:
        pool.close()
    layer = layer_wise(space, groups)  # a pool's workers read parameters by their space's names
    pool = ray_pool(layer, args.workers)
    try:
        with tempfile.TemporaryDirectory() as d:
            search(test, layer, "objective", f"layer-wise, {groups} groups", Path(d) / "layer", pool)
    finally:
        pool.close()
    # The paper's language-based merge: per-language experts that each carry 15% safety data.
    test = test_worker(lang)
    lkeys = [x.key for x in lang.models]
    pool = ray_pool(lang, args.workers)
    try:
        with tempfile.TemporaryDirectory() as d:
            cands = [recipe_params(lang, "task_arithmetic", dict.fromkeys(lkeys, w)) for w in PAPER_GRID[1:]]
            cands += [recipe_params(lang, "ties", dict.fromkeys(lkeys, w), dens) for w in PAPER_GRID[1:]
                      for dens in (0.3, 0.5, 0.7)]
            best, n = best_on_validation(lang, cands, Path(d) / "grid", pool)
            add_trial(test, lang, "language (15% safety experts)",
                      f"language merge ({best.params['method'].replace('_', ' ')}, grid)", best, n,
                      f"weights {best.params[f'weight/{lkeys[0]}']:g}" + (
                          f", density {best.params[f'density/{lkeys[0]}']:g}" if best.params["method"] == "ties" else ""))
            search(test, lang, "language (15% safety experts)", "per expert", Path(d) / "search", pool)
    finally:
        pool.close()
    write_json(args.json, {"machine": m, "space": args.space, "split": "test", "rows": rows,
                           "combined": space.combined, "seconds": time.perf_counter() - t_all})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
