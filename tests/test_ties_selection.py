"""The TIES trim threshold of a search worker comes from a small memoised quantile sketch per tensor
and expert plus an exact selection per trial, not from a sorted copy of every task vector: the same
threshold bits as a direct selection, for every density, dtype and tie pattern, in O(S) memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergeopt.methods import TensorContext, get_method
from mergeopt.methods import task_arithmetic as ta

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    zeros = torch.randn(50_000, generator=g)
    zeros[torch.rand(50_000, generator=g) < 0.6] = 0.0
    zeros[::7] = -0.0
    bf16 = (torch.randn(896, 230, generator=g) * 0.002).bfloat16()
    return {
        "float32": torch.randn(300, 337, generator=g) * 0.01,
        "bf16_values_in_float32": bf16.float(),  # bf16-exact: massive ties, as a resident float32 merge holds them
        "bfloat16": bf16,
        "float16": (torch.randn(40_000, generator=g) * 0.01).half(),
        "many_zeros": zeros,
        "bf16_many_zeros": zeros.bfloat16(),
        "small": torch.randn(300, generator=g),  # n < S: the sketch holds every order statistic
        "all_equal": torch.full((5000,), -0.25),
        "all_zero": torch.zeros(64, 64),
        "single": torch.tensor([-3.0]),
        "two": torch.tensor([2.0, -2.0]),
    }


def _densities(n: int) -> list[float]:
    return [0.0, -0.5, 1.0, 1.5, 1e-12, 0.5 / n, 1 / n, 2.5 / n, 0.001, 0.01, 0.1, 1 / 3, 0.5, 0.7, 0.9, 0.99,
            (n - 1) / n, (n - 0.5) / n, 1 - 1e-12]


def _reference(tau: torch.Tensor, density: float) -> float:
    n = tau.numel()
    if density >= 1:
        return 0.0
    if density <= 0:
        return float("inf")
    k = max(1, int(density * n))
    return float(np.sort(tau.reshape(-1).abs().float().cpu().numpy())[n - k])


def _bits(x: float) -> bytes:
    return np.float64(x).tobytes()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(_tensors()))
def test_threshold_equals_the_sorted_reference_with_and_without_a_memo(name, device):
    tau = _tensors()[name].to(device)
    n = tau.numel()
    memo: dict = {}
    for _ in range(2):  # the second round reuses the memoised sketches
        for i, d in enumerate(_densities(n)):
            want = _reference(tau, d)
            for ctx in (TensorContext("w", memo=memo), TensorContext("w")):
                got = ta._magnitude_threshold(tau, d, ctx, i % 2)
                assert _bits(got) == _bits(want), (name, d, got, want)
    assert {k[1] for k in memo} == {"abs_sketch"} and len(memo) == (2 if n > 0 else 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("points", [1, 2, 7, 64])
def test_every_rank_is_selected_exactly_by_a_coarse_sketch(points, device, monkeypatch):
    """Each rank of tensors with and without ties, from sketches so coarse that most ranks fall strictly
    between two points (the one-pass selection), on their tie blocks, or on a point."""
    monkeypatch.setattr(ta, "SKETCH_POINTS", points)
    g = torch.Generator().manual_seed(points)
    cases = [torch.randn(997, generator=g),
             (torch.randn(1200, generator=g) * 0.002).bfloat16(),
             torch.randint(-6, 7, (1000,), generator=g).float() / 4]  # 13 values, 7 magnitudes, zeros
    for tau in cases:
        tau = tau.to(device)
        srt = np.sort(tau.abs().float().cpu().numpy())
        sketch = ta._sketch(tau)
        assert len(sketch.values) == min(points, tau.numel() - 1) + 1
        for t in range(tau.numel()):
            assert _bits(ta._select(tau, sketch, t)) == _bits(float(srt[t])), (t, tau.dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_merge_is_bit_identical_with_and_without_a_memo(device):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(512, 700, generator=g).to(device)
    taus = [(torch.randn(512, 700, generator=g) * 0.002).bfloat16().float().to(device),  # massive ties
            (torch.randn(512, 700, generator=g) * 0.01).to(device),
            torch.where(torch.rand(512, 700, generator=g) < 0.5, 0.0, torch.randn(512, 700, generator=g)).to(device)]
    spec = get_method("ties")
    params = spec.resolve_globals({"lambda": 0.9})
    n = taus[0].numel()
    srt = np.sort(taus[0].abs().cpu().numpy().reshape(-1))
    # thresholds at the first entry of a tie block (k = n - t keeps the whole block, not the one below it)
    block_starts = [int(np.searchsorted(srt, srt[int(q * n)], "left")) for q in (0.2, 0.5, 0.8, 0.95)]
    memo: dict = {}
    for densities in ((0.3, 0.7, 0.5), (1e-7, 0.999, 0.05), (0.123, 1.0, 0.0),
                      *(((n - t + 0.5) / n, 0.4, 0.6) for t in block_starts)):
        models = [spec.resolve_model({"weight": w, "density": d}) for w, d in zip((0.6, 1.2, -0.4), densities, strict=True)]
        direct = spec.fn(base, taus, models, params, TensorContext("model.layers.0.mlp.up_proj.weight", 5))
        for _ in range(2):
            ctx = TensorContext("model.layers.0.mlp.up_proj.weight", 5, memo=memo)
            assert torch.equal(spec.fn(base, taus, models, params, ctx), direct), densities
    assert len(memo) == 3


def _retained_bytes(value) -> int:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.nbytes
    if isinstance(value, (tuple, list)):
        return sum(_retained_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_retained_bytes(v) for v in value.values())
    return 0


def test_memo_keeps_a_sketch_not_a_copy_of_the_task_vectors():
    g = torch.Generator().manual_seed(5)
    shape = (1024, 1024)
    base = torch.randn(shape, generator=g)
    taus = [torch.randn(shape, generator=g) * 0.01 for _ in range(3)]
    spec = get_method("ties")
    models = [spec.resolve_model({"weight": 1.0, "density": d}) for d in (0.2, 0.5, 0.8)]
    memo: dict = {}
    spec.fn(base, taus, models, spec.resolve_globals({}), TensorContext("w", memo=memo))
    assert len(memo) == 3
    kept = sum(_retained_bytes(v) for v in memo.values())
    assert 0 < kept < 0.01 * taus[0].nbytes, kept
