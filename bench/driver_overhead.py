"""What the search driver spends per trial, without any worker: Optuna's ask, then recording a result
(the driver's own `store.record`: the result's attributes and Optuna's tell), on the embedded study's space
with seeded synthetic metrics. Per sampler, on SQLite in its default journal mode (the baseline,
measured in the same run) and in the write-ahead-log mode mergeopt uses.

    python bench/driver_overhead.py [--trials 40] [--json runs/bench/driver_overhead.json]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, with_search, write_json  # noqa: E402

from mergeopt.loop import storage, store  # noqa: E402
from mergeopt.result import TrialResult  # noqa: E402
from mergeopt.space import load_space  # noqa: E402


def plain_sqlite(url: str) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})


def run(space, trials: int) -> dict[str, float]:
    rng = random.Random(0)
    ask_s = tell_s = 0.0
    with tempfile.TemporaryDirectory() as d:
        study = store.open_study(with_search(space, baselines=False), Path(d))
        for _ in range(trials):
            t = time.perf_counter()
            trial = study.ask(space.distributions())
            t1 = time.perf_counter()
            help_, harm = rng.random(), rng.random()
            metrics = {"helpfulness": help_, "harm": harm, "over_refusal": 0.0, "unusable": 0.0,
                       "combined": help_ - harm}
            result = TrialResult(state="complete", worker=0, merge_s=0.05, eval_s=0.4, forward_s=0.38, metrics=metrics)
            store.record(space, study, trial, result, 0.45)
            ask_s += t1 - t
            tell_s += time.perf_counter() - t1
    return {"ask_ms": 1000 * ask_s / trials, "tell_ms": 1000 * tell_s / trials, "total_ms": 1000 * (ask_s + tell_s) / trials}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="search_spaces/safety_multilingual.yaml")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--samplers", default="cmaes,tpe")
    ap.add_argument("--json", default="runs/bench/driver_overhead.json")
    args = ap.parse_args()
    m = machine()
    print(f"machine: {machine_line(m)}; {args.trials} trials, no workers")
    wal_storage = storage.sqlite_storage
    rows = []
    for sampler in args.samplers.split(","):
        space = with_search(load_space(args.space), sampler=sampler)
        run(space, 3)  # warm-up: the sampler's imports and first-use costs are not per-trial costs
        storage.sqlite_storage = plain_sqlite
        try:
            base = run(space, args.trials)
        finally:
            storage.sqlite_storage = wal_storage
        wal = run(space, args.trials)
        rows.append({"sampler": sampler, "default_journal": base, "wal": wal,
                     "storage_ratio": base["total_ms"] / wal["total_ms"]})
        print(f"{sampler:6s} per trial: default journal ask {base['ask_ms']:.1f} ms + record {base['tell_ms']:.1f} ms; "
              f"WAL ask {wal['ask_ms']:.1f} ms + record {wal['tell_ms']:.1f} ms; "
              f"{base['total_ms'] / wal['total_ms']:.2f}x less driver time with WAL")
    out = write_json(args.json, {"machine": m, "trials": args.trials, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
