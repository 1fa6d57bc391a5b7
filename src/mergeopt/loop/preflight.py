"""What is checked before any worker starts or anything is written: the run folder, memory, the
evaluation's assets. Each refusal is one line naming what to change."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from ..space import Space


def check_run_dir(run_dir: Path) -> None:
    """The run folder, or the nearest folder above it that exists, must be writable."""
    p = run_dir.resolve()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise UserError(f"--run-dir {run_dir}: {p} is a file; expected a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"--run-dir {run_dir}: {p} is not writable; choose a run folder you can write to")


def study_plan(space: Space, workers: int, *, ray: bool = True, node=None, **load: bool):
    """The space's memory plan on this node (mergeopt.memory_plan), from the base model's headers."""
    from ..checkpoints import Checkpoint
    from ..memory_plan import ModelSize, Node, Setup, plan
    from ..refs import resolve_model_path

    node = node or Node.measure()
    size = ModelSize.of_checkpoint(Checkpoint(resolve_model_path(space.base_model), **load))
    return plan(size, Setup.of_space(space, workers, ray=ray, gpus=node.gpus), node), size, node


def check_memory(space: Space, workers: int, *, ray: bool = True, node=None, **load: bool):
    """Refuse to start a study that would not fit, instead of being killed hours later; the plan
    otherwise (its placement is what `auto` resolves to on this node)."""
    from ..memory_plan import GIB, refusal

    p, size, node = study_plan(space, workers, ray=ray, node=node, **load)
    if p.setup.gpus_per_worker and not node.gpus:
        raise UserError(f"{space.name}: search.gpus_per_worker: the GPU tier needs {p.need('gpu') / GIB:.1f} GiB per GPU, "
                        "but this node has no GPU (0.0 GiB free); remove search.gpus_per_worker to run on the CPU, "
                        "or run on a GPU node")
    line = refusal(space.name, size, p.setup, node)
    if line:
        raise UserError(line)
    return p


def check_assets(space: Space, *, trust_remote_code: bool = False) -> None:
    """The evaluation's prompt files, prompt format, judge and lm-eval task names."""
    from ..evaluation.assets import resolve_assets

    assets = resolve_assets(space.evaluation, "validation")
    check_engine(space)
    check_prompt_format(space, assets, trust_remote_code=trust_remote_code)
    check_judge_markers(assets)
    judge = assets.judge
    if judge.kind != "refusal_markers" and (not judge.model or not Path(judge.model).is_dir()):
        raise UserError(f"evaluation.judge.model: {judge.model} not found; expected a local model folder for {judge.kind!r}")
    if assets.include_path and assets.tasks:
        from lm_eval.tasks import TaskManager

        from ..evaluation.helpfulness import check_task_names

        check_task_names(TaskManager(include_path=assets.include_path, include_defaults=False), assets.tasks)


def check_prompt_format(space: Space, assets, *, trust_remote_code: bool = False) -> None:
    """Every evaluation (lm-eval tasks, red-team and benign prompts) uses one prompt format
    (mergeopt.evaluation.prompt_format); a tokenizer without a chat template and no `evaluation.chat_template`
    would make every worker fail on its first prompt."""
    if not (assets.tasks or assets.harmful or assets.benign):
        return
    from transformers import AutoTokenizer

    from ..evaluation.prompt_format import RAW, apply_prompt_format, jinja_from_format
    from ..refs import resolve_model_path

    if assets.chat_template is not None:
        if assets.chat_template != RAW:
            jinja_from_format(assets.chat_template)  # holds {prompt} once
        return
    path = resolve_model_path(space.base_model)
    apply_prompt_format(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code), None, where=str(path))


def check_judge_markers(assets) -> None:
    """A `refusal_markers` judge needs, for every language with prompts, the phrases of a refusal, and
    the phrases of an answer wherever a prompt has no expected answer: without them every refusal or
    every answer would be counted unusable, silently. Llama Guard cannot see a refusal, so it needs the
    refusal phrases of every language with benign prompts, or over-refusal would read 0."""
    if assets.config.mode != "generate":
        return
    judge = assets.judge
    if judge.kind == "llama_guard":
        for lang in assets.benign:
            if not judge.refusal.get(lang):
                raise UserError(f"evaluation.judge.refusal: no refusal markers for language {lang!r}, which has "
                                "benign prompts; Llama Guard judges harm, not refusals, so over-refusal needs the "
                                f"phrases a refusal in {lang!r} contains (or use kind: wildguard)")
    if judge.kind != "refusal_markers":
        return
    for kind, per in (("harmful", assets.harmful), ("benign", assets.benign)):
        for lang, rows in per.items():
            if not judge.refusal.get(lang):
                raise UserError(f"evaluation.judge.refusal: no refusal markers for language {lang!r}, which has "
                                f"{kind} prompts; list the phrases a refusal in {lang!r} contains, or use a judge "
                                "model (kind: classifier or llm_judge)")
            if any(not r.answer for r in rows) and not judge.compliance.get(lang):
                raise UserError(f"evaluation.judge.compliance: no compliance markers for language {lang!r}, whose "
                                f"{kind} prompts have no expected `answer`; list the phrases an answer in {lang!r} "
                                "contains, or give each prompt its answer")


def check_engine(space: Space) -> None:
    """`evaluation.engine: vllm` needs vLLM in this environment (and on every worker), and generates."""
    if space.evaluation.engine != "vllm":
        return
    from ..evaluation.vllm_engine import INSTALL, missing

    why = missing()
    if why:
        raise UserError(f"evaluation.engine: vllm: {why}; install it with: {INSTALL}")
    if space.evaluation.mode != "generate":
        raise UserError("evaluation.mode: loglik scores with the transformers model; use engine: hf, or mode: generate")
    import torch

    from ..checkpoints import Checkpoint
    from ..refs import resolve_model_path

    cfg = Checkpoint(resolve_model_path(space.base_model)).config
    heads = cfg.get("num_attention_heads") or 1
    head = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // heads)
    if not torch.cuda.is_available() and head and head < 32:
        raise UserError(f"evaluation.engine: vllm: {space.base_model} has attention heads of size {head}; vLLM's CPU "
                        "attention needs at least 32; use engine: hf")
