"""The merge engine end to end on the test zoo: streamed and in-memory merges agree, a recipe gives
identical bytes in two processes, sharded folders round-trip, and bad input fails cleanly."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mergeopt.checkpoints import Checkpoint
from mergeopt.merge import ResidentMerger, merge_to_folder, open_models
from mergeopt.recipe import Recipe

RECIPES = {
    "linear": {"merge_method": "linear", "models": [{"model": "M/help_en", "parameters": {"weight": 0.5}},
                                                     {"model": "M/safety", "parameters": {"weight": 0.5}}]},
    "ties": {"merge_method": "ties", "base_model": "M/base", "parameters": {"density": 0.4},
             "models": [{"model": "M/help_en", "parameters": {"weight": 0.7}, "language": "en"},
                        {"model": "M/help_fr", "parameters": {"weight": [0.2, 0.9]}, "language": "fr"},
                        {"model": "M/safety", "parameters": {"weight": 1.0}, "objective": "safety"}],
             "language_coefficients": {"fr": 1.5}},
    "dare_ties": {"merge_method": "dare_ties", "base_model": "M/base", "seed": 11,
                  "models": [{"model": "M/help_es", "parameters": {"weight": 0.8, "density": 0.3}},
                             {"model": "M/safety", "parameters": {"weight": 1.0, "density": 0.5}}]},
    "slerp": {"merge_method": "slerp", "base_model": "M/base", "parameters": {"t": [0.2, 0.8]},
              "models": [{"model": "M/base"}, {"model": "M/help_en"}]},
}


def _recipe(name: str, zoo: Path) -> dict:
    return json.loads(json.dumps(RECIPES[name]).replace("M/", f"{zoo}/models/"))


def _write(tmp: Path, data: dict, name: str = "recipe.yaml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(data))
    return p


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergeopt.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_resident_merge_equals_streamed_merge(name, test_zoo: Path, tmp_path: Path):
    recipe = Recipe.model_validate(_recipe(name, test_zoo))
    out = merge_to_folder(recipe, tmp_path / "out")
    base, experts = open_models(recipe)
    model = AutoModelForCausalLM.from_pretrained(base.path)
    ResidentMerger(base, experts).merge_into(model, recipe)
    written = load_file(out / "model.safetensors")
    state = model.state_dict()
    for k, v in written.items():
        assert torch.equal(state[k], v), k
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_recipe_merged_in_two_processes_gives_identical_bytes(test_zoo: Path, tmp_path: Path):
    recipe = _write(tmp_path, _recipe("dare_ties", test_zoo))
    for out in ("a", "b"):
        r = _cli("merge", str(recipe), "--out", str(tmp_path / out))
        assert r.returncode == 0, r.stderr
    assert _sha(tmp_path / "a" / "model.safetensors") == _sha(tmp_path / "b" / "model.safetensors")
    other = _recipe("dare_ties", test_zoo) | {"seed": 12}
    assert _cli("merge", str(_write(tmp_path, other, "r2.yaml")), "--out", str(tmp_path / "c")).returncode == 0
    assert _sha(tmp_path / "a" / "model.safetensors") != _sha(tmp_path / "c" / "model.safetensors")


def test_sharded_output_loads_and_is_read_back_as_input(test_zoo: Path, tmp_path: Path):
    recipe = Recipe.model_validate(_recipe("ties", test_zoo))
    one = merge_to_folder(recipe, tmp_path / "one")
    many = merge_to_folder(recipe, tmp_path / "many", max_shard_bytes=200_000)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a = AutoModelForCausalLM.from_pretrained(one).state_dict()
    b = AutoModelForCausalLM.from_pretrained(many).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ck = Checkpoint(many)
    assert ck.names == Checkpoint(one).names
    ta = Recipe.model_validate({"merge_method": "task_arithmetic", "base_model": str(many),
                                "models": [{"model": str(test_zoo / "models" / "safety"), "parameters": {"weight": 0.0}}]})
    again = merge_to_folder(ta, tmp_path / "again")
    assert _sha(again / "model.safetensors") == _sha(one / "model.safetensors")


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _bad_cases(zoo: Path, tmp: Path) -> list[tuple[str, dict | str, str]]:
    """(case, recipe dict or raw YAML text, expected fragment of the one-line message)."""
    good = _recipe("ties", zoo)
    base = zoo / "models" / "base"

    shape = _copy_model(zoo / "models" / "help_en", tmp / "shape")
    sd = load_file(shape / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(7)
    save_file(sd, str(shape / "model.safetensors"), metadata={"format": "pt"})

    names = _copy_model(zoo / "models" / "help_en", tmp / "names")
    sd = load_file(names / "model.safetensors")
    sd.pop("model.norm.weight")
    save_file(sd, str(names / "model.safetensors"), metadata={"format": "pt"})

    nan = _copy_model(zoo / "models" / "help_en", tmp / "nan")
    sd = load_file(nan / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(nan / "model.safetensors"), metadata={"format": "pt"})

    vocab = _copy_model(zoo / "models" / "help_en", tmp / "vocab")
    cfg = json.loads((vocab / "config.json").read_text())
    cfg["vocab_size"] += 5
    (vocab / "config.json").write_text(json.dumps(cfg))

    pickle = tmp / "pickle"
    pickle.mkdir()
    shutil.copy(base / "config.json", pickle / "config.json")
    torch.save(load_file(base / "model.safetensors"), pickle / "pytorch_model.bin")

    remote = _copy_model(zoo / "models" / "help_en", tmp / "remote")
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (remote / "config.json").write_text(json.dumps(cfg))

    def with_model(path: Path) -> dict:
        r = json.loads(json.dumps(good))
        r["models"][0]["model"] = str(path)
        return r

    return [
        ("shape", with_model(shape), "model.norm.weight has shape [7], expected [64]"),
        ("names", with_model(names), "tensor model.norm.weight is missing"),
        ("nan", with_model(nan), "model.layers.0.mlp.up_proj.weight holds NaN or inf"),
        ("vocab", with_model(vocab), "vocab_size is"),
        ("pickle", with_model(pickle), "pickle checkpoint refused"),
        ("remote", with_model(remote), "--trust-remote-code"),
        ("missing", with_model(tmp / "nowhere"), "model folder not found"),
        ("method", good | {"merge_method": "tiez"}, "unknown merge method 'tiez'"),
        ("param", good | {"parameters": {"densty": 0.4}}, "unknown parameter 'densty'"),
        ("model_param", {**good, "models": [{**good["models"][0], "parameters": {"weight": 1, "gama": 2}}]},
         "unknown per-model parameter 'gama'"),
        ("key", good | {"merge_methd": "ties"}, "merge_methd: unknown key; did you mean 'merge_method'?"),
        ("yaml", "merge_method: ties\nmodels: [\n", "malformed YAML"),
        ("slerp3", _recipe("ties", zoo) | {"merge_method": "slerp", "parameters": {"t": 0.5}}, "takes exactly 1 model"),
        ("weight", {**good, "models": [{"model": good["models"][0]["model"]}]}, "needs per-model parameter 'weight'"),
    ]


def test_bad_input_gives_one_line_exit_2_and_writes_nothing(test_zoo: Path, tmp_path: Path):
    cases = _bad_cases(test_zoo, tmp_path)
    for case, data, fragment in cases:
        path = tmp_path / f"{case}.yaml"
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        out = tmp_path / f"out-{case}"
        r = run_cli("merge", str(path), "--out", str(out))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (case, r.stderr)
        assert len(lines) == 1 and fragment in lines[0], (case, r.stderr)
        assert "Traceback" not in r.stderr
        assert not out.exists() and not list(tmp_path.glob(f".out-{case}*")), case


def test_pickle_allowed_with_flag(test_zoo: Path, tmp_path: Path):
    base = test_zoo / "models" / "base"
    pickle = tmp_path / "pickle"
    pickle.mkdir()
    shutil.copy(base / "config.json", pickle / "config.json")
    torch.save(load_file(base / "model.safetensors"), pickle / "pytorch_model.bin")
    r = _recipe("ties", test_zoo)
    r["models"][0]["model"] = str(pickle)
    path = _write(tmp_path, r)
    res = run_cli("merge", str(path), "--out", str(tmp_path / "o"), "--allow-pickle")
    assert res.returncode == 0, res.stderr


def test_mergekit_slices_form_gives_the_same_bytes_as_the_models_form(test_zoo: Path, tmp_path: Path):
    """mergekit-evolve and many published configs write one slice spanning every layer, list the base
    among the sources, and set int8_mask and tokenizer_source: base; that is the same merge."""
    models = test_zoo / "models"
    layers = json.loads((models / "base" / "config.json").read_text())["num_hidden_layers"]
    plain = {"merge_method": "ties", "base_model": str(models / "base"), "dtype": "float32",
             "models": [{"model": str(models / "help_en"), "parameters": {"weight": 0.7, "density": 0.5}},
                        {"model": str(models / "safety"), "parameters": {"weight": 0.4, "density": 0.5}}]}
    sliced = {"merge_method": "ties", "base_model": str(models / "base"), "dtype": "float32",
              "tokenizer_source": "base", "parameters": {"int8_mask": True},
              "slices": [{"sources": [{"model": str(models / "base"), "layer_range": [0, layers]},
                                      *[{**m, "layer_range": [0, layers]} for m in plain["models"]]]}]}
    out = {}
    for name, data in (("plain", plain), ("sliced", sliced)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
        r = run_cli("merge", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        out[name] = (tmp_path / name / "model.safetensors").read_bytes()
    assert out["plain"] == out["sliced"]


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda d, n: d["slices"][0]["sources"][0].update(layer_range=[0, n - 1]), "covers part of"),
    (lambda d, n: d["slices"].append(d["slices"][0]), "slices: mergeopt merges whole models"),
    (lambda d, n: d.update(tokenizer_source="union"), "tokenizer_source: 'union' is not supported"),
    (lambda d, n: d.update(merge_methd=d.pop("merge_method")), "merge_methd: unknown key; did you mean 'merge_method'?"),
])
def test_mergekit_forms_that_change_the_weights_are_refused_in_one_line(edit, fragment, test_zoo: Path, tmp_path: Path):
    models = test_zoo / "models"
    layers = json.loads((models / "base" / "config.json").read_text())["num_hidden_layers"]
    data = {"merge_method": "task_arithmetic", "base_model": str(models / "base"),
            "slices": [{"sources": [{"model": str(models / "help_en"), "layer_range": [0, layers],
                                     "parameters": {"weight": 1.0}}]}]}
    edit(data, layers)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    r = run_cli("merge", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and fragment in lines[0], r.stderr
    assert not (tmp_path / "out").exists()
