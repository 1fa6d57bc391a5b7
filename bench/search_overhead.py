"""On the embedded study: the share of trial wall time spent in merge + forward passes, and trials per
second with 1 and with 2 workers (start-up excluded: from the first trial's start to the last one's end).

    python bench/search_overhead.py [--trials 24] [--json runs/bench/search_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna


def run(space: str, workers: int, trials: int, run_dir: Path) -> dict:
    subprocess.run([sys.executable, "-m", "mergeopt.cli", "optimize", "--space", space, "--workers", str(workers),
                    "--n-trials", str(trials), "--run-dir", str(run_dir), "--quiet"], check=True, capture_output=True)
    name = json.loads((run_dir / "space.json").read_text())["name"]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'study.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    wall = sum(t.user_attrs["wall_s"] for t in done)
    merge = sum(t.user_attrs["merge_s"] for t in done)
    fwd = sum(t.user_attrs.get("forward_s", 0.0) for t in done)
    ev = sum(t.user_attrs["eval_s"] for t in done)
    return {"workers": workers, "trials": len(done), "span_s": span, "trials_per_s": len(done) / span,
            "merge_forward_share": (merge + fwd) / wall, "merge_eval_share": (merge + ev) / wall,
            "merge_s_mean": merge / len(done), "forward_s_mean": fwd / len(done), "eval_s_mean": ev / len(done),
            "wall_s_mean": wall / len(done)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="search_spaces/safety_multilingual.yaml")
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--json", default="runs/bench/search_overhead.json")
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; space {args.space}, {args.trials} trials per run")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for workers in (1, 2):
            r = run(args.space, workers, args.trials, Path(d) / f"w{workers}")
            rows.append(r)
            print(f"{workers} worker(s): {r['trials_per_s']:.2f} trials/s; per trial merge {r['merge_s_mean'] * 1000:.1f} ms, "
                  f"forward passes {r['forward_s_mean'] * 1000:.0f} ms, evaluation {r['eval_s_mean'] * 1000:.0f} ms, "
                  f"wall {r['wall_s_mean'] * 1000:.0f} ms; merge + forward {r['merge_forward_share']:.1%} of trial wall time "
                  f"(target >= 95%), merge + evaluation {r['merge_eval_share']:.1%}")
            shutil.rmtree(Path(d) / f"w{workers}")
    speedup = rows[1]["trials_per_s"] / rows[0]["trials_per_s"]
    print(f"2 workers / 1 worker: {speedup:.2f}x trials per second (target >= 1.7x)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "speedup_2_workers": speedup}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
