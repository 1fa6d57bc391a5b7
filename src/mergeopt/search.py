"""The study: samplers, the ask/tell loop over the workers, pruning on the subset stage, resume.

The driver never merges or evaluates; it asks Optuna for a candidate whenever a worker is free, so no
worker waits on another's trial, and tells the result as soon as it arrives. Optuna's storage is the
single source of truth: a re-run on the same run folder continues the study."""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from .errors import UserError
from .objectives import combined_score, hypervolume, objective_values, pareto_mask
from .space import Space

optuna.logging.set_verbosity(optuna.logging.WARNING)

SEED_STRIDE = 1_000_003  # trial seed = study seed * stride + trial number: distinct, reproducible masks
MAX_RETRIES = 2  # a trial whose worker died is retried this many times, with the same seed


def make_sampler(space: Space) -> optuna.samplers.BaseSampler:
    s = space.search
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=s.seed, multivariate=True, constant_liar=True,
                                          n_startup_trials=min(10, max(4, s.n_trials // 4)))
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=min(50, max(8, s.n_trials // 5)))
    if s.sampler == "nsga3":
        return optuna.samplers.NSGAIIISampler(seed=s.seed, population_size=min(50, max(8, s.n_trials // 5)))
    if s.sampler == "gp":
        return optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=min(10, max(4, s.n_trials // 4)),
                                         warn_independent_sampling=False)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.sampler == "cmaes":
        # starts at the centre of the (normalised) box with a step of 1/6 of its width: Optuna's defaults
        return optuna.samplers.CmaEsSampler(seed=s.seed, warn_independent_sampling=False)
    if s.sampler == "grid":
        import numpy as np

        grid: dict[str, list[Any]] = {}
        for name, d in space.distributions().items():
            if isinstance(d, optuna.distributions.CategoricalDistribution):
                grid[name] = list(d.choices)
            else:
                grid[name] = [float(x) for x in np.linspace(d.low, d.high, s.grid_points)]
        return optuna.samplers.GridSampler(grid, seed=s.seed)
    raise UserError(f"search.sampler: unknown sampler {s.sampler!r}")


def directions(space: Space) -> list[str]:
    if space.search.sampler == "cmaes":  # single-objective: the combined score (the mergekit-evolve way)
        return ["maximize"]
    return [o.direction for o in space.objectives]


def check_resumable(space: Space, run_dir: Path) -> None:
    """Refuse, before anything is loaded or written, a run folder that a different space file made."""
    if space.storage is None and (run_dir / "study.db").exists():
        open_study(space, run_dir)


def preflight(space: Space) -> None:
    """What can be checked in the driver before any worker starts or any file is written: the
    evaluation's prompt files, judge model folder and lm-eval task names."""
    from .evaluation.assets import resolve_assets

    assets = resolve_assets(space.evaluation, "validation")
    judge = assets.judge
    if judge.kind != "refusal_markers" and (not judge.model or not Path(judge.model).is_dir()):
        raise UserError(f"evaluation.judge.model: {judge.model} not found; expected a local model folder for {judge.kind!r}")
    if assets.include_path and assets.tasks:
        import difflib

        from lm_eval.tasks import TaskManager

        known = set(TaskManager(include_path=assets.include_path, include_defaults=False).all_tasks)
        for lang, task in assets.tasks.items():
            if task not in known:
                close = difflib.get_close_matches(task, sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise UserError(f"evaluation tasks.{lang}: lm-eval does not know task {task!r}{hint}")


def sqlite_storage(url: str) -> optuna.storages.RDBStorage:
    """SQLite in write-ahead-log mode with `synchronous=NORMAL`: a commit no longer waits for two disk
    syncs (1.4-2.0x less driver time per trial, `bench/driver_overhead.py`), and a killed process still
    loses no committed trial (only a power cut can undo the last commits). WAL needs a local disk:
    on a shared cluster filesystem, give the space a `storage:` URL of a database server instead."""
    import sqlalchemy

    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})

    @sqlalchemy.event.listens_for(storage.engine, "connect")
    def _pragmas(conn, _record) -> None:
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    storage.engine.dispose()  # connections opened before the hook get the pragmas on reconnect
    return storage


# The version of the merge rules: it changes when the same recipe and seed give different weights, so a
# study recorded under other rules is not resumed or exported (its trials would not re-materialize).
MERGE_RULES = 2
MERGE_RULES_CHANGES = "2: DARE/DELLA masks from a counter-based hash; TIES keeps entries tied at its threshold"


def open_study(space: Space, run_dir: Path, *, merging: bool = True) -> optuna.Study:
    """Create the study, or load it from the run folder's storage to resume. A run folder made by a
    different space file is refused, and so is one whose trials were merged by other merge rules when
    its trials are to be merged again (resume, export); reading its results is always allowed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    url = space.storage or f"sqlite:///{run_dir / 'study.db'}"
    storage = sqlite_storage(url) if url.startswith("sqlite") else url
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage)} if url.startswith("sqlite") else set()
    if space.name in existing:
        study = optuna.load_study(study_name=space.name, storage=storage, sampler=make_sampler(space))
        fp = study.user_attrs.get("fingerprint")
        if fp != space.fingerprint():
            raise UserError(f"{run_dir}: this run folder was made by a different search space (fingerprint {fp}, "
                            f"this file {space.fingerprint()}); use --run-dir to start fresh elsewhere or delete the folder")
        rules = int(study.user_attrs.get("merge_rules", 1))
        if merging and rules != MERGE_RULES:
            raise UserError(f"{run_dir}: this run folder was recorded with merge rules version {rules}, this mergeopt "
                            f"merges with version {MERGE_RULES} ({MERGE_RULES_CHANGES}), so its trials cannot be "
                            "re-merged or exported exactly; use --run-dir to start fresh elsewhere")
        return study
    study = optuna.create_study(study_name=space.name, storage=storage, sampler=make_sampler(space),
                                directions=directions(space))
    study.set_user_attr("fingerprint", space.fingerprint())
    study.set_user_attr("merge_rules", MERGE_RULES)
    study.set_user_attr("space", space.model_dump(mode="json", by_alias=True))
    if space.search.baselines:
        for i, params in enumerate(space.baselines()):
            study.enqueue_trial(params, user_attrs={"baseline": "uniform average" if i == 0 and len(space.models) > 1
                                                     else f"{_alone(space, params)} alone"})
    return study


def _alone(space: Space, params: dict) -> str:
    for m in space.models:
        if params.get(f"weight/{m.key}", 0) == max(params.get(f"weight/{k.key}", 0) for k in space.models):
            return m.key
    return "?"


def _requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial | optuna.trial.Trial, reason: str) -> None:
    """Fail a trial that did not finish, without counting it, and enqueue its parameters again."""
    storage, tid = study._storage, trial._trial_id
    storage.set_trial_user_attr(tid, "interrupted", True)
    storage.set_trial_user_attr(tid, "reason", reason)
    storage.set_trial_state_values(tid, optuna.trial.TrialState.FAIL)
    if trial.params:
        study.enqueue_trial(trial.params, user_attrs={k: v for k, v in trial.user_attrs.items() if k in ("baseline", "seed")})


def recover_interrupted(study: optuna.Study) -> int:
    """Trials a crash left RUNNING are failed and their parameters enqueued again."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in running:
        _requeue(study, t, "interrupted: the driver stopped before the trial ended")
    return len(running)


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count toward n_trials: complete, pruned, or failed for a reason of their own."""
    S = optuna.trial.TrialState
    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (S.COMPLETE, S.PRUNED) or (t.state == S.FAIL and not t.user_attrs.get("interrupted"))]


@dataclass
class Progress:
    done: int = 0
    total: int = 0
    best_combined: float = float("-inf")
    front_size: int = 0
    hypervolume: float = 0.0


class Front:
    """The finished trials' objective values and best combined score, kept by the driver as results
    arrive, so progress costs no storage read per trial."""

    def __init__(self, space: Space, study: optuna.Study):
        self.space = space
        self.values: list[list[float]] = []
        self.best = float("-inf")
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            self.add(t.user_attrs["metrics"])

    def add(self, metrics: dict[str, float]) -> None:
        self.values.append(objective_values(self.space, metrics))
        self.best = max(self.best, metrics["combined"])

    def stats(self) -> tuple[float, int, float]:
        if not self.values:
            return float("-inf"), 0, 0.0
        return self.best, int(pareto_mask(self.space, self.values).sum()), hypervolume(self.space, self.values)


def prune_threshold(space: Space, study: optuna.Study) -> float | None:
    """Median pruner on the subset stage: a candidate whose subset combined score falls below the median
    subset score of the finished trials stops early (after 8 finished trials)."""
    if space.search.pruner != "median" or not space.evaluation.subset_fraction:
        return None
    scores = sorted(t.user_attrs["subset"]["combined"] for t in study.get_trials(deepcopy=False)
                    if "subset" in t.user_attrs and t.state == optuna.trial.TrialState.COMPLETE)
    if len(scores) < 8:
        return None
    return scores[len(scores) // 2]


class InlinePool:
    """Workers in this process, one after another: tests, debugging, one worker without Ray."""

    def __init__(self, space: Space, workers: int, **load: bool):
        from .worker import TrialWorker

        self.workers = [TrialWorker(space.model_dump(mode="json", by_alias=True), worker_id=0, **load)]
        self.results: dict[int, dict] = {}

    @property
    def size(self) -> int:
        return 1

    def submit(self, slot: int, params: dict, seed: int, prune_below: float | None) -> Any:
        token = len(self.results)
        self.results[token] = self.workers[slot].run(params, seed, prune_below)
        return token

    def wait(self, pending: dict, timeout: float | None = None) -> tuple[Any, dict] | None:
        key = next(iter(pending))  # ran at submission: always ready
        return key, self.results.pop(key)

    def probe(self, slot: int) -> Any:
        token = -1 - len(self.results)
        self.results[token] = {"worker": slot}
        return token

    def close(self) -> None:
        pass


class RayPool:
    """One Ray actor per worker (a GPU each when the node has GPUs, else one CPU and one torch thread);
    the base and task vectors go into the object store once and are shared by the actors of a node."""

    asynchronous = True  # trials run while the driver asks and tells

    def __init__(self, space: Space, workers: int, address: str | None, **load: bool):
        import os

        import ray
        import torch

        from .worker import TrialWorker, load_resident, pack_tensors

        env = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if address is None:  # a private local instance needs no token; a cluster keeps its own setting
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # The core worker warns that restartable actors take object-store arguments; the reference is
        # kept alive by this pool for the whole study, so the restart it warns about cannot fail here.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        zoo_dir = os.environ.get("MERGEOPT_ZOO_DIR")
        if zoo_dir:
            env["MERGEOPT_ZOO_DIR"] = zoo_dir
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False,
                                  "runtime_env": {"env_vars": env}}
            if address:
                ray.init(address=address, **kw)
            else:
                ray.init(num_cpus=max(workers * space.search.cpus_per_worker, 1), **kw)
        self.ray = ray
        gpus = space.search.gpus_per_worker
        if gpus is None:
            gpus = 1 if (ray.cluster_resources().get("GPU", 0) or torch.cuda.is_available()) else 0
        _, merger = load_resident(space, **load)
        shared = ray.put(pack_tensors(merger.base, merger.taus))
        del merger
        actor = ray.remote(num_cpus=space.search.cpus_per_worker, num_gpus=gpus, max_restarts=2,
                           max_task_retries=0)(TrialWorker)
        data = space.model_dump(mode="json", by_alias=True)
        self.workers = [actor.remote(data, [shared], worker_id=i, threads=1, **load) for i in range(workers)]
        ray.get([w.info.remote() for w in self.workers])  # start-up errors surface here

    @property
    def size(self) -> int:
        return len(self.workers)

    def submit(self, slot: int, params: dict, seed: int, prune_below: float | None) -> Any:
        return self.workers[slot].run.remote(params, seed, prune_below)

    def probe(self, slot: int) -> Any:
        """A call that answers once the slot's actor is back (Ray restarts a dead actor)."""
        return self.workers[slot].info.remote()

    def wait(self, pending: dict, timeout: float | None = None) -> tuple[Any, dict] | None:
        """One finished call and its result; None when none finished within `timeout` seconds."""
        ready, _ = self.ray.wait(list(pending), num_returns=1, timeout=timeout)
        if not ready:
            return None
        try:
            return ready[0], self.ray.get(ready[0])
        except self.ray.exceptions.RayActorError as e:
            cause = "out of memory" if "OutOfMemory" in type(e).__name__ or "memory" in str(e).lower()[:400] else "killed"
            return ready[0], {"state": "fail", "worker_died": True, "reason": f"worker died ({cause}: {type(e).__name__})"}

    def close(self) -> None:
        for w in self.workers:
            self.ray.kill(w)


def memory_plan(space: Space, workers: int, **load: bool) -> dict[str, float]:
    """Bytes a study needs on this node: the base and task vectors once (shared through the object
    store, plus the driver's copy while it puts them there), and per worker a model, its activations,
    the libraries' own footprint and, when TIES is searched, the sorted magnitudes of every task vector."""
    from .checkpoints import Checkpoint
    from .merge import resolve_model_path
    from .methods.task_arithmetic import RANKED_METHODS

    ck = Checkpoint(resolve_model_path(space.base_model), **load)
    elem = 2 if space.dtype == "bfloat16" else 4
    params = sum(math.prod(ck.shape(n)) for n in ck.names)
    shared = params * elem * (1 + len(space.models))
    per_worker = params * 4 * 1.25 + 600 * 2**20  # fp32 model, activations, runtime (torch, lm-eval)
    # TIES looks its thresholds up in each task vector's sorted magnitudes, kept by each worker (float32)
    ranks = params * 4 * len(space.models) if RANKED_METHODS.intersection(space.methods) else 0
    per_worker += ranks
    return {"params": params, "shared_bytes": shared, "driver_bytes": shared, "per_worker_bytes": per_worker,
            "ties_ranks_bytes": ranks, "total_bytes": 2 * shared + workers * per_worker}


def check_memory(space: Space, workers: int, gpus: bool, **load: bool) -> None:
    """Refuse to start a study that would not fit, instead of being killed hours later."""
    import psutil

    plan = memory_plan(space, workers, **load)
    gib = 2**30
    avail = psutil.virtual_memory().available
    if plan["total_bytes"] > 0.9 * avail:
        fit = max(0, int((0.9 * avail - 2 * plan["shared_bytes"]) // plan["per_worker_bytes"]))
        raise UserError(f"{space.name}: {workers} worker(s) need about {plan['total_bytes'] / gib:.1f} GiB of RAM "
                        f"({plan['shared_bytes'] / gib:.1f} GiB base and task vectors, {plan['per_worker_bytes'] / gib:.1f} GiB "
                        f"per worker) but {avail / gib:.1f} GiB is free; use --workers {fit}" +
                        ("" if space.dtype == "bfloat16" else " or dtype: bfloat16"))
    if gpus:
        import torch

        free, _ = torch.cuda.mem_get_info()
        need = plan["shared_bytes"] + plan["per_worker_bytes"]
        if need > 0.9 * free:
            raise UserError(f"{space.name}: one worker needs about {need / gib:.1f} GiB of GPU memory but "
                            f"{free / gib:.1f} GiB is free; use dtype: bfloat16 or a GPU with more memory")


def run_study(space: Space, run_dir: Path, *, n_trials: int, workers: int, address: str | None = None,
              backend: str = "ray", on_progress: Callable[[Progress], None] | None = None,
              allow_pickle: bool = False, trust_remote_code: bool = False, pool: Any = None) -> optuna.Study:
    """Run (or resume) the study. Everything that can be refused is checked before anything is
    written: memory, the run folder's origin, the evaluation assets, and every model's tensors (loaded
    by the pool). A `pool` passed in (its workers built for a space with the same models and
    evaluation) is used and left open, so benchmarks can run many studies on the same warm workers."""
    load = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    own_pool = pool is None
    if address is None and own_pool:
        import torch

        check_memory(space, 1 if backend == "inline" else workers, torch.cuda.is_available(), **load)
    check_resumable(space, run_dir)
    preflight(space)
    done_before = 0
    if (run_dir / "study.db").exists() and space.storage is None:
        done_before = len(finished(open_study(space, run_dir)))
    if own_pool and done_before < n_trials:  # built before the study is created: a bad model writes nothing
        pool = InlinePool(space, workers, **load) if backend == "inline" else \
            RayPool(space, min(workers, n_trials - done_before), address, **load)
    study = open_study(space, run_dir)
    recover_interrupted(study)
    (run_dir / "space.json").write_text(json.dumps(space.model_dump(mode="json", by_alias=True), indent=2))
    prog = Progress(total=n_trials)
    prog.done = len(finished(study))
    front = Front(space, study)
    prog.best_combined, prog.front_size, prog.hypervolume = front.stats()
    if on_progress:
        on_progress(prog)
    if prog.done >= n_trials or pool is None:
        if pool is not None and own_pool:
            pool.close()
        return study
    deadline = time.perf_counter() + space.search.timeout if space.search.timeout else math.inf
    pending: dict[Any, tuple[optuna.trial.Trial | None, int, float]] = {}  # trial None: a probe of a dead worker
    received: deque[tuple[optuna.trial.Trial, dict, float]] = deque()  # results not yet recorded
    free = list(range(pool.size))
    probes: dict[int, int] = {}  # slot -> probes tried since its worker died
    # With several asynchronous workers, each worker's next candidate is asked while its current trial
    # runs, so no worker waits on the sampler or the storage: the candidate sees every finished trial
    # but the one its worker is running (the constant liar stands in for it). One worker stays strictly
    # sequential, so the same seed gives the same trials, resumed or not.
    ahead: dict[int, optuna.trial.Trial] = {}
    ask_ahead = getattr(pool, "asynchronous", False) and pool.size > 1

    def open_trials() -> int:
        return sum(t is not None for t, _, _ in pending.values()) + len(ahead) + len(received)

    def room() -> bool:
        return prog.done + open_trials() < n_trials and time.perf_counter() < deadline

    def ask() -> optuna.trial.Trial:
        trial = study.ask(space.distributions())
        trial.set_user_attr("seed", int(trial.user_attrs.get("seed", space.search.seed * SEED_STRIDE + trial.number)))
        return trial

    def submit(slot: int, trial: optuna.trial.Trial) -> None:
        seed = int(trial.user_attrs["seed"])
        pending[pool.submit(slot, trial.params, seed, prune_threshold(space, study))] = (trial, slot, time.perf_counter())

    def receive(key: Any, result: dict) -> None:
        """A finished call: its worker starts its next candidate at once, the result is recorded later."""
        trial, slot, t_sub = pending.pop(key)
        if trial is None:  # a probe: the slot is usable again once its restarted actor answers
            if result.get("worker_died") and probes.get(slot, 0) < 30:
                probes[slot] = probes.get(slot, 0) + 1
                time.sleep(1.0)
                pending[pool.probe(slot)] = (None, slot, time.perf_counter())
            elif not result.get("worker_died"):
                probes.pop(slot, None)
                free.append(slot)
            return  # a worker that never comes back is dropped; the others go on
        wall = time.perf_counter() - t_sub
        if result.get("worker_died"):
            pending[pool.probe(slot)] = (None, slot, time.perf_counter())
        elif slot in ahead and time.perf_counter() < deadline:
            submit(slot, ahead.pop(slot))
        else:
            free.append(slot)
        received.append((trial, result, wall))

    # The driver's work comes in units (record one result, ask one candidate), the most urgent first;
    # between units it collects whatever finished, so a worker waits on the driver for one unit at
    # most, never for a whole round of bookkeeping.
    try:
        while True:
            for slot in [x for x in free if x in ahead and time.perf_counter() < deadline]:  # asked already
                free.remove(slot)
                submit(slot, ahead.pop(slot))
            if pending and (got := pool.wait(pending, timeout=0)) is not None:
                receive(*got)
                continue
            if received:
                trial, result, wall = received.popleft()
                if _tell(space, study, trial, result, wall):
                    prog.done += 1
                if result.get("state") == "complete":
                    front.add(result["metrics"])
                prog.best_combined, prog.front_size, prog.hypervolume = front.stats()
                if on_progress:
                    on_progress(prog)
                continue
            if free and room():  # an idle worker: its candidate is asked now
                submit(free.pop(0), ask())
                continue
            behind = [slot for t, slot, _ in pending.values() if t is not None and slot not in ahead] if ask_ahead else []
            if behind and room():
                ahead[behind[0]] = ask()
                continue
            if not pending:
                break
            receive(*pool.wait(pending))
    finally:
        if own_pool:
            pool.close()
        for trial in ahead.values():  # asked but never started (timeout, or a worker that never came back)
            _requeue(study, trial, "not started: the study stopped first")
    return study


def _tell(space: Space, study: optuna.Study, trial: optuna.trial.Trial, result: dict, wall: float) -> bool:
    """Record a result; True when the trial counts toward n_trials (not one that runs again)."""
    # One write for the timings: each attribute is its own storage transaction, on the driver's clock.
    timing = {k: result[k] for k in ("worker", "merge_s", "eval_s", "forward_s") if k in result}
    timing.update(wall_s=wall, overhead_s=max(0.0, wall - result.get("merge_s", 0.0) - result.get("eval_s", 0.0)))
    trial.set_user_attr("timing", timing)
    for key in ("subset", "reason"):
        if key in result:
            trial.set_user_attr(key, result[key])
    state = result.get("state")
    if state == "complete":
        m = result["metrics"]
        trial.set_user_attr("metrics", m)
        values = [combined_score(space, m)] if space.search.sampler == "cmaes" else objective_values(space, m)
        study.tell(trial, values)
        return True
    if state == "pruned":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return True
    counted = True
    trial.set_user_attr("reason", result.get("reason", "unknown failure"))
    if result.get("worker_died"):
        retries = int(trial.user_attrs.get("retries", 0))
        if retries < MAX_RETRIES:  # not counted: its parameters run again, same seed, on a restarted worker
            trial.set_user_attr("interrupted", True)
            keep = {k: v for k, v in trial.user_attrs.items() if k in ("baseline", "seed")}
            study.enqueue_trial(trial.params, user_attrs={**keep, "retries": retries + 1})
            counted = False
        else:
            trial.set_user_attr("reason", f"{result.get('reason')}; gave up after {MAX_RETRIES} retries")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return counted
