"""What the core asks of the embedded zoo, and nothing else: a model's folder, a split's evaluation
assets, the reference models' report cards. The core reaches these only through `mergeopt.refs`, so
the zoo stays a plug-in (of the tests, the demo and the benches) and the users' path never touches it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError
from .build import build_zoo, load_zoo


def model_folder(size: str, name: str) -> Path:
    root = build_zoo(size, seed=0)
    models = load_zoo(root)["models"]
    if name not in models:
        raise UserError(f"no such zoo model; expected one of {sorted(models)}")
    return root / models[name]["path"]


def evaluation(size: str, split: str) -> dict[str, Any]:
    """The evaluation section a zoo space leaves empty: lm-eval tasks, prompt files, judge phrases, the
    prompt format and the loglik continuations, with absolute paths."""
    from .world import LEXICONS, judge_markers

    root = build_zoo(size, seed=0)
    z = load_zoo(root)["eval"]
    refusal, compliance = judge_markers()
    return {
        "include_path": str(root / z["include_path"]),
        "tasks": z["tasks"][split],
        "harmful": {lg: str(root / p) for lg, p in z["prompts"][split]["harmful"].items()},
        "benign": {lg: str(root / p) for lg, p in z["prompts"][split]["benign"].items()},
        "refusal": refusal, "compliance": compliance, "chat_template": z["chat_template"],
        "refusal_continuation": {lg: lx.refusal for lg, lx in LEXICONS.items()},
        "compliance_continuation": {lg: lx.compliance.replace("{ing}", "{answer}") for lg, lx in LEXICONS.items()},
    }


def reference_cards(size: str, split: str = "validation") -> dict[str, dict[str, float]]:
    """Models to place beside a study's front: the data-mix baseline's report card."""
    z = load_zoo(build_zoo(size, seed=0))
    return {name: dict(z["models"][name]["report"][split]) for name in ("data_mix",)}
