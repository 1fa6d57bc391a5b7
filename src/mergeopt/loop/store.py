"""The study in its storage: find, open or create it, resume it, requeue what did not finish, record
results. Optuna's storage is the single source of truth: a re-run on the same run folder continues.

One driver runs a study at a time: on resume, trials left RUNNING belong to a driver that is gone."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna

from ..errors import UserError
from ..objectives import combined_score, objective_values
from ..result import TrialResult
from ..space import Space
from .samplers import SAMPLERS, directions, make_sampler, metric_names
from .storage import open_storage, storage_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)

SEED_STRIDE = 1_000_003  # trial seed = study seed * stride + trial number: distinct, reproducible masks
MAX_RETRIES = 2  # a trial whose worker died is retried this many times, with the same seed

# The version of the merge rules: it changes when the same recipe and seed give different weights, so a
# study recorded under other rules is not resumed or exported (its trials would not re-materialize).
MERGE_RULES = 2
MERGE_RULES_CHANGES = "2: DARE/DELLA masks from a counter-based hash; TIES keeps entries tied at its threshold"

S = optuna.trial.TrialState


def find_study(space: Space, run_dir: Path, *, merging: bool = True) -> optuna.Study | None:
    """The space's study when its storage holds one, checked; None otherwise. Writes nothing to a
    storage file that does not exist yet."""
    if not storage_spec(space.storage, run_dir).exists():
        return None
    storage = open_storage(space.storage, run_dir)
    if space.name not in optuna.study.get_all_study_names(storage):
        return None
    study = optuna.load_study(study_name=space.name, storage=storage, sampler=make_sampler(space))
    fp = study.user_attrs.get("fingerprint")
    if fp != space.fingerprint():
        if storage_spec(space.storage, run_dir).kind == "rdb":  # a server names studies, not run folders
            raise UserError(f"storage: {storage_spec(space.storage, run_dir).url} holds a study named {space.name!r} "
                            f"made by a different search space (fingerprint {fp}, this file {space.fingerprint()}); "
                            "give this space file another `name`")
        raise UserError(f"{run_dir}: this run folder was made by a different search space (fingerprint {fp}, "
                        f"this file {space.fingerprint()}); use --run-dir to start fresh elsewhere or delete the folder")
    rules = int(study.user_attrs.get("merge_rules", 1))
    if merging and rules != MERGE_RULES:
        raise UserError(f"{run_dir}: this run folder was recorded with merge rules version {rules}, this mergeopt "
                        f"merges with version {MERGE_RULES} ({MERGE_RULES_CHANGES}), so its trials cannot be "
                        "re-merged or exported exactly; use --run-dir to start fresh elsewhere")
    return study


def open_study(space: Space, run_dir: Path, *, merging: bool = True) -> optuna.Study:
    """Load the study to resume it, or create it with its baselines enqueued first."""
    run_dir.mkdir(parents=True, exist_ok=True)
    study = find_study(space, run_dir, merging=merging)
    if study is not None:
        return study
    study = optuna.create_study(study_name=space.name, storage=open_storage(space.storage, run_dir),
                                sampler=make_sampler(space), directions=directions(space))
    with warnings.catch_warnings():  # experimental (not deprecated) since Optuna 3.2
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(metric_names(space))  # the dashboard's axes: combined, or the objectives
    study.set_user_attr("fingerprint", space.fingerprint())
    study.set_user_attr("merge_rules", MERGE_RULES)
    study.set_user_attr("space", space.model_dump(mode="json", by_alias=True))
    if space.search.baselines:
        for i, params in enumerate(space.baselines()):
            study.enqueue_trial(params, user_attrs={"baseline": "uniform average" if i == 0 and len(space.models) > 1
                                                     else f"{_alone(space, params)} alone"})
    return study


def _alone(space: Space, params: dict) -> str:
    def weight(key: str) -> float:  # one weight, or the first of its layer groups
        return params.get(f"weight/{key}", params.get(f"weight/{key}/0", 0))

    for m in space.models:
        if weight(m.key) == max(weight(k.key) for k in space.models):
            return m.key
    return "?"


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count toward n_trials: complete, pruned, or failed for a reason of their own (not
    interrupted, and not a trial whose heartbeat stopped and that Optuna enqueued again)."""
    trials = study.get_trials(deepcopy=False)
    # what RetryHeartbeatStaleTrialCallback.retry_history reads, without its experimental warning per call
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [t for t in trials if t.state in (S.COMPLETE, S.PRUNED)
            or (t.state == S.FAIL and not t.user_attrs.get("interrupted") and t.number not in retried)]


def ask(space: Space, study: optuna.Study) -> optuna.trial.Trial:
    """The next candidate, with its seed: an enqueued retry keeps its own."""
    with warnings.catch_warnings():  # the driver records its trials' heartbeats itself (loop/lease.py)
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        trial = study.ask(space.distributions())
    trial.set_user_attr("seed", int(trial.user_attrs.get("seed", space.search.seed * SEED_STRIDE + trial.number)))
    return trial


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial | optuna.trial.Trial, reason: str) -> None:
    """Fail a trial that did not finish, without counting it, and enqueue its parameters again."""
    storage, tid = study._storage, trial._trial_id
    if trial.params:  # enqueued first: a crash in between leaves one extra run, never a lost one
        study.enqueue_trial(trial.params, user_attrs={k: v for k, v in trial.user_attrs.items() if k in ("baseline", "seed")})
    storage.set_trial_user_attr(tid, "interrupted", True)
    storage.set_trial_user_attr(tid, "reason", reason)
    storage.set_trial_state_values(tid, S.FAIL)


def recover_interrupted(study: optuna.Study) -> int:
    """Trials a crash left RUNNING are failed and their parameters enqueued again."""
    running = study.get_trials(deepcopy=False, states=(S.RUNNING,))
    for t in running:
        requeue(study, t, "interrupted: the driver stopped before the trial ended")
    return len(running)


def record(space: Space, study: optuna.Study, trial: optuna.trial.Trial, result: TrialResult, wall_s: float) -> bool:
    """Record a result; True when the trial counts toward n_trials (not one that runs again)."""
    trial.set_user_attr("timing", result.timing(wall_s))  # one write: each attribute is its own transaction
    if result.subset is not None:
        trial.set_user_attr("subset", result.subset)
    if result.state == "complete":
        trial.set_user_attr("metrics", result.metrics)
        single = SAMPLERS[space.search.sampler].single_objective
        _tell(study, trial, [combined_score(space, result.metrics)] if single else objective_values(space, result.metrics))
        return True
    if result.state == "pruned":
        _tell(study, trial, state=S.PRUNED)
        return True
    counted = True
    reason = result.reason or "unknown failure"
    if result.worker_died:
        retries = int(trial.user_attrs.get("retries", 0))
        if retries < MAX_RETRIES:  # not counted: its parameters run again, same seed, on another worker
            trial.set_user_attr("interrupted", True)
            keep = {k: v for k, v in trial.user_attrs.items() if k in ("baseline", "seed")}
            study.enqueue_trial(trial.params, user_attrs={**keep, "retries": retries + 1})
            counted = False
        else:
            reason = f"{reason}; gave up after {MAX_RETRIES} retries"
    trial.set_user_attr("reason", reason)
    _tell(study, trial, state=S.FAIL)
    return counted


def _tell(study: optuna.Study, trial: optuna.trial.Trial, values: list[float] | None = None, **kw) -> None:
    """Optuna's tell. The grid sampler calls `study.stop()` once every grid point has run, which raises
    outside `Study.optimize`; the trial is stored by then, and the driver stops by its own count."""
    try:
        study.tell(trial, values, **kw)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise
