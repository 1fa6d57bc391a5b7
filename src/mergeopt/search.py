"""Run (or resume) a study: the path of setup, top to bottom.

1. Preflight (loop/preflight.py): the run folder, the models' headers, memory, the storage and its
   lease, the evaluation's assets. Nothing is started or written before these pass.
2. The workers: every model's tensors are loaded and checked here, so a bad model writes nothing.
3. The study: created or resumed, under this driver's lease (loop/lease.py); trials a dead driver left
   running are requeued.
4. The scheduler runs the ask/tell loop until the trials are done, the timeout passes, or no worker
   is left (`StudyIncomplete`: never a silent, successful end)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna

from .errors import StudyIncomplete
from .loop.inline_pool import InlinePool
from .loop.lease import Lease
from .loop.pools import PhaseCallback, WorkerPool
from .loop.preflight import preflight
from .loop.progress import Progress
from .loop.ray_pool import RayPool
from .loop.scheduler import Phase, Scheduler
from .loop.storage import clear_stale_lock, storage_spec
from .loop.store import finished, open_study, recover_interrupted


def run_study(space, run_dir: Path, *, n_trials: int, workers: int, address: str | None = None,
              backend: str = "ray", on_progress: Callable[[Progress], None] | None = None,
              on_phase: PhaseCallback | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
              dashboard: bool = False, pool: WorkerPool | None = None) -> optuna.Study:
    """A `pool` passed in (its workers built for a space with the same models and evaluation) is used
    and left open, so benchmarks can run many studies on the same warm workers."""
    load = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    phase = on_phase or (lambda _: None)
    own_pool = pool is None
    phase("checking")
    existing = preflight(space, run_dir, workers=1 if backend == "inline" else workers, ray=backend != "inline",
                         memory=address is None and own_pool, **load)
    done_before = len(finished(existing)) if existing is not None else 0
    if own_pool and done_before < n_trials:
        pool = (InlinePool(space, on_phase=on_phase, **load) if backend == "inline" else
                RayPool(space, min(workers, n_trials - done_before), address, dashboard=dashboard,
                        on_phase=on_phase, **load))
    lease: Lease | None = None
    try:
        if existing is None:
            study = open_study(space, run_dir)
        else:  # already found and checked above: not opened a second time
            study = existing
            run_dir.mkdir(parents=True, exist_ok=True)
        scheduler: Scheduler | None = None
        lease = Lease(study, where=storage_spec(space.storage, run_dir).url,
                      trials=lambda: scheduler.trial_ids() if scheduler is not None else [],
                      heartbeat=_trial_heartbeat(study))
        lease.acquire(on_takeover=lambda: clear_stale_lock(space.storage, run_dir))  # a dead driver's lock is free
        if _trial_heartbeat(study) is not None:
            with warnings.catch_warnings():  # experimental (not deprecated) since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # Optuna's retry callback enqueues each with its seed
        recover_interrupted(study)
        (run_dir / "space.json").write_text(json.dumps(space.model_dump(mode="json", by_alias=True), indent=2))
        if pool is None or done_before >= n_trials:
            if on_progress:
                on_progress(Progress(phase=Phase.DONE.value, done=done_before, total=n_trials))
            return study
        phase("running")
        scheduler = Scheduler(space, study, pool, n_trials=n_trials, on_progress=on_progress, lease=lease)
        outcome = scheduler.run()
        if pool.workers():
            (run_dir / "workers.json").write_text(json.dumps(pool.workers(), indent=2))
    finally:
        if own_pool and pool is not None:
            pool.close()
        if lease is not None and lease.lost is None:
            lease.release()
    if outcome is Phase.LEASE_LOST:
        raise StudyIncomplete(f"this driver stopped: {lease.lost}", scheduler.progress.done, n_trials)
    if outcome is Phase.NO_WORKERS:
        raise StudyIncomplete(f"every worker was lost and could not be replaced ({scheduler.lost_reason()})",
                              scheduler.progress.done, n_trials)
    return study


def _trial_heartbeat(study: optuna.Study) -> Callable[[int], None] | None:
    """The storage's own per-trial heartbeat, where it has one (a database server; see loop/storage.py)."""
    storage = study._storage  # Optuna's Study exposes no public accessor for its storage
    if getattr(storage, "get_heartbeat_interval", lambda: None)() is None:
        return None
    return storage.record_heartbeat
