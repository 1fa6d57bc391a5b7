"""The seed papers' comparison on the embedded zoo, scored on its held-out test split.

One row each, in the manner of Table 1 and Figure 5 of *Mix Data or Merge Models?* (Aakanksha et al.
2024): the base; each expert alone; the data-mix model (one model fine-tuned on all the experts' data);
objective-based merging (task arithmetic of the helpful experts and the safety expert, the best of the
papers' grid {0, 0.3, 0.5, 0.7, 1} per objective weight); language-based merging (TIES over the language
experts and the safety expert); DARE at drop rates 0.5 and 0.9; and mergeopt's Pareto-best after a
40-trial search. Every choice among candidates (grid cell, density, search winner) is made on the
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
    completed,
    machine,
    machine_line,
    ray_pool,
    recipe_params,
    run_recipes,
    with_search,
    write_json,
)

from mergeopt.space import Space, load_space  # noqa: E402

GRID = (0.0, 0.3, 0.5, 0.7, 1.0)


def best_on_validation(space: Space, candidates: list[dict], run_dir: Path, pool):
    study = run_recipes(space, candidates, run_dir, pool)
    done = completed(study)
    best = max(done, key=lambda t: (t.user_attrs["metrics"]["combined"], -t.number))
    return best, len(candidates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="search_spaces/safety_multilingual.yaml")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default="runs/bench/paper_table.json")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from mergeopt.objectives import combined_score
    from mergeopt.pick import pick
    from mergeopt.refs import resolve_model_path
    from mergeopt.search import run_study
    from mergeopt.worker import TrialWorker

    torch.set_num_threads(1)
    t_all = time.perf_counter()
    space = load_space(args.space)
    m = machine()
    print(f"machine: {machine_line(m)}")
    helpful = [x.key for x in space.models if x.objective != "safety"]
    safety = [x.key for x in space.models if x.objective == "safety"]
    keys = [x.key for x in space.models]
    test = TrialWorker(space.model_dump(mode="json", by_alias=True), split="test", worker_id=-1)
    rows = []

    def add(name: str, metrics: dict, evals: int | None, val: float | None, recipe: str) -> None:
        metrics = dict(metrics)
        metrics["combined"] = combined_score(space, metrics)
        rows.append({"row": name, "evaluations": evals, "validation_combined": val, "recipe": recipe,
                     "metrics": {k: v for k, v in metrics.items() if not k.startswith("time/")}})
        print(f"  {name:44s} help {metrics['helpfulness']:.3f} harm {metrics['harm']:.3f} "
              f"over-refusal {metrics.get('over_refusal', 0):.3f} combined {metrics['combined']:+.3f}")

    # Given models: the base, each expert, the data-mix model, loaded into the test worker's model.
    data_mix = "zoo:data_mix" if space.evaluation.zoo == "default" else f"zoo-{space.evaluation.zoo}:data_mix"
    for name, ref in [("base", space.base_model)] + [(f"expert {x.key} alone", x.path) for x in space.models] + \
            [("data mix (all experts' data, one fine-tune)", data_mix)]:
        src = AutoModelForCausalLM.from_pretrained(resolve_model_path(ref), dtype=torch.float32)
        test.model.load_state_dict(src.state_dict())
        add(name, test.evaluator.evaluate(), None, None, ref)

    def add_trial(name: str, trial, evals: int, recipe: str) -> None:
        res = test.run(trial.params, int(trial.user_attrs["seed"]))
        add(name, res.metrics, evals, trial.user_attrs["metrics"]["combined"], recipe)

    pool = ray_pool(space, args.workers)
    try:
        with tempfile.TemporaryDirectory() as d:
            grid = [recipe_params(space, "task_arithmetic", {**dict.fromkeys(helpful, h), **dict.fromkeys(safety, s)})
                    for h in GRID for s in GRID]
            best, n = best_on_validation(space, grid, Path(d) / "objective", pool)
            w = {k: best.params[f"weight/{k}"] for k in keys}
            add_trial("objective merge (task arithmetic, grid)", best, n,
                      f"helpful {w[helpful[0]]:g}, safety {w[safety[0]]:g}")
            if "ties" in space.methods:
                cands = [recipe_params(space, "ties", dict.fromkeys(keys, 1.0), dens) for dens in (0.3, 0.5, 0.7)]
                best, n = best_on_validation(space, cands, Path(d) / "language", pool)
                add_trial("language merge (TIES, language + safety experts)", best, n,
                          f"weights 1, density {best.params[f'density/{keys[0]}']:g}")
            if "dare_linear" in space.methods:
                for p in (0.5, 0.9):
                    best, n = best_on_validation(space, [recipe_params(space, "dare_linear", dict.fromkeys(keys, 1.0), 1 - p)],
                                                 Path(d) / f"dare{p}", pool)
                    add_trial(f"DARE p = {p} (task arithmetic, all experts)", best, n, f"weights 1, drop {p}")
            s = with_search(space, n_trials=args.trials)
            study = run_study(s, Path(d) / "search", n_trials=args.trials, workers=pool.size, pool=pool)
            best = pick(s, study)
            add_trial(f"mergeopt ({s.search.sampler}, {args.trials} trials, Pareto-best)", best, args.trials,
                      f"trial {best.number}: {best.params.get('method', s.methods[0])}")
    finally:
        pool.close()
    write_json(args.json, {"machine": m, "space": args.space, "split": "test", "rows": rows,
                           "combined": space.combined, "seconds": time.perf_counter() - t_all})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
