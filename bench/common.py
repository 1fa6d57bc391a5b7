"""Shared by the benchmarks: the machine line, warm worker pools, studies of enqueued recipes, and the
hypervolume curve of a study."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import optuna

from mergeopt.objectives import hypervolume, objective_values
from mergeopt.space import Space


def machine() -> dict[str, Any]:
    import psutil
    import torch

    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(), "threads_per_worker": 1}


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, "
            f"{'CUDA' if m['cuda'] else 'no GPU'}, torch {m['torch']}, one torch thread per worker")


def write_json(path: str | Path, data: Any) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    return out


def with_search(space: Space, **search: Any) -> Space:
    """A copy of the space with other search settings, validated again."""
    data = space.model_dump(mode="json", by_alias=True)
    data["search"].update(search)
    return Space.model_validate(data)


def ray_pool(space: Space, workers: int):
    """Warm Ray workers for many studies on the same models and evaluation."""
    import torch

    from mergeopt.loop.ray_pool import RayPool

    torch.set_num_threads(1)
    return RayPool(space, workers, None)


def recipe_params(space: Space, method: str, weights: dict[str, float], density: float = 1.0) -> dict[str, Any]:
    """A trial's parameters for one hand-picked recipe: these weights per model, one density for all,
    and every coefficient (lambda, language, objective) at 1, each clipped to its range."""
    out: dict[str, Any] = {}
    for name, d in space.distributions().items():
        if name == "method":
            out[name] = method
        elif name.startswith("weight/"):
            out[name] = weights[name.split("/")[1]]
        elif name.startswith("density/"):
            out[name] = min(max(density, d.low), d.high)
        else:
            out[name] = min(max(1.0, d.low), d.high)
    return out


def run_recipes(space: Space, params: list[dict[str, Any]], run_dir: Path, pool) -> optuna.Study:
    """Evaluate exactly these parameter sets (validation split), one trial each, on the pool."""
    from mergeopt.loop.store import open_study
    from mergeopt.search import run_study

    fixed = with_search(space, sampler="random", baselines=False, n_trials=len(params))
    study = open_study(fixed, run_dir)
    for p in params:
        study.enqueue_trial(p, skip_if_exists=False)
    return run_study(fixed, run_dir, n_trials=len(params), workers=pool.size, pool=pool)


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]


def hv_curve(space: Space, study: optuna.Study, n: int) -> list[float]:
    """Hypervolume (objectives of the space, fixed reference point) of the first k trials, k = 1..n.
    Failed and pruned trials count as trials spent."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)[:n]
    curve, pts, hv = [], [], 0.0
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            pts.append(objective_values(space, t.user_attrs["metrics"]))
            hv = hypervolume(space, pts)
        curve.append(hv)
    return curve + [hv] * (n - len(curve))


PAPER_GRID = (0.0, 0.3, 0.5, 0.7, 1.0)  # the papers' hand grid per objective weight


def objective_grid(space: Space) -> list[dict[str, Any]]:
    """The papers' 25-cell grid: task arithmetic, one weight for the helpful experts and one for the
    safety expert, each in PAPER_GRID (every layer group alike)."""
    helpful = [x.key for x in space.models if x.objective != "safety"]
    safety = [x.key for x in space.models if x.objective == "safety"]
    return [recipe_params(space, "task_arithmetic", {**dict.fromkeys(helpful, h), **dict.fromkeys(safety, s)})
            for h in PAPER_GRID for s in PAPER_GRID]


def prefix_pick(space: Space, study: optuna.Study, n: int) -> optuna.trial.FrozenTrial | None:
    """The study's pick (best combined score on the Pareto front) had it stopped after n trials."""
    from mergeopt.objectives import pareto_mask

    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if t.number < n]
    if not done:
        return None
    mask = pareto_mask(space, [objective_values(space, t.user_attrs["metrics"]) for t in done])
    return min((t for t, m in zip(done, mask, strict=True) if m),
               key=lambda t: (-t.user_attrs["metrics"]["combined"], t.number))


def test_worker(space: Space):
    """A worker in this process that scores parameters on the held-out test split."""
    import torch

    from mergeopt.worker import TrialWorker

    torch.set_num_threads(1)
    return TrialWorker(space.model_dump(mode="json", by_alias=True), split="test", worker_id=-1)


def score_model(worker, ref: str) -> dict[str, float]:
    """A saved model's metrics on the worker's split (loaded into its resident model)."""
    import torch
    from transformers import AutoModelForCausalLM

    from mergeopt.objectives import combined_score
    from mergeopt.refs import resolve_model_path

    src = AutoModelForCausalLM.from_pretrained(resolve_model_path(ref), dtype=torch.float32)
    worker.model.load_state_dict(src.state_dict())
    metrics = dict(worker.evaluator.evaluate())
    metrics["combined"] = combined_score(worker.space, metrics)
    return metrics
