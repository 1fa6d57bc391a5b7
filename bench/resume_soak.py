"""Kill the embedded study (SIGKILL to the driver and its Ray processes) at random points, resume it each
time, and check that every trial finished before a kill survives unchanged. Prints trials lost (target
0) and the time lost to restarts, against an uninterrupted run measured in the same bench.

    python bench/resume_soak.py [--kills 10] [--trials 40] [--json runs/bench/resume_soak.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

NAME = "safety_multilingual"


def command(space: str, run: Path, trials: int) -> list[str]:
    return [sys.executable, "-m", "mergeopt.cli", "optimize", "--space", space, "--run-dir", str(run), "--n-trials",
            str(trials), "--quiet", "--no-export"]


def complete(run: Path) -> dict[int, tuple]:
    if not (run / "study.db").exists():
        return {}
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{run / 'study.db'}")
    return {t.number: (tuple(sorted(t.params.items())), tuple(t.values)) for t in study.trials
            if t.state == optuna.trial.TrialState.COMPLETE}


def stop_ray() -> None:
    ray = Path(sys.executable).parent / "ray"
    subprocess.run([str(ray), "stop", "--force"], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="search_spaces/safety_multilingual.yaml")
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="runs/bench/resume_soak.json")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as d:
        base_run, soak_run = Path(d) / "baseline", Path(d) / "soak"
        t = time.perf_counter()
        subprocess.run(command(args.space, base_run, args.trials), check=True, capture_output=True)
        baseline = time.perf_counter() - t
        seen: dict[int, tuple] = {}
        lost: set[int] = set()
        changed: set[int] = set()
        spent = 0.0
        kills = 0
        for _ in range(args.kills):
            t = time.perf_counter()
            p = subprocess.Popen(command(args.space, soak_run, args.trials), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                p.wait(timeout=rng.uniform(6.0, 20.0))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                kills += 1
            spent += time.perf_counter() - t
            stop_ray()
            now = complete(soak_run)
            lost |= {k for k in seen if k not in now}
            changed |= {k for k in seen if k in now and now[k] != seen[k]}
            seen.update(now)
            if len(now) >= args.trials:
                break
        t = time.perf_counter()
        subprocess.run(command(args.space, soak_run, args.trials), check=True, capture_output=True)
        spent += time.perf_counter() - t
        final = complete(soak_run)
        lost |= {k for k in seen if k not in final}
        changed |= {k for k in seen if k in final and final[k] != seen[k]}
    print(f"{kills} kills (SIGKILL to the driver and its Ray processes) and resumes of {args.trials} trials")
    print(f"trials lost: {len(lost)}, changed: {len(changed)} (target 0); complete at the end: {len(final)}/{args.trials}")
    print(f"wall time {spent:.0f} s against {baseline:.0f} s uninterrupted: {spent - baseline:.0f} s lost to restarts, "
          f"{(spent - baseline) / max(kills, 1):.1f} s per kill ({spent / baseline:.2f}x)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"kills": kills, "trials": args.trials, "lost": sorted(lost), "changed": sorted(changed),
                               "complete": len(final), "soak_s": spent, "baseline_s": baseline}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
