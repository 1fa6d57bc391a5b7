"""On a CUDA GPU (skipped elsewhere; CI has none): a trial worker merges and evaluates on the GPU, with
every prompt batch and forward pass there, and scores a candidate as the CPU worker does; DARE drops
the same entries on both. Greedy
decoding on another device may break a near-tie between two tokens differently, so the metrics are
compared within a few responses, not bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_search import _test_space

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_a_worker_on_the_gpu_scores_like_one_on_the_cpu(test_zoo: Path, tmp_path: Path):
    from mergeopt.space import load_space
    from mergeopt.worker import TrialWorker

    space = load_space(str(_test_space(tmp_path)))
    data = space.model_dump(mode="json", by_alias=True)
    gpu, cpu = TrialWorker(data, device="cuda"), TrialWorker(data, device="cpu")
    assert next(gpu.model.parameters()).device.type == "cuda"
    for params in (space.baselines()[0], {**space.baselines()[0], "method": "ties"}):
        a, b = gpu.run(params, seed=3), cpu.run(params, seed=3)
        assert a.state == b.state == "complete", (a.reason, b.reason)
        assert a.forward_s > 0 and a.merge_s > 0
        for k, v in b.metrics.items():
            if not k.startswith("time/"):
                assert a.metrics[k] == pytest.approx(v, abs=0.03), k
    # DARE's masks come from a counter-based hash, so the GPU drops exactly the entries the CPU drops.
    recipe = space.recipe({**space.baselines()[0], "method": "dare_linear"}, 5)
    on_gpu, on_cpu = dict(gpu.merger.merged(recipe)), dict(cpu.merger.merged(recipe))
    assert on_gpu.keys() == on_cpu.keys()
    for k, v in on_cpu.items():
        assert on_gpu[k].device.type == "cuda"
        assert (on_gpu[k].cpu() - v).abs().max() <= 1e-6, k


@pytest.mark.parametrize("placement", ["host", "int8"])
def test_streamed_placements_merge_on_the_gpu_as_the_device_one_does(test_zoo: Path, tmp_path: Path, placement: str):
    """bfloat16, task vectors in host memory (pinned where CUDA allows), copied tensor by tensor with the
    next copy overlapping the current merge: the same bits as the task vectors held on the GPU (int8:
    as the CPU's int8 merge within a bfloat16 step)."""
    from mergeopt.space import load_space
    from mergeopt.worker import TrialWorker

    space = load_space(str(_test_space(tmp_path))).model_copy(update={"dtype": "bfloat16"})
    params = {**space.baselines()[0], "method": "ties"}
    streamed = TrialWorker(space.model_copy(update={"placement": placement}).model_dump(mode="json", by_alias=True),
                           device="cuda")
    assert streamed.placement == placement and next(iter(streamed.merger.base.values())).device.type == "cpu"
    ref_space = space.model_copy(update={"placement": "device" if placement == "host" else "int8"})
    ref = TrialWorker(ref_space.model_dump(mode="json", by_alias=True), device="cuda" if placement == "host" else "cpu")
    recipe = streamed.space.recipe(params, 3)
    a, b = dict(streamed.merger.merged(recipe)), dict(ref.merger.merged(recipe))
    for k, v in b.items():
        if placement == "host":
            assert torch.equal(a[k].cpu(), v.cpu()), k
        else:  # against the CPU's merge: within one bfloat16 step, as the float32 merges agree within 1e-6
            assert torch.allclose(a[k].cpu().float(), v.float(), rtol=2**-7, atol=1e-6), k
    assert streamed.run(params, seed=3).state == "complete"
