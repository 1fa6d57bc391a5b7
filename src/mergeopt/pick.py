"""The pick rule: which Pareto-front member a study's export, report and bench name as its winner.

One implementation, used by `export`, `pareto` and the benches alike."""

from __future__ import annotations

import math

import optuna

from .errors import UserError
from .objectives import front_trials
from .space import PICK_CONSTRAINT, Space


def _knee(space: Space, members: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial:
    """The front point farthest from the line between the front's extremes, objectives normalised."""
    o1, o2 = space.objectives[0], space.objectives[1]
    pts = [(t.user_attrs["metrics"][o1.metric] * (1 if o1.direction == "maximize" else -1),
            t.user_attrs["metrics"][o2.metric] * (1 if o2.direction == "maximize" else -1)) for t in members]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    norm = [((x - min(xs)) / span_x, (y - min(ys)) / span_y) for x, y in pts]
    a, b = min(norm), max(norm)
    dx, dy = b[0] - a[0], b[1] - a[1]
    length = math.hypot(dx, dy) or 1.0

    def dist(i: int) -> float:
        x, y = norm[i]
        return abs(dy * (x - a[0]) - dx * (y - a[1])) / length

    return members[min(range(len(members)), key=lambda i: (-dist(i), members[i].number))]


def pick(space: Space, study: optuna.Study, rule: str | None = None) -> optuna.trial.FrozenTrial:
    """`combined` (best combined score on the front), `knee`, or a constraint such as `harm <= 0.05`
    (best value of the first maximised objective among front members that satisfy it). Ties go to the
    lower trial number."""
    rule = (rule or space.pick).strip()
    members = front_trials(space, study)  # best combined first
    if not members:
        raise UserError(f"{space.name}: no complete trial to export")
    if rule == "combined":
        return members[0]
    if rule == "knee":
        return members[0] if len(members) < 3 else _knee(space, members)
    m = PICK_CONSTRAINT.match(rule)
    if not m:
        raise UserError(f"pick: cannot read {rule!r}; expected combined, knee, or a constraint like 'harm <= 0.05'")
    metric, op, bound = m.group(1), m.group(2), float(m.group(3))
    ok = {"<=": lambda v: v <= bound, ">=": lambda v: v >= bound, "<": lambda v: v < bound, ">": lambda v: v > bound}[op]
    feasible = [t for t in members if metric in t.user_attrs["metrics"] and ok(t.user_attrs["metrics"][metric])]
    if not feasible:
        raise UserError(f"pick: no front member satisfies {rule!r}")
    main = next((o.metric for o in space.objectives if o.direction == "maximize"), "combined")
    return min(feasible, key=lambda t: (-t.user_attrs["metrics"][main], -t.user_attrs["metrics"]["combined"], t.number))
