"""A corpus of bad inputs to `optimize`: each gets one line naming the file, key path or tensor and what
was expected, exit status 2, no traceback, and nothing written (no run folder)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli
from safetensors.torch import load_file, save_file

from mergeopt.space import SPACES_DIR


def _space_data(zoo: Path) -> dict:
    data = yaml.safe_load((SPACES_DIR / "safety_multilingual.yaml").read_text())
    data.update(name="bad", base_model=str(zoo / "models" / "base"))
    for m in data["models"]:
        m["path"] = str(zoo / "models" / m["path"].split(":")[1])
    data["evaluation"]["zoo"] = "test"
    data["search"].update(n_trials=2, workers=1)
    return data


def _model(zoo: Path, tmp: Path, name: str, edit: Callable[[dict], None] | None = None,
           cfg_edit: Callable[[dict], None] | None = None) -> str:
    dst = tmp / name
    shutil.copytree(zoo / "models" / "help_fr", dst)
    if edit:
        sd = load_file(dst / "model.safetensors")
        edit(sd)
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if cfg_edit:
        cfg = json.loads((dst / "config.json").read_text())
        cfg_edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def _pickle_only(zoo: Path, tmp: Path) -> str:
    dst = tmp / "pickle"
    dst.mkdir()
    shutil.copy(zoo / "models" / "help_fr" / "config.json", dst / "config.json")
    torch.save(load_file(zoo / "models" / "help_fr" / "model.safetensors"), dst / "pytorch_model.bin")
    return str(dst)


def _adapter(tmp: Path) -> str:
    """A PEFT LoRA adapter folder as PEFT writes it: adapter_config.json and adapter_model.safetensors."""
    dst = tmp / "adapter"
    dst.mkdir()
    (dst / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                         "target_modules": ["q_proj"], "base_model_name_or_path": "base"}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8)},
              str(dst / "adapter_model.safetensors"))
    return str(dst)


def _relative_task(zoo: Path, tmp: Path) -> str:
    """A task whose data_files is relative to its YAML's folder, which `datasets` does not read it from."""
    folder = tmp / "tasks"
    folder.mkdir()
    spec = yaml.safe_load((zoo / "eval" / "lm_eval" / "zoo_help_en_validation.yaml").read_text())
    spec.pop("tag", None)
    shutil.copy(spec["dataset_kwargs"]["data_files"]["validation"], folder / "rows.jsonl")
    spec.update(task="rel_task", dataset_kwargs={"data_files": {"validation": "rows.jsonl"}})
    (folder / "rel_task.yaml").write_text(yaml.safe_dump(spec))
    return str(folder)


def _lossy_tokenizer(zoo: Path, tmp: Path) -> str:
    """The base with tokenizer files that load but map every word to the unknown token: a study on it
    would score empty prompts to its end."""
    dst = tmp / "lossy"
    shutil.copytree(zoo / "models" / "base", dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {k: v for k, v in tok["model"]["vocab"].items() if k.startswith("<")}
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    return str(dst)


def _set(path: str, value):
    def edit(d: dict) -> None:
        keys = path.split(".")
        cur = d
        for k in keys[:-1]:
            cur = cur[int(k)] if isinstance(cur, list) else cur.setdefault(k, {})
        cur[keys[-1]] = value
    return edit


def _nan(sd: dict) -> None:
    sd["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")


def _inf(sd: dict) -> None:
    sd["lm_head.weight"][3, 3] = float("inf")


CASES: list[tuple[str, Callable, str]] = [
    # the space file itself
    ("malformed_yaml", lambda d, z, t: "name: [unclosed\n", "malformed YAML at line"),
    ("not_a_mapping", lambda d, z, t: "- just\n- a list\n", "expected a mapping at the top level"),
    ("unknown_top_key", lambda d, z, t: {**d, "methdos": ["ties"]}, "methdos: unknown key; did you mean 'methods'?"),
    ("unknown_model_key", lambda d, z, t: (d["models"][1].update(langauge="fr"), d)[1], "models[1].langauge: unknown key; did you mean 'language'?"),
    ("low_above_high", lambda d, z, t: (_set("ranges.weight", {"low": 2.0, "high": 1.0})(d), d)[1], "ranges.weight"),
    ("log_range_at_zero", lambda d, z, t: (_set("ranges.weight", {"low": 0.0, "high": 1.0, "log": True})(d), d)[1], "a log range needs low > 0"),
    ("unknown_method", lambda d, z, t: {**d, "methods": ["dare_tie"]}, "unknown merge method 'dare_tie'; did you mean 'dare_ties'?"),
    ("unknown_sampler", lambda d, z, t: (_set("search.sampler", "bayes")(d), d)[1], "search.sampler"),
    ("unknown_judge", lambda d, z, t: (_set("evaluation.judge", {"kind": "gpt4"})(d), d)[1], "evaluation.judge.kind"),
    ("unknown_combined_metric", lambda d, z, t: {**d, "combined": "helpfulness - harmfulness"}, "unknown metric 'harmfulness'"),
    ("unknown_objective", lambda d, z, t: {**d, "objectives": [{"metric": "bleu", "direction": "maximize"}]}, "objectives[0].metric"),
    ("bad_direction", lambda d, z, t: {**d, "objectives": [{"metric": "harm", "direction": "down"}]}, "objectives[0].direction"),
    ("bad_pick", lambda d, z, t: {**d, "pick": "the best one"}, "pick: cannot read 'the best one'"),
    ("duplicate_names", lambda d, z, t: {**d, "models": d["models"] + [d["models"][0]]}, "share the name"),
    ("per_model_unknown", lambda d, z, t: (_set("ranges.per_model", {"help_de": {"weight": 1.0}})(d), d)[1], "'help_de' names no model"),
    ("slerp_many", lambda d, z, t: {**d, "methods": ["slerp"]}, "slerp merges exactly one model"),
    ("zero_trials", lambda d, z, t: (_set("search.n_trials", 0)(d), d)[1], "search.n_trials"),
    ("subset_fraction", lambda d, z, t: (_set("evaluation.subset_fraction", 1.5)(d), d)[1], "evaluation.subset_fraction"),
    ("bad_name", lambda d, z, t: {**d, "name": "my study"}, "name:"),
    ("no_models", lambda d, z, t: {**d, "models": []}, "models:"),
    # the models
    ("missing_model", lambda d, z, t: (d["models"][0].update(path=str(t / "nowhere")), d)[1], "model folder not found"),
    ("shape_mismatch", lambda d, z, t: (d["models"][1].update(path=_model(z, t, "shape", lambda sd: sd.update(
        {"model.norm.weight": torch.ones(3)}))), d)[1], "tensor model.norm.weight has shape [3], expected [64]"),
    ("missing_tensor", lambda d, z, t: (d["models"][1].update(path=_model(z, t, "names", lambda sd: sd.pop("lm_head.weight"))), d)[1],
     "tensor lm_head.weight is missing"),
    ("vocab_mismatch", lambda d, z, t: (d["models"][1].update(path=_model(z, t, "vocab", cfg_edit=lambda c: c.update(
        vocab_size=c["vocab_size"] + 8))), d)[1], "vocab_size is"),
    ("architecture_mismatch", lambda d, z, t: (d["models"][1].update(path=_model(z, t, "arch", cfg_edit=lambda c: c.update(
        architectures=["MistralForCausalLM"]))), d)[1], "architectures is ['MistralForCausalLM']"),
    ("nan_weight", lambda d, z, t: (d["models"][1].update(path=_model(z, t, "nan", _nan)), d)[1],
     "model.layers.1.self_attn.q_proj.weight holds NaN or inf"),
    ("inf_weight", lambda d, z, t: (d["models"][1].update(path=_model(z, t, "inf", _inf)), d)[1], "lm_head.weight holds NaN or inf"),
    ("pickle_only", lambda d, z, t: (d["models"][1].update(path=_pickle_only(z, t)), d)[1], "pickle checkpoint refused"),
    ("remote_code", lambda d, z, t: (d["models"][1].update(path=_model(z, t, "remote", cfg_edit=lambda c: c.update(
        auto_map={"AutoModelForCausalLM": "x.Y"}))), d)[1], "pass --trust-remote-code"),
    # the evaluation
    ("prompt_missing_field", lambda d, z, t: (_write(t / "p.jsonl", '{"language": "en"}\n'), {**d, "evaluation": {
        "validation": {"harmful": {"en": str(t / "p.jsonl")}}}})[1], "p.jsonl:1: field 'prompt' is missing"),
    ("prompt_empty", lambda d, z, t: (_write(t / "e.jsonl", ""), {**d, "evaluation": {
        "validation": {"harmful": {"en": str(t / "e.jsonl")}}}})[1], "e.jsonl: empty prompt set"),
    ("unknown_task", lambda d, z, t: {**d, "evaluation": {"include_path": str(z / "eval" / "lm_eval"), "chat_template": "{prompt}",
                                                            "validation": {"tasks": {"en": "zoo_help_en_valid"}}}},
     "lm-eval does not know task 'zoo_help_en_valid'"),
    ("unknown_task_in_a_list", lambda d, z, t: {**d, "evaluation": {
        "include_path": str(z / "eval" / "lm_eval"), "chat_template": "{prompt}",
        "validation": {"tasks": {"en": ["zoo_help_en_validation", "zoo_help_en_valid"]}}}},
     "lm-eval does not know task 'zoo_help_en_valid'"),
    ("judge_missing", lambda d, z, t: (_set("evaluation.judge", {"kind": "classifier", "model": str(t / "nojudge")})(d), d)[1],
     "evaluation.judge.model"),
    ("too_many_workers", lambda d, z, t: (_set("search.workers", 500)(d), d)[1], "500 worker(s): this node's host memory needs"),
    # the prompt format and the judge
    ("no_chat_template", lambda d, z, t: (_write(t / "h.jsonl", '{"prompt": "how to x", "answer": "x"}\n'), {
        **d, "evaluation": {"validation": {"harmful": {"en": str(t / "h.jsonl")}}, "judge": {"refusal": {"en": ["no"]}}}})[1],
     "evaluation.chat_template: the tokenizer of"),
    # lm-eval tasks alone use the same prompt format as red-team prompts, so they need it too
    ("tasks_without_chat_template", lambda d, z, t: {**d, "evaluation": {
        "include_path": str(z / "eval" / "lm_eval"), "validation": {"tasks": {"en": "zoo_help_en_validation"}}}},
     "evaluation.chat_template: the tokenizer of"),
    ("chat_template_without_prompt", lambda d, z, t: {**d, "evaluation": {
        "include_path": str(z / "eval" / "lm_eval"), "chat_template": "<user> <bot>",
        "validation": {"tasks": {"en": "zoo_help_en_validation"}}}},
     "evaluation.chat_template: '<user> <bot>' must hold {prompt} exactly once"),
    ("judge_without_markers", lambda d, z, t: (_write(t / "h.jsonl", '{"prompt": "how to x", "answer": "x"}\n'), {
        **d, "evaluation": {"validation": {"harmful": {"en": str(t / "h.jsonl")}}, "chat_template": "{prompt}"}})[1],
     "evaluation.judge.refusal: no refusal markers for language 'en'"),
    ("judge_without_compliance", lambda d, z, t: (_write(t / "b.jsonl", '{"prompt": "how to x"}\n'), {
        **d, "evaluation": {"validation": {"harmful": {"fr": str(t / "b.jsonl")}}, "chat_template": "{prompt}",
                            "judge": {"refusal": {"fr": ["non"]}}}})[1],
     "evaluation.judge.compliance: no compliance markers for language 'fr'"),
    ("llama_guard_without_refusal_markers", lambda d, z, t: (_write(t / "b.jsonl", '{"prompt": "a cake ?"}\n'), {
        **d, "evaluation": {"validation": {"harmful": {"es": str(t / "b.jsonl")}, "benign": {"es": str(t / "b.jsonl")}},
                            "chat_template": "{prompt}", "judge": {"kind": "llama_guard", "model": str(t)}}})[1],
     "evaluation.judge.refusal: no refusal markers for language 'es', which has benign prompts; Llama Guard"),
    ("tied_embeddings_differ", lambda d, z, t: (d["models"][1].update(path=_model(z, t, "tied", cfg_edit=lambda c: c.update(
        tie_word_embeddings=not c.get("tie_word_embeddings", True)))), d)[1], "tie_word_embeddings is"),
    ("lora_adapter", lambda d, z, t: (d["models"][1].update(path=_adapter(t)), d)[1], "a PEFT adapter folder"),
    ("density_above_one", lambda d, z, t: (_set("ranges.density", {"low": 0.5, "high": 1.5})(d), d)[1],
     "ranges.density: low 0.5, high 1.5 is outside (0, 1]"),
    ("languages_differ_between_splits", lambda d, z, t: (_write(t / "h.jsonl", '{"prompt": "how to x", "answer": "x"}\n'), {
        **d, "evaluation": {"validation": {"harmful": {"en": str(t / "h.jsonl")}}, "test": {"harmful": {"fr": str(t / "h.jsonl")}},
                            "chat_template": "{prompt}", "judge": {"refusal": {"en": ["no"], "fr": ["non"]}}}})[1],
     "test.harmful names languages ['fr'], validation.harmful names ['en']"),
    ("relative_data_files", lambda d, z, t: {**d, "evaluation": {
        "include_path": _relative_task(z, t), "chat_template": "{prompt}", "validation": {"tasks": {"en": "rel_task"}}}},
     "task 'rel_task' cannot be loaded"),
    ("tokenizer_loses_text", lambda d, z, t: {**d, "base_model": _lossy_tokenizer(z, t)}, "its tokenizer decodes"),
    # the storage
    ("storage_unreadable", lambda d, z, t: {**d, "storage": "postgres-on-host-a"}, "storage: cannot read 'postgres-on-host-a'"),
    ("storage_unreachable", lambda d, z, t: {**d, "storage": "postgresql://nobody@127.0.0.1:1/nothing"},
     "storage: cannot open postgresql://nobody@127.0.0.1:1/nothing"),
]


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def test_corpus_is_large_enough():
    assert len(CASES) >= 25


FOUND_AT_LOAD = {"nan_weight", "inf_weight"}  # tensors are read when the workers load them, not by --dry-run


@pytest.mark.parametrize(("case", "make", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, make, fragment, test_zoo: Path, tmp_path: Path):
    """The same line from `--dry-run` (no Ray started) and from the run itself."""
    import ray

    data = make(_space_data(test_zoo), test_zoo, tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    run = tmp_path / "run"
    backend = "ray" if case == "too_many_workers" else "inline"  # the guard counts the workers that would start
    for dry in ([] if case in FOUND_AT_LOAD else ["--dry-run"]) + [None]:
        r = run_cli("optimize", "--space", str(space), "--run-dir", str(run), "--backend", backend, "--quiet",
                    *([dry] if dry else []))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (case, dry, r.stderr[-1500:])
        assert len(lines) == 1 and "Traceback" not in r.stderr, (case, dry, r.stderr[-1500:])
        assert fragment in lines[0], (case, dry, lines[0])
        assert not run.exists(), (case, dry)
        assert not ray.is_initialized(), (case, dry)


def test_pickle_and_remote_code_are_allowed_by_their_flags(test_zoo: Path, tmp_path: Path):
    data = _space_data(test_zoo)
    data["models"][1]["path"] = _pickle_only(test_zoo, tmp_path)
    data["search"]["n_trials"] = 1
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(data))
    r = run_cli("optimize", "--space", str(space), "--run-dir", str(tmp_path / "run"), "--backend", "inline", "--quiet",
                "--no-export", "--allow-pickle")
    assert r.returncode == 0, r.stderr[-1500:]


def test_a_run_folder_that_cannot_be_made_is_refused_before_anything_starts(test_zoo: Path, tmp_path: Path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(_space_data(test_zoo)))
    (tmp_path / "afile").write_text("")
    for dry in ("--dry-run", None):
        for run, fragment in ((tmp_path / "afile" / "run", "is a file; expected a folder"),
                              (Path("/proc/mergeopt-run"), "cannot write there")):  # passes a permission check
            r = run_cli("optimize", "--space", str(space), "--run-dir", str(run), "--quiet", *([dry] if dry else []))
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and len(lines) == 1 and fragment in lines[0], r.stderr


@pytest.mark.parametrize("flag", ["--n-trials", "--workers"])
def test_counts_below_one_are_refused_by_the_command_line(flag: str, tmp_path: Path):
    r = run_cli("optimize", "--space", "safety_multilingual", flag, "0", "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and f"{flag}: expected 1 or more, got 0" in r.stderr
    assert not (tmp_path / "run").exists()
