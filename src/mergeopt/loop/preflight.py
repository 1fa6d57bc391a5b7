"""What is checked before any worker starts or anything is written: the run folder, memory, the
evaluation's assets. Each refusal is one line naming what to change."""

from __future__ import annotations

import math
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


def memory_plan(space: Space, workers: int, **load: bool) -> dict[str, float]:
    """Bytes a study needs on this node: the base and task vectors once (shared through the object
    store, plus the driver's copy while it puts them there), and per worker a model, its activations,
    the libraries' own footprint and, when TIES is searched, the sorted magnitudes of every task vector."""
    from ..checkpoints import Checkpoint
    from ..methods.task_arithmetic import RANKED_METHODS
    from ..refs import resolve_model_path

    ck = Checkpoint(resolve_model_path(space.base_model), **load)
    elem = 2 if space.dtype == "bfloat16" else 4
    params = sum(math.prod(ck.shape(n)) for n in ck.names)
    shared = params * elem * (1 + len(space.models))
    per_worker = params * 4 * 1.25 + 600 * 2**20  # fp32 model, activations, runtime (torch, lm-eval)
    # TIES looks its thresholds up in each task vector's sorted magnitudes, kept by each worker (float32)
    ranks = params * 4 * len(space.models) if RANKED_METHODS.intersection(space.methods) else 0
    per_worker += ranks
    return {"params": params, "shared_bytes": shared, "driver_bytes": shared, "per_worker_bytes": per_worker,
            "ties_ranks_bytes": ranks, "total_bytes": 2 * shared + workers * per_worker}


def check_memory(space: Space, workers: int, gpus: bool, **load: bool) -> None:
    """Refuse to start a study that would not fit, instead of being killed hours later."""
    import psutil

    plan = memory_plan(space, workers, **load)
    gib = 2**30
    avail = psutil.virtual_memory().available
    if plan["total_bytes"] > 0.9 * avail:
        fit = max(0, int((0.9 * avail - 2 * plan["shared_bytes"]) // plan["per_worker_bytes"]))
        raise UserError(f"{space.name}: {workers} worker(s) need about {plan['total_bytes'] / gib:.1f} GiB of RAM "
                        f"({plan['shared_bytes'] / gib:.1f} GiB base and task vectors, {plan['per_worker_bytes'] / gib:.1f} GiB "
                        f"per worker) but {avail / gib:.1f} GiB is free; use --workers {fit}" +
                        ("" if space.dtype == "bfloat16" else " or dtype: bfloat16"))
    if gpus:
        import torch

        free, _ = torch.cuda.mem_get_info()
        need = plan["shared_bytes"] + plan["per_worker_bytes"]
        if need > 0.9 * free:
            raise UserError(f"{space.name}: one worker needs about {need / gib:.1f} GiB of GPU memory but "
                            f"{free / gib:.1f} GiB is free; use dtype: bfloat16 or a GPU with more memory")


def check_assets(space: Space, *, trust_remote_code: bool = False) -> None:
    """The evaluation's prompt files, prompt format, judge and lm-eval task names."""
    from ..evaluation.assets import resolve_assets

    assets = resolve_assets(space.evaluation, "validation")
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
