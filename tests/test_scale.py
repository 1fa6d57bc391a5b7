"""Scale: the memory plan (placements, auto, the smallest change that fits), int8 task vectors, the
resident model in the study's dtype, and placements that change no bits."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli, zoo_test_space
from safetensors import safe_open

from mergeopt.memory_plan import GIB, ModelSize, Node, Setup, plan, refusal, suggestion
from mergeopt.tensor_store import quantize_int8


def _llama(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int = 128256) -> ModelSize:
    """A Llama-3 shape's tensors, from transformers' own model on the meta device (no weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return ModelSize.from_shapes(tuple(p.shape) for p in model.parameters())


GPU_NODE = Node(host_free=2 * 1024 * GIB, gpus=8, gpu_free=80 * 10**9)  # an 8 x 80 GB node with 2 TiB of RAM


def test_plan_puts_four_8b_ties_experts_on_one_80gb_gpu_per_worker_with_auto():
    size = _llama(4096, 14336, 32, 32, 8)
    assert 8.0e9 < size.params < 8.1e9
    setup = Setup(experts=4, dtype="bfloat16", placement="auto", workers=8, gpus_per_worker=1, ties=True)
    device = plan(size, Setup(**{**setup.__dict__, "placement": "device"}), GPU_NODE)
    assert not device.fits() and device.over() == "gpu"  # base + 4 task vectors + model: 96 GB
    auto = plan(size, setup, GPU_NODE)
    assert auto.placement == "host" and auto.fits(), auto.table()
    assert auto.need("gpu") < 40 * GIB
    assert suggestion(size, Setup(**{**setup.__dict__, "placement": "device"}), GPU_NODE) == "placement: host"


def test_plan_fits_four_70b_experts_on_four_80gb_gpus_per_worker():
    size = _llama(8192, 28672, 80, 64, 8)
    assert 70.0e9 < size.params < 71.0e9
    one = Setup(experts=4, dtype="bfloat16", placement="auto", workers=2, gpus_per_worker=1, ties=True)
    assert not plan(size, one, GPU_NODE).fits()  # a 141 GB model on one GPU
    four = Setup(**{**one.__dict__, "gpus_per_worker": 4})
    p = plan(size, four, GPU_NODE)
    assert p.fits() and p.placement == "host", p.table()
    assert suggestion(size, one, GPU_NODE) == "search.gpus_per_worker: 4"


def test_plan_keeps_no_per_expert_ties_copy_and_counts_the_node_copy_once():
    size = ModelSize(params=10**9, largest=10**8, rows=10**6)
    node = Node(host_free=1024 * GIB)
    base = Setup(experts=4, dtype="bfloat16", workers=1, ties=False)
    for ties in (False, True):
        one = plan(size, Setup(**{**base.__dict__, "ties": ties}), node)
        two = plan(size, Setup(**{**base.__dict__, "ties": ties, "workers": 2}), node)
        assert two.need("object store") == one.need("object store") == 5 * 2 * 10**9  # once per node
    a = plan(size, Setup(**{**base.__dict__, "workers": 2}), node).need("host")
    b = plan(size, Setup(**{**base.__dict__, "workers": 2, "ties": True}), node).need("host")
    assert b - a == 2 * 4 * size.largest  # one float32 |tau| of the largest tensor per worker, not 4 x params
    int8 = plan(size, Setup(**{**base.__dict__, "placement": "int8"}), node)
    assert int8.need("object store") == 2 * 10**9 + 4 * (10**9 + 4 * 10**6)


def test_int8_task_vectors_round_per_row_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    tau = (torch.randn(300, 70, generator=g) * torch.linspace(1e-4, 1e-2, 300)[:, None]).bfloat16()
    tau[7] = 0
    q = quantize_int8(tau)
    assert q.q.dtype == torch.int8 and q.scale.shape == (300,) and q.nbytes == 300 * 70 + 300 * 4
    back = q.dense(torch.float32, "cpu")
    step = q.scale[:, None]
    assert bool(((back - tau.float()).abs() <= step * 0.5 * (1 + 1e-5)).all())  # half a step, up to float rounding
    assert bool((back[7] == 0).all())
    assert torch.equal(q.dense(torch.bfloat16, "cpu"), back.bfloat16())
    vec = quantize_int8(torch.tensor([0.5, -0.25, 0.0]))
    assert vec.scale.shape == (1,) and vec.q.tolist() == [127, -64, 0]  # a vector is one row; -63.5 rounds to even


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_placements_change_no_bits_and_int8_is_what_merge_writes(test_zoo: Path, tmp_path: Path, dtype: str):
    """device and host hold the same tensors (on a CPU they are the same tier); int8's rounded task vectors
    are reproduced by `mergeopt merge` from a recipe with `task_vectors: int8`."""
    from mergeopt.merge import TORCH_DTYPES, ResidentMerger, merge_to_folder, open_models
    from mergeopt.space import load_space

    space = load_space(str(zoo_test_space(tmp_path, "p")))
    space = space.model_copy(update={"dtype": dtype, "methods": ["ties", "dare_ties"]})
    params = {k: (d.low + d.high) / 2 if hasattr(d, "low") else d.choices[0] for k, d in space.distributions().items()}
    for method in ("ties", "dare_ties"):
        params["method"] = method
        out = {}
        for placement in ("device", "host", "int8"):
            s = space.model_copy(update={"placement": placement})
            recipe = s.recipe(params, 3)
            base, experts = open_models(recipe)
            merger = ResidentMerger(base, experts, dtype=TORCH_DTYPES[dtype], placement=placement)
            out[placement] = dict(merger.merged(recipe))
            if placement == "int8":
                assert recipe.task_vectors == "int8" and "task_vectors: int8" in recipe.to_yaml()
                folder = merge_to_folder(recipe, tmp_path / f"{method}-{dtype}")
                with safe_open(folder / "model.safetensors", "pt") as fh:
                    for k in fh.keys():
                        assert torch.equal(fh.get_tensor(k), out["int8"][k]), k
        assert all(torch.equal(out["device"][k], out["host"][k]) for k in out["device"])
        moved = [k for k in out["device"] if not torch.equal(out["device"][k], out["int8"][k])]
        assert moved  # int8 rounding shows, slightly
        assert all(out["int8"][k].dtype == TORCH_DTYPES[dtype] for k in moved)


def test_bfloat16_study_on_two_ray_workers_with_int8_exports_the_evaluated_bits(test_zoo: Path, tmp_path: Path):
    """A bfloat16 study whose task vectors sit once in the object store as int8: the workers' resident
    models are bfloat16, the export's re-materialization check passes (the written weights are the
    evaluated ones), and the exported recipe merges to the same files."""
    space = zoo_test_space(tmp_path, "bf16", n_trials=4, workers=2)
    data = yaml.safe_load(space.read_text())
    data.update(dtype="bfloat16", placement="int8", methods=["ties", "dare_ties"])
    space.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "mergeopt.cli", "optimize", "--space", str(space), "--run-dir", str(run),
                        "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    workers = json.loads((run / "workers.json").read_text())
    assert len(workers) == 2 and {w["placement"] for w in workers} == {"int8"} and {w["dtype"] for w in workers} == {"bfloat16"}
    assert all(w["shared_bytes"]["copied"] == 0 for w in workers)  # mapped from the node's one copy
    best = run / "best"
    cfg = json.loads((best / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    assert "task_vectors: int8" in (best / "mergeopt_recipe.yaml").read_text()
    assert not (best / "mergekit_config.yml").exists() and "int8 with one float32 scale per row" in (best / "README.md").read_text()
    again = tmp_path / "again"
    r = run_cli("merge", str(best / "mergeopt_recipe.yaml"), "--out", str(again))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (again / "model.safetensors").read_bytes() == (best / "model.safetensors").read_bytes()


def _sparse_model(folder: Path, rows: int, cols: int) -> None:
    """A model folder whose one bfloat16 tensor is rows x cols, as a sparse file: its header says how big
    it is, and no disk is used."""
    folder.mkdir(parents=True)
    n = rows * cols * 2
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [0, n]}})
    header += " " * (-len(header) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header.encode())
        f.truncate(8 + len(header) + n)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))


def test_a_placement_that_cannot_fit_is_refused_in_one_line_naming_tier_and_gib(tmp_path: Path):
    study = tmp_path / "study"
    for name in ("base", "a", "b"):
        _sparse_model(study / "models" / name, 200_000, 100_000)  # 20B parameters each, 40 GB in bfloat16
    (study / "prompts").mkdir()
    (study / "prompts" / "h.jsonl").write_text(json.dumps({"prompt": "how do I do harm?"}) + "\n")
    space = {"name": "huge", "base_model": "models/base", "dtype": "bfloat16", "placement": "int8",
             "models": [{"path": "models/a", "objective": "helpful"}, {"path": "models/b", "objective": "safety"}],
             "evaluation": {"validation": {"harmful": {"en": "prompts/h.jsonl"}}, "chat_template": "{prompt}",
                            "judge": {"kind": "refusal_markers", "refusal": {"en": ["sorry"]}, "compliance": {"en": ["sure"]}}}}
    (study / "space.yaml").write_text(yaml.safe_dump(space))
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "mergeopt.cli", "optimize", "--space", str(study / "space.yaml"),
                        "--run-dir", str(run), "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()
    assert len(line) == 1, r.stderr
    assert "placement int8, 2 worker(s)" in line[0] and "host memory needs" in line[0] and "GiB free" in line[0], line[0]
    assert not run.exists()
    dry = subprocess.run([sys.executable, "-m", "mergeopt.cli", "optimize", "--space", str(study / "space.yaml"),
                          "--dry-run"], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert dry.returncode == 2 and "memory plan" in dry.stdout, dry.stdout
    free = re.compile(r"[0-9.]+ GiB free")  # free memory moves between the two runs
    assert [free.sub("", x) for x in dry.stderr.strip().splitlines()] == [free.sub("", line[0])], dry.stderr
    assert "task vectors, 2 x int8 + row scales" in dry.stdout
    size = ModelSize(params=2 * 10**10, largest=2 * 10**10, rows=200_000)
    assert refusal("huge", size, Setup(experts=2, placement="int8", workers=2), Node(host_free=20 * GIB)) is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a node without a GPU")
def test_asking_for_gpus_on_a_node_without_one_names_the_missing_tier(test_zoo: Path, tmp_path: Path):
    from mergeopt.errors import UserError
    from mergeopt.loop.preflight import check_memory
    from mergeopt.space import load_space

    space = load_space(str(zoo_test_space(tmp_path, "g", gpus_per_worker=1)))
    with pytest.raises(UserError, match=r"GPU tier needs .* GiB per GPU, but this node has no GPU \(0.0 GiB free\)"):
        check_memory(space, 1)


# Every method's resident merge at float32, before the scale change (commit f9fe3b7: a float32 model,
# per-worker device copies, TIES from sorted copies), as sha256 prefixes over names and bytes.
BEFORE_SCALE = {"breadcrumbs": "6c864fb77d313888", "breadcrumbs_ties": "81d3530fe9602b97", "dare_linear": "6559a1f6758cf4a7",
                "dare_ties": "0e10ab573b3c38c4", "della": "ceefca4cfe6dda2e", "della_linear": "398547a641d26254",
                "linear": "04164e9eb5610160", "slerp": "f569930f528c7ba1", "task_arithmetic": "f216c94cd11dfa30",
                "ties": "4f75d5c8a15d78d8"}


def _seeded_family(root: Path) -> dict[str, Path]:
    """Seeded tensors small enough to merge eagerly (no compiler), with zero deltas on one tensor (ties)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(11)
    shapes = {"model.embed_tokens.weight": (64, 16), "model.layers.0.mlp.up_proj.weight": (48, 16),
              "model.layers.1.mlp.up_proj.weight": (48, 16), "model.layers.0.input_layernorm.weight": (16,),
              "model.layers.1.input_layernorm.weight": (16,)}
    base = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    out = {}
    for name in ("base", "a", "b", "c"):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        ts = base if name == "base" else {k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in base.items()}
        if name != "base":
            ts["model.layers.0.input_layernorm.weight"] = base["model.layers.0.input_layernorm.weight"].clone()
        save_file({k: v.contiguous() for k, v in ts.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2, "vocab_size": 64,
                                                   "hidden_size": 16}))
        out[name] = d
    return out


def test_every_method_at_float32_gives_the_bits_it_gave_before_the_scale_change(tmp_path: Path):
    import hashlib

    from mergeopt.merge import ResidentMerger, open_models
    from mergeopt.methods import METHODS
    from mergeopt.recipe import Recipe

    f = _seeded_family(tmp_path)
    got = {}
    for name in sorted(METHODS):
        spec = METHODS[name]
        per = []
        for i, e in enumerate(["a"] if name == "slerp" else ["a", "b", "c"]):
            p: dict = {}
            if "weight" in spec.model_params:
                p["weight"] = [0.9, -0.6, 0.4][i]
            if "density" in spec.model_params:
                p["density"] = 0.45
            per.append({"model": str(f[e]), "parameters": p})
        data = {"merge_method": name, "base_model": str(f["base"]), "models": per,
                "parameters": {"t": 0.3} if name == "slerp" else {}, "seed": 7}
        if name == "linear":
            data.pop("base_model")
        r = Recipe.model_validate(data)
        h = hashlib.sha256()
        for n, t in ResidentMerger(*open_models(r)).merged(r):
            h.update(n.encode())
            h.update(t.contiguous().numpy().tobytes())
        got[name] = h.hexdigest()[:16]
    assert got == BEFORE_SCALE
