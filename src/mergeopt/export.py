"""Export: what a user takes away from a study.

The winner is picked from the front, merged again from its recipe and seed, and its validation metrics
are recomputed: they must equal the ones the study recorded, and the written weights must be
bit-identical to the evaluated model's, or the export stops. Then the held-out test split is evaluated
once. The folder (safetensors, config, tokenizer, model card, recipes, results, .eval_results, the chosen
trial, manifest) is
written under a temporary name and renamed at the end; nothing in it depends on the clock, so exporting
twice gives identical bytes."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from safetensors import safe_open

from . import __version__
from .atomic import atomic_folder
from .errors import UserError
from .evaluation.prompt_format import RAW, write_chat_template
from .methods import get_method
from .methods.task_arithmetic import RANKED_METHODS
from .objectives import combined_score
from .pick import pick
from .space import Space

S = optuna.trial.TrialState

class VerificationError(UserError):
    """The re-materialized winner does not reproduce what the study recorded."""


# ---------------------------------------------------------------------------------------------- write

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _metric_equal(a: dict[str, float], b: dict[str, float]) -> list[str]:
    keys = [k for k in a if not k.startswith("time/")]
    return [k for k in keys if k not in b or a[k] != b[k]]


def mergekit_config(recipe) -> dict[str, Any] | None:
    """mergekit's YAML for the same weights: tag coefficients folded into the weights, mergeopt's own
    keys dropped. Only for methods whose result does not depend on random masks, over task vectors
    mergekit can read (not int8-rounded ones)."""
    if not get_method(recipe.merge_method).mergekit_reproduces or recipe.task_vectors != "full":
        return None
    models = []
    for m, p in zip(recipe.experts(), recipe.resolved_models(), strict=True):
        models.append({"model": m.model, "parameters": dict(p)} if p else {"model": m.model})
    if recipe.merge_method == "slerp":
        models = [{"model": recipe.base_model}, {"model": recipe.experts()[0].model}]
    cfg: dict[str, Any] = {"merge_method": recipe.merge_method, "models": models, "dtype": recipe.torch_dtype}
    if recipe.merge_method != "linear":
        cfg["base_model"] = recipe.base_model
    glob = {k: v for k, v in recipe.resolved_globals().items() if k != "rescale"}
    if glob:
        cfg["parameters"] = glob
    return cfg


def _results_json(name: str, space: Space, assets, metrics: dict[str, float]) -> dict[str, Any]:
    """lm-eval's results layout for the test split: each task's and group's value under lm-eval's own
    metric and filter name (from `lm_eval/<task>/<metric>,<filter>` metrics), so `lm_eval` run on the
    folder can be compared key for key; harm and over-refusal as tasks of their own."""
    results: dict[str, Any] = {}
    for key, value in sorted(metrics.items()):
        if key.startswith("lm_eval/"):
            task, metric = key[len("lm_eval/"):].rsplit("/", 1)
            results.setdefault(task, {"alias": task})[metric] = value
    for metric in ("harm", "over_refusal"):
        for lang in assets.languages:
            if f"{metric}/{lang}" in metrics:
                results[f"mergeopt_{metric}_{lang}"] = {"alias": f"{metric} ({lang})", f"{metric},none": metrics[f"{metric}/{lang}"]}
    return {"results": results, "config": {"model": "hf", "model_args": f"pretrained={name}", "split": "test",
                                           "apply_chat_template": assets.chat_template != RAW,
                                           "lm_eval_command": lm_eval_command(assets),
                                           "mergeopt_version": __version__},
            "versions": dict.fromkeys(results, 1.0)}


def lm_eval_command(assets, folder: str = ".") -> list[str] | None:
    """The `lm_eval` command that scores the exported folder's helpfulness tasks as the study did: the
    same tasks and groups, the same prompt format. None without lm-eval tasks."""
    names = list(dict.fromkeys(t for per in assets.tasks.values() for t in per))
    if not names:
        return None
    cmd = ["lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={folder}", "--tasks", ",".join(names)]
    if assets.include_path:
        cmd += ["--include_path", assets.include_path]
    if assets.chat_template != RAW:
        cmd.append("--apply_chat_template")
    return cmd


def _hub_dataset(task) -> str | None:
    """A task's Hugging Face dataset id: its `dataset_path` when that names a Hub dataset, else the
    `hub_dataset` in its YAML's `metadata` (a local dataset published under that id)."""
    meta = getattr(task.config, "metadata", None) or {}
    if meta.get("hub_dataset"):
        return str(meta["hub_dataset"])
    path = str(getattr(task.config, "dataset_path", "") or "")
    return path if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not Path(path).exists() else None


def eval_results(ev, metrics: dict[str, float]) -> dict[str, list[dict[str, Any]]]:
    """Hugging Face's `.eval_results/<benchmark>.yaml` entries for the test split: one per task or group
    scored, where its dataset has a Hub id (a group's, when all its tasks share one)."""
    h = ev.helpfulness
    if h is None:
        return {}
    out: dict[str, list[dict[str, Any]]] = {}
    for entries in h.entries.values():
        for e in entries:
            ids = {_hub_dataset(h.tasks[leaf]) for leaf in e.leaves}
            key = next((k for k in metrics if k.startswith(f"lm_eval/{e.name}/")), None)
            if key is None or len(ids) != 1 or None in ids or e.name in out:
                continue
            out[e.name] = [{"dataset": {"id": ids.pop(), "task_id": e.name}, "value": round(metrics[key], 6),
                            "source": {"name": f"mergeopt {__version__} with lm-eval ({key.rsplit('/', 1)[1]}, test split)"}}]
    return out


def written_recipe(space: Space, recipe, *, hub: bool):
    """The recipe as it is written for others to run: every model an absolute folder (a zoo model's own
    folder, never `zoo:`), or its Hub id when `hub` and the space names one."""
    from .recipe import Recipe
    from .refs import portable

    ids = {m.path: m.hub_id for m in space.models if m.hub_id}
    if space.base_hub_id:
        ids[space.base_model] = space.base_hub_id

    def name(ref: str) -> str:
        return (ids.get(ref) if hub else None) or portable(ref)

    data = recipe.model_dump()
    if data.get("base_model"):
        data["base_model"] = name(data["base_model"])
    for m in data["models"]:
        m["model"] = name(m["model"])
    return Recipe.model_validate(data)


def hub_ids(space: Space) -> list[str]:
    """The merged models' Hub ids that the space names: the card's `base_model`, from which the Hub
    derives the model's relations."""
    return [x for x in [space.base_hub_id, *(m.hub_id for m in space.models)] if x]


def _card(space: Space, trial, recipe, val: dict, test: dict, summary: dict, mk: dict | None, name: str,
          how: str, test_assets, hub_results: dict) -> str:
    front_matter = {"base_model": hub_ids(space), "library_name": "transformers",
                    "tags": ["merge", "mergeopt", recipe.merge_method]}
    lines = ["---", yaml.safe_dump(front_matter, sort_keys=True).strip(), "---", "", f"# {name}", "",
             f"This model was merged by mergeopt with the "
             f"**{recipe.merge_method}** method ({get_method(recipe.merge_method).paper or recipe.merge_method})"
             + (f", using `{recipe.base_model}` as the base." if recipe.base_model else "."),
             f"It is trial {trial.number} of the study `{space.name}`, {how}. The study's Pareto front is over "
             f"{space.objectives[0].metric} ({space.objectives[0].direction}), "
             + ", ".join(f"{o.metric} ({o.direction})" for o in space.objectives[1:]) + ".", "",
             "## Merged models", "", "| model | role | language | objective | effective weight | density |",
             "|---|---|---|---|---|---|"]
    if recipe.base_model:
        lines.append(f"| `{recipe.base_model}` | base | | | | |")
    for m, p in zip(recipe.experts(), recipe.resolved_models(), strict=True):
        w = p.get("weight", "")
        w = ", ".join(f"{x:.4f}" for x in w) if isinstance(w, list) else (f"{w:.4f}" if w != "" else "")
        d = p.get("density", "")
        lines.append(f"| `{m.model}` | expert | {m.language or ''} | {m.objective or ''} | {w} | "
                     f"{f'{d:.4f}' if isinstance(d, float) else d} |")
    lines += ["", "Effective weight = weight × language coefficient × objective coefficient.", "",
              "## Metrics", "", "Validation drove the search; the test split was evaluated once, for this card, so the gap "
              "between the two columns shows the selection bias.", "", "| metric | validation | test |", "|---|---|---|"]
    for k in sorted(k for k in val if not k.startswith(("time/", "lm_eval/"))):
        lines.append(f"| {k} | {val[k]:.4f} | {test.get(k, float('nan')):.4f} |")
    bench = sorted(k for k in test if k.startswith("lm_eval/"))
    if bench:
        lines += ["", "Helpfulness benchmarks on the test split, under lm-eval's task and metric names (raw values, "
                  "as `results.json` holds them):", "", "| task | metric | test |", "|---|---|---|"]
        for k in bench:
            task, metric = k[len("lm_eval/"):].rsplit("/", 1)
            lines.append(f"| {task} | {metric} | {test[k]:.4f} |")
    t = summary["trials"]
    lines += ["", "## Search", "", f"- sampler: `{space.search.sampler}`, seed {space.search.seed}",
              f"- trials: {t.get('complete', 0)} complete, {t.get('pruned', 0)} pruned, {t.get('fail', 0)} failed",
              f"- front size: {len(summary['front'])}, hypervolume {summary['hypervolume']:.4f}",
              f"- combined score: `{space.combined}`"]
    if summary["timing"].get("elapsed_s"):
        lines.append(f"- search time: {summary['timing']['elapsed_s']:.0f} s")
    for ref, info in summary.get("references", {}).items():
        lines.append(f"- reference `{ref}`: combined {info['metrics']['combined']:+.4f} on validation "
                     f"({'dominated by the front' if info['dominated_by_front'] else 'not dominated by the front'})")
    lines += ["", "![Pareto front](pareto.png)", "", "## Recipe", "", "`mergeopt_recipe.yaml` reproduces these weights "
              "bit for bit with `mergeopt merge mergeopt_recipe.yaml --out DIR`:", "", "```yaml", recipe.to_yaml().strip(), "```", ""]
    if mk is not None:
        lines += ["`mergekit_config.yml` gives the same weights with `mergekit-yaml mergekit_config.yml DIR` "
                  "(up to float rounding)"
                  + (". Where task-vector magnitudes tie at the trim threshold, mergeopt keeps every tied entry "
                     "and mergekit exactly k, so a few entries can differ; `mergeopt_recipe.yaml` is exact."
                     if recipe.merge_method in RANKED_METHODS else "."), ""]
    elif recipe.task_vectors == "int8":
        lines += ["No `mergekit_config.yml`: the search stored the task vectors as int8 with one float32 scale per "
                  "row (`placement: int8`), and these weights merge those rounded task vectors, which mergekit "
                  "cannot read; `mergeopt_recipe.yaml` (`task_vectors: int8`) reproduces them exactly.", ""]
    else:
        lines += [f"No `mergekit_config.yml`: `{recipe.merge_method}` draws random masks, and mergekit seeds them "
                  "differently, so only `mergeopt_recipe.yaml` reproduces these exact weights.", ""]
    storage = ("int8 task vectors with per-row float32 scales" if recipe.task_vectors == "int8"
               else f"{recipe.torch_dtype} task vectors")
    lines += [f"Weights are stored in {recipe.output_dtype} and were validated in {recipe.output_dtype} "
              f"(the search merged {storage}).", ""]
    cmd = lm_eval_command(test_assets)
    if cmd:
        lines += ["## Reproduce with lm-eval", "", "lm-eval's own CLI, run in this folder, gives `results.json`'s "
                  "helpfulness values, under the same metric names:", "", "```", " ".join(cmd), "```", ""]
    lines += ["## Evaluation results on the Hub", ""]
    if hub_results:
        lines += [f"`.eval_results/` holds {', '.join(sorted(hub_results))} in Hugging Face's evaluation-results format. "
                  "Upload the folder with it, or open a pull request that adds those files to the model repository; "
                  "the scores then show on the model page and on the benchmark datasets' leaderboards.", ""]
    else:
        lines += ["No `.eval_results/`: none of the tasks names a Hugging Face dataset (`dataset_path`, or "
                  "`metadata.hub_dataset` in the task's YAML).", ""]
    return "\n".join(lines)


def export(space: Space, study: optuna.Study, run_dir: Path, *, trial_number: int | None = None, rule: str | None = None,
           out: Path | None = None, force: bool = False, summary: dict | None = None, allow_pickle: bool = False,
           trust_remote_code: bool = False, how: str | None = None) -> Path:
    """Verify and write one trial's model folder. Returns the folder. `how` says in the card how the
    trial was chosen (by default: its number, or the pick rule)."""
    from .evaluation.assets import resolve_assets
    from .evaluation.evaluator import Evaluator
    from .merge import merge_to_folder
    from .report import write_reports
    from .worker import TrialWorker

    if trial_number is not None:
        try:
            trial = study.trials[trial_number]
        except IndexError:
            raise UserError(f"--trial {trial_number}: the study has {len(study.trials)} trials") from None
        if trial.state != S.COMPLETE:
            raise UserError(f"--trial {trial_number}: trial is {trial.state.name.lower()}, expected a complete trial")
    else:
        trial = pick(space, study, rule)
    if how is None:
        how = (f"chosen by its number (`--trial {trial_number}`)" if trial_number is not None
               else f"picked from the Pareto front by rule `{(rule or space.pick).strip()}`")
    out = Path(out) if out else run_dir / "best"
    if out.exists() and not force:
        raise UserError(f"{out}: export folder exists; pass --force to replace it")
    summary = summary or write_reports(space, study, run_dir)
    seed = int(trial.user_attrs["seed"])
    recipe = space.recipe(trial.params, seed)

    # Re-materialize through the worker's own code path and check the recorded metrics.
    worker = TrialWorker(space.model_dump(mode="json", by_alias=True), worker_id=-1, allow_pickle=allow_pickle,
                         trust_remote_code=trust_remote_code)
    result = worker.run(trial.params, seed)
    if result.state != "complete":
        raise VerificationError(f"trial {trial.number}: re-evaluation did not complete ({result.reason})")
    diff = _metric_equal(trial.user_attrs["metrics"], result.metrics)
    if diff:
        k = diff[0]
        raise VerificationError(f"trial {trial.number}: re-materialized {k} = {result.metrics.get(k)!r}, the study "
                                f"recorded {trial.user_attrs['metrics'][k]!r}; the merge or the evaluation is not reproducible")
    test_assets = resolve_assets(space.evaluation, "test")
    test_ev = Evaluator(worker.model, worker.tok, test_assets, device=worker.device, engine=worker.engine)
    test = test_ev.evaluate()
    test["combined"] = combined_score(space, test)
    hub_results = eval_results(test_ev, test)

    with atomic_folder(out) as tmp:
        shown = written_recipe(space, recipe, hub=False)
        merge_to_folder(recipe, tmp, force=True, max_shard_bytes=2 * 1024**3, recipe_text=shown.to_yaml(),
                        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        # The written weights must be the evaluated ones, bit for bit.
        state = (worker.engine.read() if worker.engine is not None else  # what the engine computes with
                 {k: v.detach().cpu() for k, v in worker.model.state_dict().items()})
        for f in sorted(tmp.glob("*.safetensors")):
            with safe_open(f, "pt") as fh:
                for k in fh.keys():
                    if k in state and not torch.equal(fh.get_tensor(k), state[k].to(fh.get_tensor(k).dtype)):
                        raise VerificationError(f"{k}: exported weights differ from the evaluated model's")
        write_chat_template(tmp, test_assets.chat_template)
        name = f"{space.name}-trial{trial.number}"
        mk = mergekit_config(written_recipe(space, recipe, hub=True))
        if mk is not None:
            (tmp / "mergekit_config.yml").write_text(yaml.safe_dump(mk, sort_keys=False))
        if (run_dir / "pareto.png").exists():
            shutil.copy2(run_dir / "pareto.png", tmp / "pareto.png")
        (tmp / "README.md").write_text(_card(space, trial, shown, trial.user_attrs["metrics"], test, summary, mk, name,
                                                 how, test_assets, hub_results))
        (tmp / "results.json").write_text(json.dumps(_results_json(name, space, test_assets, test), indent=2) + "\n")
        for bench, entries in hub_results.items():
            (tmp / ".eval_results").mkdir(exist_ok=True)
            (tmp / ".eval_results" / f"{bench}.yaml").write_text(yaml.safe_dump(entries, sort_keys=False))
        chosen = {"trial": trial.number, "study": space.name, "how": how, "seed": seed, "model": name,
                  "validation": {k: v for k, v in trial.user_attrs["metrics"].items() if not k.startswith("time/")},
                  "test": {k: v for k, v in test.items() if not k.startswith("time/")}, "mergeopt_version": __version__}
        (tmp / "mergeopt_trial.json").write_text(json.dumps(chosen, indent=2) + "\n")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): _sha256(p) for p in files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def verify_manifest(folder: Path) -> list[str]:
    """Files whose sha256 differs from the manifest (empty when the folder is intact)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    return [f for f, h in manifest.items() if not (folder / f).exists() or _sha256(folder / f) != h]
