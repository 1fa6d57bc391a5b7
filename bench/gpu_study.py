"""A short study of the embedded space with its Ray actors on the GPU: trials per second, the share of
trial wall time in merge + forward, and the GPU's utilisation, sampled through NVML while the trials
run (NVML's figure: the share of time in which at least one kernel was running). One actor on the GPU,
and two actors sharing it (`gpus_per_worker: 0.5`), since one small model leaves most of a GPU idle.
Needs a CUDA GPU and NVML (the `nvidia-ml-py` package).

    python bench/gpu_study.py [--trials 40] [--address ADDR] [--json runs/bench/gpu_study.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, with_search, write_json  # noqa: E402

from mergeopt.report import trial_timing  # noqa: E402
from mergeopt.space import load_space  # noqa: E402


class Sampler(threading.Thread):
    """GPU utilisation and memory in use, every `period` seconds, with a wall-clock stamp."""

    def __init__(self, period: float = 0.05):
        super().__init__(daemon=True)
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.period = pynvml, period
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.samples: list[tuple[float, int, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            u = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
            m = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
            self.samples.append((time.time(), int(u.gpu), int(m.used)))
            time.sleep(self.period)

    def within(self, start: float, end: float) -> list[tuple[float, int, int]]:
        return [s for s in self.samples if start <= s[0] <= end]


def run(space_ref: str, workers: int, gpus: float, trials: int, sampling: dict, address: str | None) -> dict:

    from mergeopt.loop.ray_pool import RayPool
    from mergeopt.search import run_study

    space = with_search(load_space(space_ref), n_trials=trials, workers=workers, gpus_per_worker=gpus)
    pool = RayPool(space, workers, address)
    if "sampler" not in sampling:  # started once Ray is up: sampling during Ray's start-up slowed it past its timeout
        sampling["sampler"] = Sampler()
        sampling["sampler"].start()
    sampler = sampling["sampler"]
    try:
        devices = [w["device"] for w in pool.workers()]
        with tempfile.TemporaryDirectory() as d:
            study = run_study(space, Path(d), n_trials=trials, workers=workers, pool=pool)
    finally:
        pool.close()  # Ray stays up for the next run: starting it again in one process can time out
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    start = min(t.datetime_start for t in done).timestamp()
    end = max(t.datetime_complete for t in done).timestamp()
    timing = [trial_timing(t) for t in done]
    wall = sum(t["wall_s"] for t in timing)
    merge_fwd = sum(t["merge_s"] + t.get("forward_s", 0.0) for t in timing)
    seen = sampler.within(start, end)
    return {"workers": workers, "gpus_per_worker": gpus, "devices": devices, "trials": len(done),
            "span_s": end - start, "trials_per_s": len(done) / (end - start),
            "merge_s_mean": sum(t["merge_s"] for t in timing) / len(done),
            "forward_s_mean": sum(t.get("forward_s", 0.0) for t in timing) / len(done),
            "wall_s_mean": wall / len(done), "merge_forward_share": merge_fwd / wall,
            "gpu_util_mean": statistics.mean(s[1] for s in seen) / 100 if seen else float("nan"),
            "gpu_util_samples": len(seen), "gpu_mem_max_gib": max((s[2] for s in seen), default=0) / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="search_spaces/safety_multilingual.yaml")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--json", default="runs/bench/gpu_study.json")
    ap.add_argument("--address", help="join this Ray cluster (as `optimize --address`) instead of starting one")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu_study.py: skipped, this machine has no CUDA GPU")
        return
    m = machine()
    print(f"machine: {machine_line(m)}; space {args.space}, {args.trials} trials per run")
    sampling: dict = {}
    rows = []
    for workers, gpus in ((2, 0.5), (1, 1.0)):  # the first run starts Ray with room for both
        r = run(args.space, workers, gpus, args.trials, sampling, args.address)
        rows.append(r)
        print(f"{workers} actor(s) at {gpus:g} GPU each on {', '.join(sorted(set(r['devices'])))}: "
              f"{r['trials_per_s']:.2f} trials/s; per trial merge {r['merge_s_mean'] * 1000:.1f} ms, forward passes "
              f"{r['forward_s_mean'] * 1000:.0f} ms, wall {r['wall_s_mean'] * 1000:.0f} ms; merge + forward "
              f"{r['merge_forward_share']:.1%} of trial wall time; GPU utilisation (NVML) {r['gpu_util_mean']:.0%} "
              f"mean over {r['gpu_util_samples']} samples, GPU memory in use at most {r['gpu_mem_max_gib']:.1f} GiB")
    sampling["sampler"].halt.set()
    import ray

    ray.shutdown()
    gpu = torch.cuda.get_device_name(0)
    print(f"GPU: {gpu}")
    out = write_json(args.json, {"machine": m, "gpu": gpu, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
