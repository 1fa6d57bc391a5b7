"""Resolve the space file's evaluation section into concrete assets for one split: lm-eval task names
and include path, red-team and benign prompt rows per language, the judge's configuration and the chat
template. `evaluation.zoo` fills all of them from the embedded zoo."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..space import EvaluationConfig, JudgeConfig


@dataclass
class PromptRow:
    prompt: str
    language: str
    answer: str | None = None
    category: str | None = None


@dataclass
class EvalAssets:
    split: str
    include_path: str | None
    tasks: dict[str, list[str]]  # language -> lm-eval tasks, groups or tags
    harmful: dict[str, list[PromptRow]]
    benign: dict[str, list[PromptRow]]
    judge: JudgeConfig
    chat_template: str | None
    config: EvaluationConfig
    refusal_continuation: dict[str, str] = field(default_factory=dict)
    compliance_continuation: dict[str, str] = field(default_factory=dict)

    @property
    def languages(self) -> list[str]:
        return sorted(set(self.tasks) | set(self.harmful) | set(self.benign))


def read_prompts(path: Path, language: str) -> list[PromptRow]:
    """jsonl rows with `prompt` (required), `language`, optional `answer` and `category`."""
    if not path.exists():
        raise UserError(f"{path}: prompt file not found")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise UserError(f"{path}:{i}: field 'prompt' is missing or empty; expected a non-empty string")
        rows.append(PromptRow(obj["prompt"], obj.get("language", language), obj.get("answer"), obj.get("category")))
    if not rows:
        raise UserError(f"{path}: empty prompt set; expected at least one jsonl row with a 'prompt' field")
    return rows


def resolve_assets(cfg: EvaluationConfig, split: str, base_dir: Path | None = None) -> EvalAssets:
    base_dir = base_dir or Path.cwd()
    assets = getattr(cfg, split)
    include = cfg.include_path
    tasks, harmful_files, benign_files = dict(assets.tasks), dict(assets.harmful), dict(assets.benign)
    judge = cfg.judge.model_copy(deep=True)
    template = cfg.chat_template
    refusal_cont, compliance_cont = dict(cfg.refusal_continuation), dict(cfg.compliance_continuation)
    if cfg.zoo:
        from ..refs import zoo_evaluation

        z = zoo_evaluation(cfg.zoo, split)
        include = include or z["include_path"]
        tasks = tasks or z["tasks"]
        harmful_files = harmful_files or z["harmful"]
        benign_files = benign_files or z["benign"]
        judge.refusal = judge.refusal or z["refusal"]
        judge.compliance = judge.compliance or z["compliance"]
        template = template or z["chat_template"]
        refusal_cont = refusal_cont or z["refusal_continuation"]
        compliance_cont = compliance_cont or z["compliance_continuation"]

    def path(p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else base_dir / q

    if include and not path(include).is_dir():
        raise UserError(f"evaluation.include_path: {include} is not a folder")
    return EvalAssets(
        split=split, include_path=str(path(include)) if include else None,
        tasks={lg: [t] if isinstance(t, str) else list(t) for lg, t in tasks.items()},
        harmful={lg: read_prompts(path(p), lg) for lg, p in harmful_files.items()},
        benign={lg: read_prompts(path(p), lg) for lg, p in benign_files.items()},
        judge=judge, chat_template=template, config=cfg,
        refusal_continuation=refusal_cont, compliance_continuation=compliance_cont)
