"""Every check before anything starts: the run folder, the models' headers, memory, the storage and
its lease, the evaluation's assets (prompt files, tasks with their data, the tokenizer, the judge).
`optimize --dry-run` runs exactly these and prints what each found; a real run runs them before Ray,
the workers or the run folder. Each refusal is one line naming what to change."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from ..space import Space


def preflight(space: Space, run_dir: Path, *, workers: int, ray: bool = True, memory: bool = True,
              on_check: Callable[[str, str], None] | None = None, build_zoo: bool = True,
              trust_remote_code: bool = False, allow_pickle: bool = False):
    """Run every check in order; `on_check(what, found)` hears each one that passed. Returns the study
    already in the storage (None for a new one), checked against this space and free of a live driver."""
    from ..refs import unbuilt_zoo
    from .lease import refuse_if_held
    from .storage import storage_spec
    from .store import find_study

    say = on_check or (lambda *_: None)
    load = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    say("run folder", check_run_dir(run_dir))
    zoo = unbuilt_zoo(space) if not build_zoo else None
    if zoo is not None:  # a dry run builds nothing: the zoo's own models and assets are checked when it is built
        say("embedded zoo", f"{zoo} is not built yet; a run builds it (about 4 minutes) and checks its models then")
        memory = False
    else:
        say("models", check_models(space, **load))
    if memory:
        p = check_memory(space, workers, ray=ray, **load)
        say("memory plan", f"fits with placement {p.placement} for {workers} worker(s)")
    existing = find_study(space, run_dir)
    spec = storage_spec(space.storage, run_dir)
    if existing is not None:
        refuse_if_held(existing, spec.url)
    say("storage", f"{spec.url}: " + (f"resumes study {space.name!r}" if existing is not None else "a new study"))
    if zoo is None:
        for what, found in check_assets(space, trust_remote_code=trust_remote_code):
            say(what, found)
    return existing


def check_run_dir(run_dir: Path) -> str:
    """The run folder can be created and written: tried for real (a folder under /proc passes a
    permission check and still cannot be made), then whatever the try created is removed."""
    p = run_dir.resolve()
    top = p
    while not top.exists():
        top = top.parent
    if not top.is_dir():
        raise UserError(f"--run-dir {run_dir}: {top} is a file; expected a folder")
    created = p if top != p else None
    first_new = next((q for q in [p, *p.parents] if q.parent == top), None) if created else None
    probe = p / f".mergeopt-write-test-{os.getpid()}"
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--run-dir {run_dir}: cannot write there ({e.strerror or e}); choose a run folder you can "
                        "write to") from None
    finally:
        if first_new is not None:
            shutil.rmtree(first_new, ignore_errors=True)
    return f"{run_dir}: " + ("exists and is writable" if created is None else "can be created")


def check_models(space: Space, **load: bool) -> str:
    """Every model folder's config and safetensors headers against the base's: present, not an adapter,
    the same architecture, vocabulary and tensor shapes. Weights themselves are read (and checked
    finite) when the workers load them."""
    from ..merge import open_models

    recipe = space.recipe(space.baselines()[0] if space.distributions() else {}, 0)
    base, experts = open_models(recipe, **load)
    return (f"base and {len(experts)} expert(s): {len(base.names)} tensors each, {base.config.get('model_type')}, "
            f"vocabulary {base.config.get('vocab_size')}")


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


def check_assets(space: Space, *, trust_remote_code: bool = False) -> list[tuple[str, str]]:
    """The evaluation's prompt files, engine, prompt format, judge, lm-eval tasks (loaded, with their
    data) and the tokenizer on samples of both; what each found."""
    from ..evaluation.assets import resolve_assets

    found: list[tuple[str, str]] = []
    for split in ("validation", "test"):
        assets = resolve_assets(space.evaluation, split)
        if split == "validation":
            check_engine(space)
            check_prompt_format(space, assets, trust_remote_code=trust_remote_code)
            check_judge_markers(assets)
            judge = assets.judge
            if judge.kind != "refusal_markers" and (not judge.model or not Path(judge.model).is_dir()):
                raise UserError(f"evaluation.judge.model: {judge.model} not found; expected a local model folder for {judge.kind!r}")
            found.append(("judge", f"{judge.kind}" + (f", phrases for {', '.join(sorted(judge.refusal))}" if judge.refusal else "")))
        texts = [r.prompt for per in (assets.harmful, assets.benign) for rows in per.values() for r in rows[:2]]
        n_prompts = sum(len(rows) for per in (assets.harmful, assets.benign) for rows in per.values())
        docs = 0
        if assets.tasks:
            loaded = load_tasks(assets)
            docs = sum(len(t.eval_docs) for t in loaded.values())
            for task in loaded.values():
                texts += [str(task.doc_to_text(d)) for d in list(task.eval_docs)[:2]]
        found.append((f"{split} split", f"languages {', '.join(assets.languages)}: {n_prompts} prompts, "
                                        f"{sum(len(v) for v in assets.tasks.values())} task entries ({docs} documents)"))
        if split == "validation":
            found.append(("tokenizer", check_tokenizer(space, texts, trust_remote_code=trust_remote_code)))
    return found


def load_tasks(assets) -> dict:
    """Every lm-eval task, group or tag of a split, loaded as the workers load them (with `datasets`,
    from this working folder): an unknown name or a data file that cannot be read is one line here."""
    import contextlib
    import io
    import logging

    from lm_eval.tasks import TaskManager

    from ..evaluation.helpfulness import check_task_names

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    tm = TaskManager(include_path=assets.include_path, include_defaults=assets.include_path is None)
    check_task_names(tm, assets.tasks)
    tasks: dict = {}
    for lang, names in assets.tasks.items():
        for name in names:
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    tasks.update(tm.load([name])["tasks"])
            except Exception as e:  # noqa: BLE001 - datasets' and lm-eval's errors have no common base
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise UserError(f"evaluation.{assets.split}.tasks.{lang}: task {name!r} cannot be loaded ({first}); a "
                                "task's local data_files are read relative to the working folder, not its YAML: "
                                "write them as absolute paths") from None
    return tasks


def check_tokenizer(space: Space, texts: list[str], *, trust_remote_code: bool = False) -> str:
    """Sample prompts and task documents encode to tokens and decode back to their text. Tokenizer files
    that do not fit the model type can load as a tokenizer that encodes everything to nothing, and a
    study on empty prompts would run to its end."""
    if not texts:
        return "no prompts or task documents to try"
    from transformers import AutoTokenizer

    from ..refs import resolve_model_path

    path = resolve_model_path(space.base_model)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)

    def norm(t: str) -> str:  # decoders differ in the spaces they restore; the words must come back
        return "".join(t.split())

    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError(f"{path}: its tokenizer encodes {text[:60]!r} to no tokens; expected its tokenizer files to "
                            "fit its model type (check tokenizer.json and tokenizer_config.json)")
        back = tok.decode(ids, skip_special_tokens=True)
        if norm(back) != norm(text):
            raise UserError(f"{path}: its tokenizer decodes {text[:60]!r} back as {back[:60]!r}; expected the same text "
                            "(check tokenizer.json and tokenizer_config.json against the model type)")
    return f"{len(texts)} prompts and documents encode and decode back"


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
