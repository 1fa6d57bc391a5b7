"""Each merge method against values computed by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from mergeopt.methods import METHODS, TensorContext, get_method, resolve_value
from mergeopt.methods import sparsify as sp
from mergeopt.recipe import Recipe

CTX = TensorContext("model.layers.0.mlp.up_proj.weight", seed=3)


def run(method: str, base, taus, models, **params):
    spec = get_method(method)
    return spec.fn(torch.tensor(base), [torch.tensor(t) for t in taus], [spec.resolve_model(m) for m in models],
                   spec.resolve_globals(params), CTX)


def test_registry_has_every_method():
    assert {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "breadcrumbs", "della"} <= set(METHODS)


def test_linear_weighted_average_of_full_weights():
    # theta_1 = [1, 2], theta_2 = [3, 4]; weights 1 and 3
    out = run("linear", [0.0, 0.0], [[1.0, 2.0], [3.0, 4.0]], [{"weight": 1.0}, {"weight": 3.0}])
    assert out.tolist() == [2.5, 3.5]
    out = run("linear", [0.0, 0.0], [[1.0, 2.0], [3.0, 4.0]], [{"weight": 1.0}, {"weight": 3.0}], normalize=False)
    assert out.tolist() == [10.0, 14.0]


def test_task_arithmetic_with_lambda():
    out = run("task_arithmetic", [1.0, 1.0], [[1.0, -2.0], [0.5, 4.0]], [{"weight": 1.0}, {"weight": 0.5}], **{"lambda": 2.0})
    # 1 + 2 * (1*[1,-2] + 0.5*[0.5,4]) = [1 + 2*1.25, 1 + 2*0]
    assert out.tolist() == [3.5, 1.0]


def test_ties_sign_election_counts_zero_as_positive():
    out = run("ties", [0.0] * 4, [[1, -2, 3, 0], [-1, -1, 1, 2]], [{"weight": 1.0}, {"weight": 1.0}])
    # sums [0,-3,4,2]: signs [+,-,+,+]; elementwise mean of the agreeing values
    assert out.tolist() == [1.0, -1.5, 2.0, 2.0]


def test_ties_trims_to_top_density_then_elects():
    # density 0.5 of 4 entries keeps the 2 largest magnitudes of each task vector
    assert sp.magnitude(torch.tensor([1.0, -3.0, 2.0, 0.5]), 0.5).tolist() == [0.0, -3.0, 2.0, 0.0]
    assert sp.magnitude(torch.tensor([1.0, -3.0, 2.0, 0.5]), 0.1).tolist() == [0.0, -3.0, 0.0, 0.0]  # k >= 1
    out = run("ties", [0.0] * 4, [[1.0, -3.0, 2.0, 0.5], [-4.0, 1.0, 0.0, 3.0]],
              [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}])
    # trimmed: [0,-3,2,0] and [-4,0,0,3]; sums [-4,-3,2,3] -> each entry has one agreeing value
    assert out.tolist() == [-4.0, -3.0, 2.0, 3.0]


def test_ties_trim_keeps_the_top_k_and_every_entry_tied_with_the_kth():
    x = torch.tensor([0.1, -0.9, 0.5, -0.3, 0.7, 0.2, 0.0, -0.6, 0.4, 0.8])
    assert sp.magnitude(x, 0.3).tolist() == pytest.approx([0, -0.9, 0, 0, 0.7, 0, 0, 0, 0, 0.8])
    assert sp.magnitude(x, 0.29).tolist() == pytest.approx([0, -0.9, 0, 0, 0, 0, 0, 0, 0, 0.8])  # k = floor(2.9) = 2
    tied = torch.tensor([0.5, -0.5, 0.5, 0.1, 0.9])
    assert sp.magnitude(tied, 0.4).tolist() == pytest.approx([0.5, -0.5, 0.5, 0.0, 0.9])  # k = 2, the 2nd largest is tied thrice
    assert int((sp.magnitude(torch.ones(10), 0.3) != 0).sum()) == 10


def test_dare_rescales_survivors_by_inverse_keep_probability():
    x = torch.full((10000,), 0.01)
    out = sp.bernoulli(x, 0.5, CTX.mask_key(0), "inverse")
    survivors = out[out != 0]
    assert torch.allclose(survivors, torch.full_like(survivors, 0.02))
    assert 0.47 < survivors.numel() / x.numel() < 0.53
    assert abs(float(out.sum()) - float(x.sum())) / float(x.sum()) < 0.05  # unbiased in expectation
    l1 = sp.bernoulli(x, 0.5, CTX.mask_key(0), "l1")
    assert torch.allclose(l1.abs().sum(), x.abs().sum())  # mergekit's rule: L1 norm matched exactly


def test_dare_masks_are_seeded_by_seed_tensor_and_model():
    x = torch.randn(1000)
    a = sp.bernoulli(x, 0.3, TensorContext("t", 1).mask_key(0), "inverse")
    assert torch.equal(a, sp.bernoulli(x, 0.3, TensorContext("t", 1).mask_key(0), "inverse"))
    assert not torch.equal(a, sp.bernoulli(x, 0.3, TensorContext("t", 2).mask_key(0), "inverse"))
    assert not torch.equal(a, sp.bernoulli(x, 0.3, TensorContext("u", 1).mask_key(0), "inverse"))
    assert not torch.equal(a, sp.bernoulli(x, 0.3, TensorContext("t", 1).mask_key(1), "inverse"))


def test_dare_ties_and_dare_linear_reduce_to_ties_and_ta_at_density_one():
    base, taus = [0.0] * 4, [[1.0, -2.0, 3.0, 0.0], [-1.0, -1.0, 1.0, 2.0]]
    models = [{"weight": 0.7}, {"weight": 0.4}]
    assert run("dare_linear", base, taus, models).tolist() == run("task_arithmetic", base, taus, models).tolist()
    assert run("dare_ties", base, taus, models).tolist() == run("ties", base, taus, models, normalize=False).tolist()


def test_slerp_endpoints_arc_and_parallel_fallback():
    base, tau = [1.0, 0.0], [[-1.0, 1.0]]  # theta_1 = [0, 1], orthogonal to the base
    assert run("slerp", base, tau, [{}], t=0.0).tolist() == [1.0, 0.0]
    assert torch.allclose(run("slerp", base, tau, [{}], t=1.0), torch.tensor([0.0, 1.0]), atol=1e-6)
    mid = run("slerp", base, tau, [{}], t=0.5)
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-6)  # on the arc, not the chord
    par = run("slerp", [1.0, 2.0], [[1.0, 2.0]], [{}], t=0.25)  # theta_1 = 2 * base: parallel -> lerp
    assert par.tolist() == [1.25, 2.5]


def test_breadcrumbs_drops_largest_and_smallest():
    x = torch.arange(1.0, 11.0)
    assert sp.magnitude_outliers(x, 0.5, 0.2).tolist() == [0, 0, 0, 4, 5, 6, 7, 8, 0, 0]
    assert torch.equal(sp.magnitude_outliers(x, 1.0, 0.2), x)


def test_della_rank_probabilities_and_rescale():
    x = torch.linspace(0.001, 1.0, 20000).reshape(2, 10000)
    out = sp.della_magprune(x, 0.5, 0.2, CTX.mask_key(0), "inverse")
    kept = out != 0
    small, large = kept[:, :2000].float().mean(), kept[:, -2000:].float().mean()
    assert 0.28 < small < 0.36 and 0.64 < large < 0.72  # keep probability 0.3 -> 0.7 by magnitude rank
    ratio = out[kept] / x[kept]
    assert float(ratio.min()) >= 1 / 0.7 - 1e-3 and float(ratio.max()) <= 1 / 0.3 + 1e-3
    with pytest.raises(ValueError):
        sp.della_magprune(x, 0.9, 0.15, CTX.mask_key(0), "inverse")


def test_per_layer_values_are_interpolated():
    assert resolve_value([0.0, 1.0], "model.layers.1.mlp.up_proj.weight", 3) == 0.5
    assert resolve_value([0.0, 0.5, 1.0], "model.layers.2.self_attn.q_proj.weight", 3) == 1.0
    assert resolve_value([0.2, 1.0], "model.embed_tokens.weight", 3) == 0.2
    assert resolve_value(0.7, "lm_head.weight", 3) == 0.7


def test_effective_weight_is_weight_times_language_times_objective():
    r = Recipe.model_validate({
        "merge_method": "task_arithmetic", "base_model": "b",
        "models": [{"model": "a", "parameters": {"weight": 0.5}, "language": "fr", "objective": "helpful"},
                   {"model": "s", "parameters": {"weight": 1.0}, "objective": "safety"},
                   {"model": "c", "parameters": {"weight": [0.2, 0.4]}, "language": "es"}],
        "language_coefficients": {"fr": 2.0, "es": 0.5}, "objective_coefficients": {"helpful": 0.8, "safety": 1.5}})
    w = [m["weight"] for m in r.resolved_models()]
    assert w[0] == pytest.approx(0.5 * 2.0 * 0.8) and w[1] == pytest.approx(1.5) and w[2] == pytest.approx([0.1, 0.2])


def _reference(method: str, base, taus, models, params, ctx):
    """Whole-tensor reference of the task-arithmetic family, written independently of the blockwise code."""
    kind = {"task_arithmetic": "none", "ties": "magnitude", "dare_linear": "bernoulli", "dare_ties": "bernoulli"}[method]
    deltas, ws = [], []
    for i, (t, m) in enumerate(zip(taus, models, strict=True)):
        if kind == "none":
            d = t
        elif kind == "magnitude":
            d = sp.magnitude(t, m["density"])
        else:
            d = sp.bernoulli(t, m["density"], ctx.mask_key(i), params["rescale"])
        deltas.append(d * m["weight"])
        ws.append(m["weight"])
    st = torch.stack(deltas)
    if method in ("ties", "dare_ties"):
        elected = torch.where(st.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(st) == elected
        mixed = (st * agree).sum(0)
        if params["normalize"]:
            div = (agree * torch.tensor(ws).view(-1, 1, 1)).sum(0)
            mixed = mixed / torch.where(div == 0, torch.ones_like(div), div)
    else:
        mixed = st.sum(0) / (sum(ws) if params["normalize"] else 1.0)
    return base + params["lambda"] * mixed


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("normalize", [False, True])
def test_blockwise_merge_matches_whole_tensor_reference(method, normalize, monkeypatch):
    """Tensors spanning several blocks, a cached rank memo, and writing into a destination buffer; the
    GPU's block size (one block here) gives the same bits as the CPU's."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(700, 1000, generator=g)
    taus = [torch.randn(700, 1000, generator=g) * 0.01 for _ in range(3)]
    taus[0][:5] = 0.0  # exact zeros, as frozen embeddings give
    spec = get_method(method)
    models = [spec.resolve_model({"weight": w, **({"density": d} if "density" in spec.model_params else {})})
              for w, d in ((0.6, 0.3), (1.2, 0.7), (-0.4, 0.5))]
    params = spec.resolve_globals({"normalize": normalize, "lambda": 0.9})
    ctx = TensorContext("model.layers.1.mlp.up_proj.weight", seed=5)
    want = _reference(method, base, taus, models, params, ctx)
    memo: dict = {}
    for _ in range(2):  # second round uses the memo
        dest = torch.empty_like(base)
        got = spec.fn(base, taus, models, params, TensorContext(ctx.name, 5, out=dest, memo=memo))
        assert got.data_ptr() == dest.data_ptr()
        assert torch.allclose(got, want, atol=1e-6, rtol=0), float((got - want).abs().max())
    if method == "ties":
        assert memo
        # one merge without a memo selects the threshold instead of sorting: the same bits
        assert torch.equal(spec.fn(base, taus, models, params, TensorContext(ctx.name, 5)), got)
    from mergeopt.methods import fused

    monkeypatch.setenv("MERGEOPT_COMPILE", "0")
    eager = spec.fn(base, taus, models, params, TensorContext(ctx.name, 5, memo=memo))
    monkeypatch.setattr(fused, "CHUNK", fused.DEVICE_CHUNK)
    eager_calls = fused.calls["eager"]
    assert torch.equal(spec.fn(base, taus, models, params, TensorContext(ctx.name, 5, memo=memo)), eager)
    assert fused.calls["eager"] > eager_calls


def test_mask_bits_are_counter_based_and_match_the_reference():
    """Any block of a mask can be drawn on its own and gives the whole tensor's bits; the torch hash
    equals the pure-Python reference, so int32 arithmetic wraps as assumed on this backend."""
    from mergeopt.methods import rng

    key = TensorContext("model.layers.0.mlp.up_proj.weight", seed=3).mask_key(1)
    whole = rng.block_bits(key, 0, 50_000)
    assert torch.equal(rng.block_bits(key, 12_345, 777), whole[12_345:12_345 + 777])
    assert [int(v) for v in whole[::4999]] == [rng.bits24_reference(i, *key) for i in range(0, 50_000, 4999)]
    assert 0 <= int(whole.min()) and int(whole.max()) < rng.ONE
    assert abs(float(whole.float().mean()) / rng.ONE - 0.5) < 0.01
    other = rng.block_bits(TensorContext("model.layers.0.mlp.up_proj.weight", seed=3).mask_key(2), 0, 50_000)
    agree = float(((whole < rng.ONE // 2) == (other < rng.ONE // 2)).float().mean())
    assert 0.48 < agree < 0.52  # two models' masks are independent


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "dare_linear"])
def test_compiled_merge_is_bit_identical_to_eager(method, monkeypatch):
    """The fused kernel from torch.compile gives the eager function's bits, so whether a worker had a
    compiler never changes the weights. Skipped only where torch.compile cannot build a kernel."""
    from mergeopt.methods import fused

    g = torch.Generator().manual_seed(1)
    base = torch.randn(301, 1001, generator=g)
    taus = [torch.randn(301, 1001, generator=g) * 0.01 for _ in range(3)]
    taus[1][::3] = taus[0][::3]  # shared entries: ties at thresholds and in the election
    spec = get_method(method)
    models = [spec.resolve_model({"weight": w, **({"density": d} if "density" in spec.model_params else {})})
              for w, d in ((0.6, 0.3), (1.2, 0.7), (-0.4, 0.5))]
    params = spec.resolve_globals({"lambda": 0.9} if "lambda" in spec.global_params else {})
    ctx = TensorContext("model.layers.1.mlp.up_proj.weight", seed=5, memo={})
    monkeypatch.setenv("MERGEOPT_COMPILE", "0")
    eager = spec.fn(base, taus, models, params, ctx).clone()
    monkeypatch.setenv("MERGEOPT_COMPILE", "1")
    compiled = spec.fn(base, taus, models, params, ctx)
    if fused._broken:
        pytest.skip(f"torch.compile unavailable here: {fused._broken[0]}")
    assert any(v is not None for v in fused._kernels.values())
    assert torch.equal(compiled, eager)


def test_merge_without_a_compiler_warns_and_gives_the_eager_bits(tmp_path):
    """A machine with no C++ compiler (CI may be one) merges eagerly, with a warning, and gets the same
    bytes as an eager merge."""
    import hashlib
    import os
    import subprocess
    import sys

    script = """
import hashlib, logging, sys, torch
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from mergeopt.methods import TensorContext, fused, get_method
g = torch.Generator().manual_seed(2)
base = torch.randn(512, 600, generator=g)
taus = [torch.randn(512, 600, generator=g) * 0.01 for _ in range(2)]
spec = get_method("dare_ties")
models = [spec.resolve_model({"weight": w, "density": 0.6}) for w in (0.8, 0.5)]
out = spec.fn(base, taus, models, spec.resolve_globals({}), TensorContext("w", 4))
print(hashlib.sha256(out.numpy().tobytes()).hexdigest(), bool(fused._broken), dict(fused.calls))
"""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
           "MERGEOPT_COMPILE": "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    digest, broken, calls = res.stdout.split(maxsplit=2)
    assert broken == "True" and "'eager': 1" in calls
    assert "torch.compile unavailable" in res.stderr
    g = torch.Generator().manual_seed(2)
    base = torch.randn(512, 600, generator=g)
    taus = [torch.randn(512, 600, generator=g) * 0.01 for _ in range(2)]
    spec = get_method("dare_ties")
    models = [spec.resolve_model({"weight": w, "density": 0.6}) for w in (0.8, 0.5)]
    os.environ.pop("MERGEOPT_COMPILE", None)
    want = spec.fn(base, taus, models, spec.resolve_globals({}), TensorContext("w", 4))
    assert digest == hashlib.sha256(want.numpy().tobytes()).hexdigest()


def test_each_method_declares_its_facts_once():
    """The card cites the paper, and the export writes a mergekit config only where mergekit gives the
    same weights: the registry entry says both."""
    from mergeopt.methods import METHODS

    for name, spec in METHODS.items():
        assert spec.paper, name
        assert spec.mergekit_reproduces == (spec.mergekit_name is not None and not spec.random), name
    assert {n for n, s in METHODS.items() if s.mergekit_reproduces} == {
        "linear", "slerp", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"}
