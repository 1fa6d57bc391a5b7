"""Export: the winner's folder reproduces the recorded metrics, bytes are stable, the mergekit config
gives the same weights, a killed export leaves no folder, and the card's front matter is YAML."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import ZOO_FORMAT, run_cli, task_folder
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeopt.errors import UserError
from mergeopt.export import verify_manifest
from mergeopt.pick import pick
from mergeopt.space import SPACES_DIR, Space


def _cli(*args: str):
    return run_cli(*args)


@pytest.fixture(scope="module")
def run(test_zoo: Path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("export")
    data = yaml.safe_load((SPACES_DIR / "safety_multilingual.yaml").read_text())
    data.update(name="exp", base_model="zoo-test:base")
    for m in data["models"]:
        m["path"] = m["path"].replace("zoo:", "zoo-test:")
    data["evaluation"]["zoo"] = "test"
    data["search"].update(n_trials=6, workers=1)
    space = tmp / "space.yaml"
    space.write_text(yaml.safe_dump(data))
    r = _cli("optimize", "--space", str(space), "--run-dir", str(tmp / "run"), "--backend", "inline", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp / "run"


def test_optimize_exports_best_and_it_reproduces_the_recorded_metrics(run: Path):
    from mergeopt.evaluation.assets import resolve_assets
    from mergeopt.evaluation.evaluator import Evaluator

    best = run / "best"
    for f in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "README.md",
              "mergeopt_recipe.yaml", "results.json", "mergeopt_trial.json", "manifest.json", "pareto.png"):
        assert (best / f).exists(), f
    assert verify_manifest(best) == []
    sub = json.loads((best / "mergeopt_trial.json").read_text())
    space = Space.model_validate(json.loads((run / "space.json").read_text()))
    study = optuna.load_study(study_name=space.name, storage=f"sqlite:///{run / 'study.db'}")
    recorded = study.trials[sub["trial"]].user_attrs["metrics"]
    model = AutoModelForCausalLM.from_pretrained(best).eval()
    tok = AutoTokenizer.from_pretrained(best)
    got = Evaluator(model, tok, resolve_assets(space.evaluation, "validation")).evaluate()
    for k, v in recorded.items():
        if not k.startswith("time/") and k != "combined":
            assert got[k] == v, k
    assert sub["test"]["helpfulness"] >= 0 and sub["how"].startswith("picked from the Pareto front")
    results = json.loads((best / "results.json").read_text())
    assert any(k.startswith("zoo_help_en_test") for k in results["results"])


def test_model_card_front_matter_is_yaml(run: Path):
    text = (run / "best" / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "transformers" and {"merge", "mergeopt"} <= set(meta["tags"]) and "base_model" in meta
    assert "| metric | validation | test |" in text


def test_exporting_twice_gives_identical_bytes_and_refuses_to_overwrite(run: Path, tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _cli("export", str(run), "--trial", "0", "--out", str(a)).returncode == 0
    assert _cli("export", str(run), "--trial", "0", "--out", str(b)).returncode == 0
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    r = _cli("export", str(run), "--trial", "0", "--out", str(a))
    assert r.returncode == 2 and "exists; pass --force" in r.stderr


def test_mergekit_config_merged_by_mergeopt_gives_the_same_weights(run: Path, tmp_path: Path):
    out = tmp_path / "t0"
    assert _cli("export", str(run), "--trial", "0", "--out", str(out)).returncode == 0  # uniform average: task arithmetic
    again = tmp_path / "again"
    r = _cli("merge", str(out / "mergekit_config.yml"), "--out", str(again))
    assert r.returncode == 0, r.stderr
    a, b = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


def test_killed_export_leaves_no_folder(run: Path, tmp_path: Path):
    out = tmp_path / "killed"
    for delay in (1.0, 2.5, 4.0):
        p = subprocess.Popen([sys.executable, "-m", "mergeopt.cli", "export", str(run), "--trial", "1", "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert not out.exists() or verify_manifest(out) == []  # never a partial folder under the final name
        if out.exists():
            break
    r = _cli("export", str(run), "--trial", "1", "--out", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert verify_manifest(out) == [] and not list(tmp_path.glob(".killed.tmp-*"))


def _study(points: list[tuple[float, float, float]]) -> tuple[Space, optuna.Study]:
    space = Space.model_validate(yaml.safe_load((SPACES_DIR / "safety_multilingual.yaml").read_text()))
    study = optuna.create_study(directions=["maximize", "minimize"])
    for help_, harm, comb in points:
        t = optuna.trial.create_trial(values=[help_, harm], user_attrs={"metrics": {"helpfulness": help_, "harm": harm,
                                                                                      "combined": comb}})
        study.add_trial(t)
    return space, study


def test_pick_rules():
    space, study = _study([(0.9, 0.8, 0.1), (0.7, 0.2, 0.5), (0.5, 0.05, 0.45), (0.2, 0.0, 0.2), (0.4, 0.5, -0.1)])
    assert pick(space, study, "combined").number == 1
    assert pick(space, study, "harm <= 0.05").number == 2
    assert pick(space, study, "knee").number in (1, 2)
    with pytest.raises(UserError, match="no front member satisfies"):
        pick(space, study, "harm < 0")
    with pytest.raises(UserError, match="cannot read"):
        pick(space, study, "best please")
    space2, study2 = _study([(0.5, 0.1, 0.4), (0.5, 0.1, 0.4)])  # exact tie: the lower trial number wins
    assert pick(space2, study2, "combined").number == 0


def test_exported_files_are_readable_by_others_and_config_names_dtype(run: Path):
    """safetensors writes its files as 0600; a folder to publish must be readable like a plain copy.
    transformers 5 reads `dtype`; `torch_dtype` is deprecated."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    best = run / "best"
    assert (best / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert best.stat().st_mode & 0o777 == 0o777 & ~mask
    cfg = json.loads((best / "config.json").read_text())
    assert "dtype" in cfg and "torch_dtype" not in cfg


def test_the_card_and_the_command_say_how_the_trial_was_chosen(run: Path, tmp_path: Path):
    r = _cli("export", str(run), "--pick", "harm <= 1.0", "--out", str(tmp_path / "picked"))
    assert r.returncode == 0, r.stderr
    trial = json.loads((tmp_path / "picked" / "mergeopt_trial.json").read_text())["trial"]
    assert f"exported trial {trial} (by pick rule 'harm <= 1.0')" in r.stdout
    assert "picked from the Pareto front by rule `harm <= 1.0`" in (tmp_path / "picked" / "README.md").read_text()
    r = _cli("export", str(run), "--trial", "0", "--out", str(tmp_path / "zero"))
    assert r.returncode == 0 and "exported trial 0 (trial 0)" in r.stdout, r.stderr
    card = (tmp_path / "zero" / "README.md").read_text()
    assert "chosen by its number (`--trial 0`)" in card and "picked from the Pareto front" not in card


def test_no_claim_about_every_single_expert_until_each_has_been_scored(test_zoo: Path, tmp_path: Path):
    """With 2 trials only the uniform average and the first expert alone have run."""
    from conftest import zoo_test_space

    space = zoo_test_space(tmp_path, "fewbaselines", n_trials=2, workers=1)
    r = _cli("optimize", "--space", str(space), "--run-dir", str(tmp_path / "run"), "--backend", "inline", "--no-export")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["single_experts_scored"] == 1 and summary["merge_beats_every_single_expert"] is False
    assert "every single expert" not in r.stdout and "the 1 of 4 single experts scored so far" in r.stdout


def test_an_export_that_is_mostly_unusable_is_flagged(tmp_path: Path, capsys):
    """A pick rule on harm alone can choose a model that neither refuses nor answers (harm 0)."""
    from mergeopt.cli import _warn_unusable

    for share, warned in ((1.0, True), (0.2, False)):
        (tmp_path / "mergeopt_trial.json").write_text(json.dumps({"trial": 7, "validation": {"harm": 0.0, "unusable": share}}))
        _warn_unusable(tmp_path)
        err = capsys.readouterr().err
        assert ("trial 7: 100% of its responses are unusable" in err) is warned, err


def test_exported_recipes_name_absolute_folders_never_zoo_references(run: Path):
    """They must run from anywhere: from the export folder itself, on another machine with the same
    folders, or through mergekit-yaml."""
    for name in ("mergeopt_recipe.yaml", "mergekit_config.yml"):
        path = run / "best" / name
        if not path.exists():
            continue
        data = yaml.safe_load(path.read_text())
        refs = [data.get("base_model"), *(m["model"] for m in data["models"])]
        for ref in filter(None, refs):
            assert not ref.startswith("zoo") and Path(ref).is_absolute() and Path(ref).is_dir(), (name, ref)


def test_a_recipe_runs_from_another_folder_with_relative_paths(test_zoo: Path, tmp_path: Path, monkeypatch):
    import shutil

    from mergeopt.recipe import load_recipe

    (tmp_path / "recipes" / "models").mkdir(parents=True)
    for name in ("base", "help_en"):
        shutil.copytree(test_zoo / "models" / name, tmp_path / "recipes" / "models" / name)
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": "models/base",
                                      "models": [{"model": "models/help_en", "parameters": {"weight": 0.5}}]}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_recipe(recipe)
    assert loaded.base_model == str(tmp_path / "recipes" / "models" / "base")
    r = _cli("merge", str(recipe), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr


def test_eval_takes_a_zoo_reference(test_zoo: Path, tmp_path: Path):
    from conftest import zoo_test_space

    r = _cli("eval", "zoo-test:safety", "--space", str(zoo_test_space(tmp_path, "evalzoo")), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["harm"] <= 0.1


def test_lm_eval_cli_on_the_export_reproduces_results_json(run: Path, tmp_path: Path):
    """lm-eval's own CLI, run in the exported folder with the command results.json (and the card) gives,
    reports the same helpfulness values under the same task and metric names."""
    best = run / "best"
    ours = json.loads((best / "results.json").read_text())
    cmd = ours["config"]["lm_eval_command"]
    assert cmd[:2] == ["lm_eval", "run"] and "--apply_chat_template" in cmd and " ".join(cmd) in (best / "README.md").read_text()
    r = subprocess.run([sys.executable, "-m", "lm_eval", *cmd[1:], "--device", "cpu", "--batch_size", "64",
                        "--output_path", str(tmp_path / "out")], cwd=best, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    compared = 0
    for task, values in ours["results"].items():
        if task.startswith("mergeopt_"):
            continue
        for metric, value in values.items():
            if metric != "alias":
                assert theirs[task][metric] == pytest.approx(value, abs=1e-9), (task, metric)
                compared += 1
    assert compared == 3  # one task per language in the zoo's space


def test_eval_results_name_the_hub_dataset_of_each_task_and_group(test_zoo: Path, tmp_path: Path):
    """`.eval_results` entries: a task whose YAML names its Hub dataset, and a group whose tasks share one;
    a task without one gets none."""
    from mergeopt.evaluation.assets import resolve_assets
    from mergeopt.evaluation.evaluator import Evaluator
    from mergeopt.export import eval_results
    from mergeopt.space import EvaluationConfig

    folder = task_folder(test_zoo, tmp_path)
    spec = yaml.safe_load((folder / "zoo_help_fr_validation.yaml").read_text())
    del spec["metadata"]["hub_dataset"]
    (folder / "zoo_help_fr_validation.yaml").write_text(yaml.safe_dump(spec))
    cfg = EvaluationConfig(include_path=str(folder), chat_template=ZOO_FORMAT,
                           test={"tasks": {"en": ["zoo_help_en_group"], "fr": "zoo_help_fr_validation"}})
    path = test_zoo / "models" / "help_en"
    ev = Evaluator(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                   resolve_assets(cfg, "test"))
    metrics = ev.evaluate()
    out = eval_results(ev, metrics)
    assert list(out) == ["zoo_help_en_group"]
    [entry] = out["zoo_help_en_group"]
    assert entry["dataset"] == {"id": "example/zoo-help-en", "task_id": "zoo_help_en_group"}
    assert entry["value"] == round(metrics["lm_eval/zoo_help_en_group/exact_match,strip"], 6)
