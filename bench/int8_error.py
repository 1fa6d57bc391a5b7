"""What `placement: int8` costs in accuracy: the int8 task vectors against the bfloat16 ones on the
zoo (max error and relative norm of the error, per tensor and overall), and the same trials (the
baselines and seeded random candidates of TIES and DARE-TIES) scored both ways, with the largest
metric differences.

    python bench/int8_error.py [--zoo test|default] [--trials 8] [--out runs/bench/int8_error.json]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, machine_line, write_json  # noqa: E402

from mergeopt.space import SPACES_DIR, Space  # noqa: E402


def zoo_space(zoo: str, placement: str) -> Space:
    data = yaml.safe_load((SPACES_DIR / "safety_multilingual.yaml").read_text())
    prefix = "zoo:" if zoo == "default" else f"zoo-{zoo}:"
    data.update(name=f"int8_{placement}", base_model=f"{prefix}base", dtype="bfloat16", placement=placement,
                methods=["ties", "dare_ties"])
    for m in data["models"]:
        m["path"] = m["path"].replace("zoo:", prefix)
    data["evaluation"]["zoo"] = zoo
    return Space.model_validate(data)


def vector_error(space: Space) -> dict[str, Any]:
    from mergeopt.merge import open_models
    from mergeopt.tensor_store import quantize_int8, task_vectors

    base, experts = open_models(space.recipe({}, 0))
    worst = {"tensor": "", "rel": 0.0}
    err2 = ref2 = 0.0
    max_abs = 0.0
    for name, _, taus in task_vectors(base, experts, torch.bfloat16):
        for tau in taus:
            back = quantize_int8(tau).dense(torch.float32, "cpu")
            d = back - tau.float()
            e2, r2 = float((d * d).sum()), float((tau.float() ** 2).sum())
            err2, ref2, max_abs = err2 + e2, ref2 + r2, max(max_abs, float(d.abs().max()))
            if r2 > 0 and (e2 / r2) ** 0.5 > worst["rel"]:
                worst = {"tensor": name, "rel": (e2 / r2) ** 0.5}
    return {"max_abs": max_abs, "rel_norm": (err2 / ref2) ** 0.5, "worst_tensor": worst}


def candidates(space: Space, n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = list(space.baselines())
    for _ in range(n):
        p = {}
        for k, d in space.distributions().items():
            p[k] = rng.choice(d.choices) if hasattr(d, "choices") else rng.uniform(d.low, d.high)
        out.append(p)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="test", choices=["test", "default"])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--out", default="runs/bench/int8_error.json")
    args = ap.parse_args()
    from mergeopt.worker import TrialWorker

    torch.set_num_threads(1)
    m = machine()
    print(machine_line(m))
    full, int8 = zoo_space(args.zoo, "device"), zoo_space(args.zoo, "int8")
    err = vector_error(full)
    print(f"int8 task vectors vs bfloat16: max |error| {err['max_abs']:.2e}, relative norm {err['rel_norm']:.2e} "
          f"(worst tensor {err['worst_tensor']['tensor']}: {err['worst_tensor']['rel']:.2e})")
    trials = candidates(full, args.trials)
    with tempfile.TemporaryDirectory():
        scores: dict[str, list[dict[str, float]]] = {}
        for label, space in (("bfloat16", full), ("int8", int8)):
            w = TrialWorker(space.model_dump(mode="json", by_alias=True))
            t = time.perf_counter()
            scores[label] = [w.run(p, 1000 + i).metrics for i, p in enumerate(trials)]
            print(f"{label}: {len(trials)} trials in {time.perf_counter() - t:.0f} s")
    keys = [k for k in scores["bfloat16"][0] if not k.startswith(("time/", "lm_eval/"))]
    diffs = {k: max(abs(a[k] - b[k]) for a, b in zip(scores["bfloat16"], scores["int8"], strict=True)) for k in keys}
    same = sum(a == b for a, b in zip(scores["bfloat16"], scores["int8"], strict=True))
    for k in sorted(diffs, key=diffs.get, reverse=True)[:8]:
        print(f"  max |{k} difference| over {len(trials)} trials: {diffs[k]:.4f}")
    print(f"  trials with every metric identical: {same} of {len(trials)}")
    out = write_json(args.out, {"machine": m, "date": time.strftime("%Y-%m-%d"), "zoo": args.zoo, "vectors": err,
                                "trials": len(trials), "identical_trials": same, "max_metric_diff": diffs,
                                "combined": [[a["combined"], b["combined"]] for a, b in
                                             zip(scores["bfloat16"], scores["int8"], strict=True)]})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
