"""On the embedded study: the share of trial wall time (from a trial's submission to its result) spent
in merge + forward passes, and the stricter share of the workers' whole time (first trial's start to
the last one's end, times the workers: the driver's asking and telling included); trials per
second with 1 and with 2 workers (start-up excluded: from the first trial's start to the last one's end),
and the memory of each worker (USS: its own pages; PSS: with the shared pages, such as the task vectors
in Ray's object store, split among the processes that map them).

    python bench/search_overhead.py [--trials 40] [--json runs/bench/search_overhead.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, ray_pool, with_search, write_json  # noqa: E402

from mergeopt.report import trial_timing  # noqa: E402
from mergeopt.space import load_space  # noqa: E402


def run(space_ref: str, workers: int, trials: int, run_dir: Path) -> dict:
    import psutil
    import ray

    from mergeopt.search import run_study

    space = with_search(load_space(space_ref), n_trials=trials, workers=workers)
    pool = ray_pool(space, workers)
    try:
        study = run_study(space, run_dir, n_trials=trials, workers=workers, pool=pool)
        pids = [w["pid"] for w in pool.workers()]
        mem = [psutil.Process(pid).memory_full_info() for pid in pids]
    finally:
        pool.close()
        ray.shutdown()
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    timing = [trial_timing(t) for t in done]
    wall = sum(t["wall_s"] for t in timing)
    merge = sum(t["merge_s"] for t in timing)
    fwd = sum(t.get("forward_s", 0.0) for t in timing)
    ev = sum(t["eval_s"] for t in timing)
    mib = 2**20
    return {"workers": workers, "trials": len(done), "span_s": span, "trials_per_s": len(done) / span,
            "merge_forward_share": (merge + fwd) / wall, "merge_eval_share": (merge + ev) / wall,
            "merge_s_mean": merge / len(done), "forward_s_mean": fwd / len(done), "eval_s_mean": ev / len(done),
            "wall_s_mean": wall / len(done), "worker_busy_share": (merge + fwd) / (span * workers),
            "worker_uss_mib": max(x.uss for x in mem) / mib,
            "worker_pss_mib": max(x.pss for x in mem) / mib, "worker_rss_mib": max(x.rss for x in mem) / mib}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="search_spaces/safety_multilingual.yaml")
    ap.add_argument("--trials", type=int, default=40, help="per run; the embedded study's own n_trials")
    ap.add_argument("--json", default="runs/bench/search_overhead.json")
    args = ap.parse_args()
    m = machine()
    print(f"machine: {machine_line(m)}; space {args.space}, {args.trials} trials per run")
    rows = []
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as d:
            r = run(args.space, workers, args.trials, Path(d))
        rows.append(r)
        print(f"{workers} worker(s): {r['trials_per_s']:.2f} trials/s; per trial merge {r['merge_s_mean'] * 1000:.1f} ms, "
              f"forward passes {r['forward_s_mean'] * 1000:.0f} ms, evaluation {r['eval_s_mean'] * 1000:.0f} ms, "
              f"wall {r['wall_s_mean'] * 1000:.0f} ms; merge + forward {r['merge_forward_share']:.1%} of trial wall time "
              f"(target >= 95%), merge + evaluation {r['merge_eval_share']:.1%}; workers in merge + forward "
              f"{r['worker_busy_share']:.1%} of the span (driver, sampler and storage included); worker memory USS "
              f"{r['worker_uss_mib']:.0f} MiB, PSS {r['worker_pss_mib']:.0f} MiB, RSS {r['worker_rss_mib']:.0f} MiB")
    speedup = rows[1]["trials_per_s"] / rows[0]["trials_per_s"]
    print(f"2 workers / 1 worker: {speedup:.2f}x trials per second (target >= 1.7x)")
    out = write_json(args.json, {"machine": m, "rows": rows, "speedup_2_workers": speedup})
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
