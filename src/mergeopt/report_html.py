"""report.html: a run's study as one self-contained page, to read a study without its CSVs.

Four panels: the Pareto front (hover a point for its recipe and per-language metrics), the
hypervolume history, parameter importances and parallel coordinates. plotly.js is inlined once
and nothing is fetched from elsewhere, since cluster nodes often have no internet.

The front and the hypervolume are drawn from the space's objectives in each trial's metrics, with
`objectives.py`'s own front and hypervolume (the numbers of pareto.csv and summary.json): Optuna's
`plot_pareto_front` and `plot_hypervolume_history` read the study's values, which for a
single-objective sampler (cmaes) are the combined score alone. Parallel coordinates are Optuna's
figure; importances are Optuna's PED-ANOVA, for the combined score and each objective.

Written by `report.write_reports`: at a study's end, by `mergeopt pareto` and by `export`, not per
trial. On a 40-trial study (2 busy cores): about 0.4 s, plus, the first time in a process, about 3 s
of imports, mostly scikit-learn and SciPy, which `optuna.importance` imports for fANOVA."""

from __future__ import annotations

import html
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from .objectives import front_trials, hypervolume, objective_values
from .space import Space

if TYPE_CHECKING:
    import plotly.graph_objects as go

S = optuna.trial.TrialState
FrozenTrial = optuna.trial.FrozenTrial

FIG_HEIGHT = {"pareto": 560, "hypervolume": 380, "importances": 440, "parallel": 480}
PLOT_CONFIG = {"displaylogo": False, "responsive": True}  # no logo: it links to plotly.com


class Skipped(Exception):
    """A panel that cannot be drawn for this study (too few trials, one objective): said in its place."""


def write_report_html(space: Space, study: optuna.Study, run_dir: Path, *,
                      members: Sequence[FrozenTrial] | None = None,
                      refs: dict[str, dict[str, float]] | None = None) -> Path:
    """Write RUN_DIR/report.html (atomically: a browser open on it never reads half a page)."""
    path = run_dir / "report.html"
    tmp = path.with_name(f".report.html.{os.getpid()}.tmp")  # `pareto` may write while a study ends
    tmp.write_text(build_report_html(space, study, members=members, refs=refs), encoding="utf-8")
    tmp.replace(path)
    return path


def build_report_html(space: Space, study: optuna.Study, *, members: Sequence[FrozenTrial] | None = None,
                      refs: dict[str, dict[str, float]] | None = None) -> str:
    from plotly.offline import get_plotlyjs

    done = sorted(study.get_trials(deepcopy=False, states=(S.COMPLETE,)), key=lambda t: t.number)
    members = front_trials(space, study) if members is None else list(members)
    lean_cache: list[optuna.Study] = []

    def lean() -> optuna.Study:
        """Built on first use, inside a panel: a trial Optuna would not rebuild (a baseline off a range's
        step, say) skips the panels that need it, not the page."""
        if not lean_cache:
            lean_cache.append(_lean_study(study, done))
        return lean_cache[0]

    panels: list[tuple[str, str, str, Callable[[], go.Figure]]] = [
        ("pareto", "Pareto front", "Hover a point for its trial, recipe and per-language metrics.",
         lambda: pareto_figure(space, done, members, refs or {})),
        ("hypervolume", "Hypervolume history",
         "Hypervolume of the objectives' front after each trial, in the box bounded by the worst corner.",
         lambda: hypervolume_figure(space, done)),
        ("importances", "Parameter importances",
         "PED-ANOVA importances: how much each parameter decides reaching the best 10% of trials, per target.",
         lambda: importances_figure(space, lean(), done)),
        ("parallel", "Parallel coordinates", "Each line is a complete trial, coloured by its combined score.",
         lambda: parallel_figure(space, lean(), done)),
    ]
    body = []
    for key, title, note, make in panels:
        try:
            fig = make()
        except Skipped as e:
            body.append(_section(key, title, f'<p class="skipped">Not drawn: {html.escape(str(e))}</p>'))
            continue
        except Exception as e:  # noqa: BLE001 - a panel that fails must not cost the run its other reports
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            body.append(_section(key, title, f'<p class="skipped">Not drawn: {html.escape(first)}</p>'))
            continue
        fig.update_layout(height=FIG_HEIGHT[key], margin={"t": 40, "b": 50}, template="plotly_white")
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"{key}-plot", config=PLOT_CONFIG,
                          default_width="100%", default_height=f"{FIG_HEIGHT[key]}px")
        body.append(_section(key, title, f'<p class="note">{html.escape(note)}</p>\n{div}'))
    return PAGE.format(title=html.escape(f"{space.name}: mergeopt report"), plotlyjs=get_plotlyjs(),
                       header=_header(space, study, done, members), body="\n".join(body))


def _lean_study(study: optuna.Study, done: list[FrozenTrial]) -> optuna.Study:
    """The complete trials in memory with their metrics only: Optuna's importance and parallel-coordinate
    code reads `study.trials` again and again, each a storage query (a server's, with PostgreSQL) and a
    deep copy of every attribute; the page reads the storage once."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not the line "A new study created in memory"
    try:
        lean = optuna.create_study(study_name="report", directions=list(study.directions))
    finally:
        optuna.logging.set_verbosity(level)
    lean.add_trials([optuna.trial.create_trial(
        params=t.params, distributions=t.distributions, values=t.values,
        user_attrs={"metrics": {k: v for k, v in t.user_attrs["metrics"].items() if not k.startswith("time/")}})
        for t in done])
    return lean


def _section(key: str, title: str, inner: str) -> str:
    return f'<section id="{key}">\n<h2>{html.escape(title)}</h2>\n{inner}\n</section>'


def _header(space: Space, study: optuna.Study, done: list[FrozenTrial], members: Sequence[FrozenTrial]) -> str:
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    hv = hypervolume(space, [objective_values(space, t.user_attrs["metrics"]) for t in done])
    best = max(done, key=lambda t: (t.user_attrs["metrics"]["combined"], -t.number)) if done else None
    objectives = ", ".join(f"{o.metric} ({o.direction})" for o in space.objectives)
    facts = [f"sampler {space.search.sampler}, seed {space.search.seed}",
             "trials: " + (", ".join(f"{v} {k}" for k, v in sorted(states.items())) or "none"),
             f"objectives: {objectives}", f"combined: {space.combined}",
             f"front: {len(members)} trial(s), hypervolume {hv:.4f}"]
    if best is not None:
        facts.append(f"best combined: trial {best.number} at {best.user_attrs['metrics']['combined']:+.4f}")
    facts.append(f"written {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    items = "".join(f"<li>{html.escape(f)}</li>" for f in facts)
    return f"<h1>{html.escape(space.name)}</h1>\n<ul class=\"facts\">{items}</ul>"


def _hover(space: Space, t: FrozenTrial) -> str:
    """A trial's hover box: number, method, the recipe's parameters by kind, then its metrics, each
    with its per-language values beside it."""
    method = t.params.get("method", space.methods[0])
    head = f"<b>trial {t.number}</b> · {html.escape(str(method))}"
    if t.user_attrs.get("baseline"):
        head += f" · {html.escape(t.user_attrs['baseline'])}"
    metrics = {k: v for k, v in t.user_attrs.get("metrics", {}).items() if not k.startswith(("time/", "lm_eval/"))}
    return "<br>".join([head, "<i>recipe</i>", *_grouped({k: v for k, v in t.params.items() if k != "method"}),
                        "<i>metrics</i>", *_grouped(metrics)])


def _grouped(values: dict[str, Any]) -> list[str]:
    """One line per key before its "/": `helpfulness = 0.23 · en 0.24 · fr 0.34`, `weight · help_en 0.9`."""
    groups: dict[str, list[tuple[str, Any]]] = {}
    for k in sorted(values):
        head, _, tail = k.partition("/")
        groups.setdefault(head, []).append((tail, values[k]))
    lines = []
    for head, items in groups.items():
        whole = [v for tail, v in items if not tail]
        first = f"<b>{html.escape(head)}</b>" + (f" = {_fmt(whole[0])}" if whole else "")
        lines.append(" · ".join([first, *[f"{html.escape(tail)} {_fmt(v)}" for tail, v in items if tail]]))
    return lines


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def pareto_figure(space: Space, done: list[FrozenTrial], members: Sequence[FrozenTrial],
                  refs: dict[str, dict[str, float]]) -> go.Figure:
    """Every complete trial on the first two objectives (x: the second, harm-like; y: the first,
    helpfulness-like, as pareto.png), the front joined, baselines and reference models marked."""
    import plotly.graph_objects as go

    if len(space.objectives) < 2:
        raise Skipped("the space has one objective; see the hypervolume and parallel coordinates")
    if not done:
        raise Skipped("no complete trial yet")
    ox, oy = space.objectives[1], space.objectives[0]

    def xy(ts: Sequence[FrozenTrial]) -> tuple[list[float], list[float]]:
        return [t.user_attrs["metrics"][ox.metric] for t in ts], [t.user_attrs["metrics"][oy.metric] for t in ts]

    on_front = {t.number for t in members}
    rest = [t for t in done if t.number not in on_front]
    front = sorted(members, key=lambda t: (t.user_attrs["metrics"][ox.metric], t.number))
    fig = go.Figure()
    x, y = xy(rest)
    fig.add_trace(go.Scatter(x=x, y=y, mode="markers", name="trials", marker={"color": "#9aa7b8", "size": 8},
                             hovertext=[_hover(space, t) for t in rest], hoverinfo="text"))
    x, y = xy(front)
    fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name="Pareto front",
                             marker={"color": "#c0392b", "size": 10}, line={"color": "#c0392b"},
                             hovertext=[_hover(space, t) for t in front], hoverinfo="text"))
    base = [t for t in done if t.user_attrs.get("baseline")]
    x, y = xy(base)
    mid = (min(x, default=0) + max(x, default=0)) / 2  # labels point inward: not clipped at the plot's edge
    fig.add_trace(go.Scatter(x=x, y=y, mode="markers+text", name="baselines", text=[t.user_attrs["baseline"] for t in base],
                             textposition=["middle left" if v > mid else "middle right" for v in x],
                             textfont={"size": 10},
                             marker={"symbol": "square-open", "size": 12, "color": "#2c3e50"},
                             hovertext=[_hover(space, t) for t in base], hoverinfo="text"))
    for name, card in refs.items():
        text = f"<b>{html.escape(name)}</b> (reference model)<br>" + "<br>".join(
            _grouped({k: v for k, v in card.items() if not k.startswith("time/")}))
        fig.add_trace(go.Scatter(x=[card[ox.metric]], y=[card[oy.metric]], mode="markers", name=name.replace("_", "-"),
                                 marker={"symbol": "star", "size": 16, "color": "#27ae60"}, hovertext=[text],
                                 hoverinfo="text"))
    fig.update_layout(title=f"{space.name}: {len(done)} complete trials, sampler {space.search.sampler}",
                      xaxis_title=f"{ox.metric} ({'lower' if ox.direction == 'minimize' else 'higher'} is better)",
                      yaxis_title=f"{oy.metric} ({'higher' if oy.direction == 'maximize' else 'lower'} is better)",
                      hoverlabel={"align": "left", "bgcolor": "white", "font": {"color": "#1d2733"}})
    return fig


def hypervolume_figure(space: Space, done: list[FrozenTrial]) -> go.Figure:
    import plotly.graph_objects as go

    if not done:
        raise Skipped("no complete trial yet")
    pts, hv = [], []
    for t in done:
        pts.append(objective_values(space, t.user_attrs["metrics"]))
        hv.append(hypervolume(space, pts))
    fig = go.Figure(go.Scatter(x=[t.number + 1 for t in done], y=hv, mode="lines+markers", name="hypervolume",
                               line={"shape": "hv", "color": "#2c3e50"}, marker={"size": 5},
                               hovertemplate="after %{x} trials: %{y:.4f}<extra></extra>"))
    fig.update_layout(title=f"{space.name}: hypervolume by trial", xaxis_title="trials", yaxis_title="hypervolume")
    return fig


def _targets(space: Space) -> list[tuple[str, Callable[[FrozenTrial], float], bool]]:
    """(name, value from the metrics, higher is better) for the combined score and each objective."""
    def metric(k: str) -> Callable[[FrozenTrial], float]:
        return lambda t: float(t.user_attrs["metrics"][k])

    return [("combined", metric("combined"), True),
            *[(o.metric, metric(o.metric), o.direction == "maximize") for o in space.objectives]]


def importances_figure(space: Space, study: optuna.Study, done: list[FrozenTrial]) -> go.Figure:
    """Optuna's PED-ANOVA importances, one bar group per target, drawn as `plot_param_importances`
    draws them. PED-ANOVA takes milliseconds on 40 trials where fANOVA's random forest takes seconds,
    and it scores the parameters only some methods have. Not `plot_param_importances` itself: its hover
    text re-reads every trial once per parameter, which made this panel four times slower on 40 trials."""
    import plotly.graph_objects as go
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    if len(done) < 2:
        raise Skipped(f"importances need at least 2 complete trials, the study has {len(done)}")
    fig = go.Figure()
    for name, value, higher in _targets(space):
        with warnings.catch_warnings():  # PED-ANOVA's note that it minimises the target: the sign sees to it
            warnings.simplefilter("ignore")
            imp = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator(),
                                        target=lambda t, v=value, s=-1.0 if higher else 1.0: s * v(t))
        names = sorted(imp, key=lambda k: (imp[k], k))  # the largest at the top of a horizontal chart
        fig.add_trace(go.Bar(x=[imp[k] for k in names], y=names, name=name, orientation="h",
                             text=[f"{imp[k]:.2f}" if imp[k] >= 0.01 else "<0.01" for k in names],
                             textposition="outside", cliponaxis=False,
                             hovertemplate=f"{html.escape(name)}: %{{y}} %{{x:.3f}}<extra></extra>"))
    fig.update_layout(title="parameter importances (PED-ANOVA) by target", barmode="group",
                      xaxis_title="importance", yaxis={"title": "parameter", "automargin": True},
                      legend_title_text="target")
    return fig


def parallel_figure(space: Space, study: optuna.Study, done: list[FrozenTrial]) -> go.Figure:
    from optuna.visualization import plot_parallel_coordinate

    if not done:
        raise Skipped("no complete trial yet")
    fig = plot_parallel_coordinate(study, target=lambda t: float(t.user_attrs["metrics"]["combined"]),
                                   target_name="combined")
    fig.update_layout(title="parameters of each complete trial, coloured by combined score")
    return fig


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem auto; max-width: 1200px;
       padding: 0 1rem; color: #1d2733; }}
h1 {{ margin-bottom: .3rem; }}
h2 {{ margin: 1.8rem 0 .2rem; border-bottom: 1px solid #dde3ea; padding-bottom: .2rem; }}
ul.facts {{ list-style: none; padding: 0; margin: 0; color: #4a5868; }}
ul.facts li {{ display: inline-block; margin-right: 1.4rem; }}
p.note {{ color: #4a5868; margin: .2rem 0; }}
p.skipped {{ color: #8a5a00; background: #fff6e0; padding: .5rem .8rem; border-radius: 4px; }}
</style>
<script type="text/javascript">{plotlyjs}</script>
</head>
<body>
{header}
{body}
</body>
</html>
"""
