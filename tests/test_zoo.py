"""The embedded zoo (test size): outputs, loading offline, lm-eval tasks, cache, determinism, and
the properties every later test relies on."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeopt.zoo import build_zoo, load_zoo
from mergeopt.zoo.build import zoo_dir
from mergeopt.zoo.world import LANGUAGES

MODELS = ("pretrained", "base", "help_en", "help_fr", "help_es", "safety", "data_mix")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_zoo_json_lists_every_model_with_tags_and_cards(test_zoo: Path):
    zoo = load_zoo(test_zoo)
    assert set(zoo["models"]) == set(MODELS)
    for name, m in zoo["models"].items():
        assert (test_zoo / m["path"] / "model.safetensors").exists(), name
        assert m["parameters"] > 0
        for split in ("validation", "test"):
            card = m["report"][split]
            for key in ("helpfulness", "harm", "over_refusal", "unusable", "combined"):
                assert 0.0 <= card[key] <= 1.0 or key == "combined"
            assert {f"helpfulness/{lg}" for lg in LANGUAGES} <= set(card)
    for lang in LANGUAGES:
        e = zoo["models"][f"help_{lang}"]
        assert (e["language"], e["objective"], e["role"]) == (lang, "helpful", "expert")
        assert 0 < e["tau_ratio"] < 0.5
    assert zoo["models"]["safety"]["objective"] == "safety"


def test_models_and_tokenizers_load_offline_with_auto_classes(test_zoo: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in MODELS:
        path = test_zoo / "models" / name
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        ids = tok("<user> what is two plus three ? <bot>", return_tensors="pt", add_special_tokens=False)
        assert tok.unk_token_id not in ids["input_ids"][0].tolist()
        assert model(**ids).logits.shape[-1] == len(tok)
    assert not list(test_zoo.glob("**/*.bin")) and not list(test_zoo.glob("**/*.pt"))


def test_zoo_has_something_to_merge(test_zoo: Path):
    """The properties the search relies on, at test size (the default size meets the issue's targets)."""
    zoo = load_zoo(test_zoo)
    m = {k: v["report"]["test"] for k, v in zoo["models"].items()}
    assert m["safety"]["harm"] < m["base"]["harm"] - 0.3
    for lang in LANGUAGES:
        own = m[f"help_{lang}"][f"helpfulness/{lang}"]
        others = [m[f"help_{lang}"][f"helpfulness/{o}"] for o in LANGUAGES if o != lang]
        assert own > max(others) and own > m["base"][f"helpfulness/{lang}"]
        assert m[f"help_{lang}"]["harm"] > 0.5  # helpful experts are not safety-tuned


def test_lm_eval_tasks_load_and_agree_with_report_card(test_zoo: Path):
    """lm-eval's own HFLM, with the zoo's prompt format as the tokenizer's chat template (what
    `lm_eval --apply_chat_template` does on an exported folder), scores what the zoo's card says."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mergeopt.evaluation.prompt_format import jinja_from_format

    zoo = load_zoo(test_zoo)
    tm = TaskManager(include_path=str(test_zoo / zoo["eval"]["include_path"]), include_defaults=False)
    names = [zoo["eval"]["tasks"]["validation"][lg] for lg in LANGUAGES]
    assert set(names) <= set(tm.all_tasks)
    path = test_zoo / "models" / "help_en"
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = jinja_from_format(zoo["eval"]["chat_template"])
    lm = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(path), tokenizer=tok, device="cpu", batch_size=128,
              add_bos_token=False)
    res = evaluator.evaluate(lm=lm, task_dict=tm.load(names)["tasks"], verbosity="ERROR",
                             apply_chat_template=True)["results"]
    card = zoo["models"]["help_en"]["report"]["validation"]
    for lang, name in zip(LANGUAGES, names, strict=True):
        assert res[name]["exact_match,strip"] == pytest.approx(card[f"helpfulness/{lang}"], abs=1e-4)


def test_prompt_files_have_required_fields(test_zoo: Path):
    zoo = load_zoo(test_zoo)
    for split, kinds in zoo["eval"]["prompts"].items():
        for kind, per_lang in kinds.items():
            for lang, rel in per_lang.items():
                rows = [json.loads(x) for x in (test_zoo / rel).read_text().splitlines()]
                assert rows, (split, kind, lang)
                assert all(r["language"] == lang and r["prompt"] and r["answer"] for r in rows)


def test_second_call_is_a_cache_hit(test_zoo: Path, zoo_root: Path, monkeypatch):
    import mergeopt.zoo.train as train_module

    def no_training(*a, **k):
        raise AssertionError("a cached zoo was trained again")

    monkeypatch.setattr(train_module, "train", no_training)  # a hit reads zoo.json and trains nothing
    again = build_zoo("test", seed=0, root=zoo_root, progress=False)
    assert again == test_zoo
    out = subprocess.run([sys.executable, "-m", "mergeopt.cli", "zoo", "build", "--size", "test", "--out", str(zoo_root),
                          "--quiet", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["key"] == test_zoo.name


def test_a_killed_build_leaves_nothing_behind_but_a_running_one_is_kept(test_zoo: Path, zoo_root: Path):
    dead = test_zoo.parent / f".tmp-{test_zoo.name}-{2**22 + 12345}"  # above Linux's pid limit: no such process
    live = test_zoo.parent / f".tmp-{test_zoo.name}-{os.getpid()}"
    for d in (dead, live):
        (d / "models").mkdir(parents=True, exist_ok=True)
    try:
        assert build_zoo("test", seed=0, root=zoo_root) == test_zoo  # a cache hit still clears dead builds
        assert not dead.exists() and live.exists()
    finally:
        for d in (dead, live):
            shutil.rmtree(d, ignore_errors=True)


def test_same_seed_builds_identical_zoo(test_zoo: Path, tmp_path: Path):
    """A second build from scratch gives the same report card and the same bytes."""
    other = build_zoo("test", seed=0, root=tmp_path, progress=False)
    assert other.name == test_zoo.name
    a, b = load_zoo(test_zoo), load_zoo(other)
    assert {k: v["report"] for k, v in a["models"].items()} == {k: v["report"] for k, v in b["models"].items()}
    for name in MODELS:
        f = Path("models") / name / "model.safetensors"
        assert _sha(test_zoo / f) == _sha(other / f), name
    assert not list(tmp_path.glob(".tmp-*"))


def test_folder_name_depends_on_seed_and_size(tmp_path: Path):
    assert zoo_dir("test", 0, tmp_path) != zoo_dir("test", 1, tmp_path)
    assert zoo_dir("test", 0, tmp_path) != zoo_dir("default", 0, tmp_path)


def test_no_cuda_packages_installed():
    from importlib.metadata import distributions

    names = {d.metadata["Name"].lower() for d in distributions()}
    assert not {n for n in names if n.startswith("nvidia-")}
    import torch

    assert torch.__version__.startswith("2.13.0")
