"""Files of a run folder, regenerated from the study's storage: trials.csv, pareto.csv, pareto.png,
hypervolume.png, summary.json and report.html (`report_html.py`). Written when a study ends and by
`mergeopt pareto` and `export`, never per trial."""

from __future__ import annotations

import csv
import json
import platform
import time
from pathlib import Path
from typing import Any

import optuna

from .objectives import combined_score, dominates, front_trials, hypervolume, objective_values
from .report_html import write_report_html
from .space import Space

S = optuna.trial.TrialState


TIMING_KEYS = ("worker", "pid", "node", "merge_s", "eval_s", "forward_s", "overhead_s", "wall_s")


def trial_timing(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A trial's worker and timings: one `timing` attribute (one storage write per trial, not six), or
    the separate attributes of studies recorded before it."""
    return t.user_attrs.get("timing") or {k: t.user_attrs[k] for k in TIMING_KEYS if k in t.user_attrs}


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name, "baseline": t.user_attrs.get("baseline", ""),
                               "seed": t.user_attrs.get("seed", "")}
        row.update({f"param:{k}": v for k, v in t.params.items()})
        row.update({f"metric:{k}": v for k, v in t.user_attrs.get("metrics", {}).items()})
        timing = trial_timing(t)
        row.update({k: timing.get(k, "") for k in TIMING_KEYS})
        row["reason"] = t.user_attrs.get("reason", "")
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def reference_models(space: Space) -> dict[str, dict[str, float]]:
    """Models to place beside the front: on the embedded zoo, the data-mix baseline's validation card."""
    if not space.evaluation.zoo:
        return {}
    from .refs import zoo_reference_cards

    cards = zoo_reference_cards(space.evaluation.zoo)
    return {name: {**card, "combined": combined_score(space, card)} for name, card in cards.items()}


def write_reports(space: Space, study: optuna.Study, run_dir: Path, *, elapsed_s: float | None = None) -> dict[str, Any]:
    rows = trial_rows(study)
    _write_csv(run_dir / "trials.csv", rows)
    members = front_trials(space, study)
    _write_csv(run_dir / "pareto.csv", [r for r in rows if r["number"] in {t.number for t in members}])
    done = study.get_trials(deepcopy=False, states=(S.COMPLETE,))
    vals = [objective_values(space, t.user_attrs["metrics"]) for t in done]
    refs = reference_models(space)
    best = max(done, key=lambda t: (t.user_attrs["metrics"]["combined"], -t.number)) if done else None
    baselines = {t.user_attrs["baseline"]: t.user_attrs["metrics"] for t in done if t.user_attrs.get("baseline")}
    singles = [m["combined"] for k, m in baselines.items() if k.endswith(" alone")]
    best_single = max(singles, default=None)
    timings = [trial_timing(t) for t in done]
    summary: dict[str, Any] = {
        "name": space.name, "sampler": space.search.sampler, "seed": space.search.seed,
        "trials": {s.name.lower(): sum(1 for t in study.get_trials(deepcopy=False) if t.state == s)
                   for s in (S.COMPLETE, S.PRUNED, S.FAIL, S.RUNNING)},
        "objectives": [o.model_dump() for o in space.objectives], "combined": space.combined,
        "front": [{"trial": t.number, "params": t.params, "metrics": t.user_attrs["metrics"],
                   "baseline": t.user_attrs.get("baseline")} for t in members],
        "hypervolume": hypervolume(space, vals),
        "best": None if best is None else {"trial": best.number, "params": best.params, "metrics": best.user_attrs["metrics"],
                                           "seed": best.user_attrs.get("seed")},
        "baselines": baselines, "best_single_expert_combined": best_single,
        "single_experts_scored": len(singles), "single_experts": len(space.models),
        # a claim about every single expert needs every single expert scored
        "merge_beats_every_single_expert": (best is not None and best_single is not None and len(singles) == len(space.models)
                                            and best.user_attrs["metrics"]["combined"] > best_single),
        "timing": {"elapsed_s": elapsed_s,
                   "merge_s_mean": _mean([t.get("merge_s") for t in timings]),
                   "eval_s_mean": _mean([t.get("eval_s") for t in timings]),
                   "overhead_s_mean": _mean([t.get("overhead_s") for t in timings])},
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for name, card in refs.items():
        point = objective_values(space, card)
        dominated_by = [t.number for t in members if dominates(space, objective_values(space, t.user_attrs["metrics"]), point)]
        dominating = [t.number for t in members if dominates(space, point, objective_values(space, t.user_attrs["metrics"]))]
        summary.setdefault("references", {})[name] = {
            "metrics": card, "dominated_by_front": bool(dominated_by), "dominates_front_members": dominating,
            "beats_best_combined": best is not None and card["combined"] > best.user_attrs["metrics"]["combined"]}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    _plot_front(space, study, members, refs, run_dir / "pareto.png")
    _plot_hypervolume(space, study, run_dir / "hypervolume.png")
    write_report_html(space, study, run_dir, members=members, refs=refs)
    return summary


def _mean(xs: list[Any]) -> float | None:
    xs = [float(x) for x in xs if isinstance(x, int | float)]
    return sum(xs) / len(xs) if xs else None


def _plot_front(space: Space, study: optuna.Study, members, refs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(space.objectives) < 2:
        return
    ox, oy = space.objectives[1], space.objectives[0]  # x: harm-like, y: helpfulness-like
    done = study.get_trials(deepcopy=False, states=(S.COMPLETE,))
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    ax.scatter([t.user_attrs["metrics"][ox.metric] for t in done], [t.user_attrs["metrics"][oy.metric] for t in done],
               s=18, c="#9aa7b8", label="trials")
    fm = sorted(members, key=lambda t: t.user_attrs["metrics"][ox.metric])
    ax.plot([t.user_attrs["metrics"][ox.metric] for t in fm], [t.user_attrs["metrics"][oy.metric] for t in fm],
            "o-", c="#c0392b", ms=6, label="Pareto front")
    for t in done:
        if t.user_attrs.get("baseline"):
            m = t.user_attrs["metrics"]
            ax.scatter([m[ox.metric]], [m[oy.metric]], marker="s", s=36, facecolors="none", edgecolors="#2c3e50")
            ax.annotate(t.user_attrs["baseline"], (m[ox.metric], m[oy.metric]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
    for name, card in refs.items():
        ax.scatter([card[ox.metric]], [card[oy.metric]], marker="*", s=120, c="#27ae60", label=name.replace("_", "-"))
    ax.set_xlabel(f"{ox.metric} ({'lower' if ox.direction == 'minimize' else 'higher'} is better)")
    ax.set_ylabel(f"{oy.metric} ({'higher' if oy.direction == 'maximize' else 'lower'} is better)")
    ax.set_title(f"{space.name}: {len(done)} trials, sampler {space.search.sampler}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_hypervolume(space: Space, study: optuna.Study, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = sorted(study.get_trials(deepcopy=False, states=(S.COMPLETE,)), key=lambda t: t.number)
    xs, hv, pts = [], [], []
    for t in done:
        pts.append(objective_values(space, t.user_attrs["metrics"]))
        xs.append(t.number + 1)
        hv.append(hypervolume(space, pts))
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    ax.plot(xs, hv, "-", c="#2c3e50")
    ax.set_xlabel("trial")
    ax.set_ylabel("hypervolume")
    ax.set_title(f"{space.name}: hypervolume by trial")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
