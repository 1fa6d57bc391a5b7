"""The search loop on the test zoo: a short study end to end with 2 Ray workers, reproducibility with
one worker, resume, the templates' dry runs, and space-file errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from mergeopt.space import SPACES_DIR

OUTPUTS = ("study.db", "trials.csv", "pareto.csv", "pareto.png", "hypervolume.png", "summary.json", "space.json")


def _test_space(tmp: Path, **search) -> Path:
    data = yaml.safe_load((SPACES_DIR / "safety_multilingual.yaml").read_text())
    data["name"] = "smoke"
    data["base_model"] = "zoo-test:base"
    for m in data["models"]:
        m["path"] = m["path"].replace("zoo:", "zoo-test:")
    data["evaluation"]["zoo"] = "test"
    data["search"].update(search)
    p = tmp / "space.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _optimize(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergeopt.cli", "optimize", *args, "--quiet"], capture_output=True,
                          text=True, timeout=timeout)


def _trials(run: Path) -> list[dict]:
    rows = list(csv.DictReader(open(run / "trials.csv")))
    keep = [k for k in rows[0] if k.startswith(("param:", "metric:")) and not k.startswith("metric:time/")] + ["number", "state", "seed"]
    return [{k: r[k] for k in keep} for r in rows]


def test_short_study_with_two_ray_workers_writes_every_file(test_zoo: Path, tmp_path: Path):
    """Also: a trial that raises (CUDA out of memory, say) is a failed trial with its reason, counted and
    not retried, and its worker lives on."""
    import os

    space = _test_space(tmp_path, n_trials=6, workers=2)
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "mergeopt.cli", "optimize", "--space", str(space), "--run-dir", str(run),
                        "--quiet"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MERGEOPT_FAULT": "worker:generation@1!RAISE"})
    assert r.returncode == 0, r.stderr[-2000:]
    for f in OUTPUTS:
        assert (run / f).exists(), f
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trials"]["complete"] == 5  # and the failed one counts toward the 6
    rows = list(csv.DictReader(open(run / "trials.csv")))
    failed = [row for row in rows if row["state"] == "FAIL"]
    assert [f["number"] for f in failed] == ["1"] and failed[0]["reason"] == "InjectedFault: injected fault at generation"
    started = {str(w["pid"]) for w in json.loads((run / "workers.json").read_text())}
    assert {row["pid"] for row in rows if row["state"] == "COMPLETE"} <= started  # no worker was replaced
    workers = {row["worker"] for row in rows}
    assert workers == {"0", "1"}  # both actors took trials
    baselines = [row["baseline"] for row in csv.DictReader(open(run / "trials.csv")) if row["baseline"]]
    assert baselines[:2] == ["uniform average", "help_en alone"]
    assert "data_mix" in summary["references"]
    status = run_cli("status", str(run))
    assert status.returncode == 0 and "6/6 trials finished" in status.stdout
    pareto = run_cli("pareto", str(run), "--json")
    assert pareto.returncode == 0 and json.loads(pareto.stdout)


def test_same_seed_one_worker_gives_same_trials_and_resume_continues(test_zoo: Path, tmp_path: Path):
    space = _test_space(tmp_path, n_trials=7, workers=1, sampler="tpe", seed=4)
    a, b = tmp_path / "a", tmp_path / "b"
    assert _optimize("--space", str(space), "--run-dir", str(a), "--backend", "inline").returncode == 0
    r = _optimize("--space", str(space), "--run-dir", str(b), "--n-trials", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _optimize("--space", str(space), "--run-dir", str(b), "--backend", "inline")  # resumed up to 7 trials
    assert r.returncode == 0, r.stderr[-2000:]
    assert _trials(a) == _trials(b)


def test_pruner_stops_a_candidate_on_the_subset_and_without_one_a_candidate_is_scored_in_one_pass(test_zoo: Path, tmp_path: Path):
    from mergeopt.space import load_space
    from mergeopt.worker import TrialWorker

    pruned = load_space(str(_test_space(tmp_path, pruner="median")))
    worker = TrialWorker(pruned.model_dump(mode="json", by_alias=True))
    params = pruned.baselines()[0]
    low = worker.run(params, seed=1, prune_below=10.0)  # no candidate reaches a combined score of 10
    assert low.state == "pruned" and low.subset is not None and not low.metrics
    staged = worker.run(params, seed=1, prune_below=-10.0)
    assert staged.state == "complete" and staged.subset is not None
    plain = load_space(str(_test_space(tmp_path, pruner="none")))
    worker.space = plain
    whole = worker.run(params, seed=1)
    assert whole.state == "complete" and whole.subset is None
    for k, v in staged.metrics.items():
        if not k.startswith("time/"):
            assert whole.metrics[k] == pytest.approx(v, abs=1e-9), k


def test_a_timeout_leaves_no_trial_running_and_the_next_run_reuses_what_was_asked(test_zoo: Path, tmp_path: Path):
    """With two workers each worker's next candidate is asked ahead; when the study stops on its
    timeout, those never-started candidates are failed as interrupted (not counted) and enqueued, so
    the next run starts them first."""
    import optuna

    space = _test_space(tmp_path, n_trials=200, workers=2, timeout=4)
    run = tmp_path / "run"
    r = _optimize("--space", str(space), "--run-dir", str(run), "--no-export")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stopped at search.timeout (4 s)" in r.stderr and "resume with: optimize --space" in r.stderr  # even --quiet
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{run / 'study.db'}")
    S = optuna.trial.TrialState
    states = [t.state for t in study.trials]
    assert S.RUNNING not in states and states.count(S.COMPLETE) >= 2
    unstarted = [t for t in study.trials if t.user_attrs.get("reason", "").startswith("not started")]
    waiting = [t for t in study.trials if t.state == S.WAITING]
    assert unstarted  # each busy worker had its next candidate asked when the time ran out
    queued = {tuple(sorted(t.system_attrs["fixed_params"].items())) for t in waiting}
    assert {tuple(sorted(t.params.items())) for t in unstarted} <= queued
    assert all(t.user_attrs.get("interrupted") for t in unstarted)


def test_resuming_with_a_different_space_is_refused(test_zoo: Path, tmp_path: Path):
    space = _test_space(tmp_path, n_trials=1, workers=1)
    run = tmp_path / "run"
    r = run_cli("optimize", "--space", str(space), "--run-dir", str(run), "--backend", "inline", "--quiet", "--no-export")
    assert r.returncode == 0, r.stderr[-2000:]
    data = yaml.safe_load(space.read_text())
    data["ranges"]["weight"]["high"] = 2.0
    space.write_text(yaml.safe_dump(data))
    r = run_cli("optimize", "--space", str(space), "--run-dir", str(run), "--backend", "inline", "--quiet")
    assert r.returncode == 2 and "made by a different search space" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("path", sorted(SPACES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_template_passes_dry_run_up_to_its_missing_models(path: Path, tmp_path: Path):
    """The templates name model folders of another machine (/models/...): their schema and search space
    pass, and the dry run then stops on the first missing folder, as on a machine without the models."""
    r = run_cli("optimize", "--space", str(path), "--dry-run", "--run-dir", str(tmp_path / "run"))
    assert "search space" in r.stdout
    if path.name == "safety_multilingual.yaml":  # the embedded zoo's study
        assert r.returncode == 0, r.stderr
        assert "every check passed" in r.stdout
    else:
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "/models/" in lines[0] and "model folder not found" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_bare_space_name_is_looked_up_in_search_spaces():
    r = run_cli("optimize", "--space", "safety_multilingual", "--dry-run")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda d: d["models"][2].update({"langauge": "es"}), "models[2].langauge: unknown key; did you mean 'language'?"),
        (lambda d: d.update({"methds": ["ties"]}), "methds: unknown key; did you mean 'methods'?"),
        (lambda d: d["ranges"].update({"weight": {"low": 2, "high": 1}}), "ranges.weight"),
        (lambda d: d.update({"methods": ["tiez"]}), "unknown merge method 'tiez'; did you mean 'ties'?"),
        (lambda d: d["search"].update({"sampler": "tpee"}), "search.sampler"),
        (lambda d: d["search"].update({"seed": -1}), "search.seed"),
        (lambda d: d["ranges"].update({"layer_wise": ["lambda"]}), "ranges.layer_wise"),
        (lambda d: d["evaluation"]["judge"].update({"kind": "gpt"}) if "judge" in d["evaluation"]
         else d["evaluation"].update({"judge": {"kind": "gpt"}}), "evaluation.judge.kind"),
        (lambda d: d.update({"combined": "helpfulness - harmm"}), "unknown metric 'harmm'"),
        (lambda d: d["objectives"].append({"metric": "latency", "direction": "minimize"}), "objectives[2].metric"),
    ],
)
def test_space_errors_name_the_key_path(edit, fragment, tmp_path: Path):
    data = yaml.safe_load((SPACES_DIR / "safety_multilingual.yaml").read_text())
    edit(data)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    r = run_cli("optimize", "--space", str(p), "--dry-run")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert str(p) in lines[0] and fragment in lines[0], lines[0]


def test_schema_is_json_schema():
    r = run_cli("schema")
    schema = json.loads(r.stdout)
    assert schema["type"] == "object" and {"name", "base_model", "models"} <= set(schema["properties"])


def test_a_study_recorded_under_other_merge_rules_is_read_but_not_resumed(test_zoo: Path, tmp_path: Path):
    """When the merge rules change (DARE's masks did), a recipe and seed give other weights: an older
    study cannot be resumed or exported exactly, so it is refused with a one-line reason, and its
    results can still be read."""
    from mergeopt.errors import UserError
    from mergeopt.loop.store import MERGE_RULES, open_study
    from mergeopt.space import load_space

    space = load_space(str(_test_space(tmp_path)))
    run = tmp_path / "run"
    study = open_study(space, run)
    assert study.user_attrs["merge_rules"] == MERGE_RULES
    study.set_user_attr("merge_rules", MERGE_RULES - 1)
    with pytest.raises(UserError, match=f"merge rules version {MERGE_RULES - 1}"):
        open_study(space, run)
    assert open_study(space, run, merging=False).user_attrs["merge_rules"] == MERGE_RULES - 1


@pytest.mark.parametrize("sampler", ["tpe", "gp", "surrogate"])
def test_enqueued_baselines_do_not_starve_the_method_categorical(sampler: str):
    """The baselines all use the first method; a model-based sampler that counted them as its start-up
    trials never tried another method (TPE: 80 of 80 task_arithmetic over 20 seeds). Here every seed
    tries at least two methods after the baselines."""
    import random

    import optuna

    from mergeopt.loop.samplers import directions, make_sampler
    from mergeopt.space import load_space

    base = load_space("safety_multilingual")
    for seed in range(5):
        space = base.model_copy(update={"search": base.search.model_copy(update={"sampler": sampler, "n_trials": 20,
                                                                                 "seed": seed})})
        study = optuna.create_study(sampler=make_sampler(space), directions=directions(space))
        for params in space.baselines():
            study.enqueue_trial(params)
        rng, methods = random.Random(seed), []
        for _ in range(20 if sampler == "tpe" else 14):
            trial = study.ask(space.distributions())
            methods.append(trial.params["method"])
            study.tell(trial, [rng.random() for _ in directions(space)])
        assert len(set(methods[len(space.baselines()):])) >= 2, (seed, methods)


def test_paths_in_a_space_file_resolve_against_its_folder(test_zoo: Path, tmp_path: Path, monkeypatch):
    import shutil

    from mergeopt.space import load_space

    folder = tmp_path / "project"
    (folder / "prompts").mkdir(parents=True)
    shutil.copy(test_zoo / "eval" / "data" / "harmful_en_validation.jsonl", folder / "prompts" / "harmful.jsonl")
    data = yaml.safe_load((SPACES_DIR / "safety_multilingual.yaml").read_text())
    data.update(base_model="models/base", output="runs/here")
    data["models"] = [{"path": "models/en"}, {"path": "zoo-test:safety"}]
    (folder / "models").mkdir()
    (folder / "models" / "en").symlink_to(test_zoo / "models" / "help_en")  # its name stays en
    data["evaluation"] = {"validation": {"harmful": {"en": "prompts/harmful.jsonl"}}, "chat_template": "{prompt}"}
    data["ranges"].pop("per_model", None)
    space_file = folder / "space.yaml"
    space_file.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    space = load_space(str(space_file))
    assert space.base_model == str(folder / "models" / "base")
    assert [m.path for m in space.models] == [str(folder / "models" / "en"), "zoo-test:safety"]
    assert space.models[0].key == "en"
    assert space.evaluation.validation.harmful["en"] == str(folder / "prompts" / "harmful.jsonl")
    assert space.run_dir == folder / "runs" / "here"


def test_a_grid_study_records_its_last_grid_point(tmp_path: Path):
    """Optuna's grid sampler calls study.stop() after the last grid point, which raises outside
    Study.optimize; the driver records the trial and stops by its own count."""
    import optuna

    from mergeopt.loop.store import ask, finished, open_study, record
    from mergeopt.result import TrialResult
    from mergeopt.space import load_space

    base = load_space("safety_multilingual")
    space = base.model_copy(update={"methods": ["task_arithmetic"], "search": base.search.model_copy(
        update={"sampler": "grid", "grid_points": 2, "baselines": False})})
    space = type(space).model_validate(space.model_dump(mode="json", by_alias=True))
    study = open_study(space, tmp_path / "run")
    size = 1
    for d in space.distributions().values():
        size *= len(d.choices) if isinstance(d, optuna.distributions.CategoricalDistribution) else 2
    metrics = {"helpfulness": 0.5, "harm": 0.1, "over_refusal": 0.0, "unusable": 0.0, "combined": 0.4}
    for _ in range(size):
        record(space, study, ask(space, study), TrialResult(state="complete", metrics=metrics), 0.1)
    assert len(finished(study)) == size


def test_every_field_of_the_space_schema_has_a_description():
    """The space-file reference is generated from the schema, so every key must say what it is for."""
    from mergeopt.space import Space

    schema = Space.model_json_schema()
    models = {"Space": schema, **schema.get("$defs", {})}
    bare = [f"{name}.{key}" for name, m in models.items() for key, f in m.get("properties", {}).items()
            if not f.get("description")]
    assert not bare, bare


def test_layer_wise_density_is_one_parameter_per_expert_and_group_and_reaches_the_recipe():
    from mergeopt.space import Space, load_space

    data = load_space("safety_multilingual").model_dump(mode="json", by_alias=True)
    data["ranges"].update({"layer_groups": 4, "layer_wise": ["weight", "density"]})
    space = Space.model_validate(data)
    names = list(space.distributions())
    assert sum(n.startswith("weight/help_en/") for n in names) == 4
    assert sum(n.startswith("density/safety/") for n in names) == 4
    assert "density/safety" not in names
    params = {n: (0.5 if n != "method" else "ties") for n in names}
    params.update({f"density/safety/{g}": 0.2 + 0.2 * g for g in range(4)})
    recipe = space.recipe(params, seed=0)
    safety = next(m for m in recipe.models if m.model == "zoo:safety")
    assert safety.parameters["density"] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert len(space.baselines()) == 5 and all(len(b) == len(names) for b in space.baselines())
