"""One Ray actor per worker (a GPU each when the cluster has GPUs, else one CPU and one torch thread).
The base and task vectors go into the object store once, from the driver; each node keeps one copy,
which its actors map from shared memory. A lost actor is not restarted by Ray: the scheduler decides
whether to replace it (`start`), and the new actor may land on any node."""

from __future__ import annotations

import os
from collections.abc import Hashable
from typing import Any

from ..result import TrialResult
from ..signals import keep_handlers
from ..space import Space
from .pools import PhaseCallback, Started, WorkerPool

WORKER_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1",
              "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0",
              "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PASSED_ON = ("MERGEOPT_ZOO_DIR", "MERGEOPT_FAULT")  # the driver's settings its workers need too


def init_ray(address: str | None, cpus: float, *, dashboard: bool = False, object_store_bytes: int = 0) -> None:
    """Join a cluster (`address`), or start a private local instance sized for the workers, its object
    store large enough for the base and task vectors (Ray's default, 30% of memory, would spill them to disk)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None:  # a private local instance needs no token; a cluster keeps its own setting
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return
    env = dict(WORKER_ENV, **{k: os.environ[k] for k in PASSED_ON if os.environ.get(k)})
    kw: dict[str, Any] = {"include_dashboard": dashboard, "logging_level": "ERROR", "log_to_driver": False,
                          "runtime_env": {"env_vars": env}}
    if not address:  # "local": a new instance even when `ray start` left a cluster running on this machine
        import psutil

        default = int(0.3 * psutil.virtual_memory().available)
        if object_store_bytes * 1.1 + 512 * 2**20 > default:
            kw["object_store_memory"] = int(object_store_bytes * 1.1) + 512 * 2**20
        kw["num_cpus"] = max(cpus, 1)
    with keep_handlers():  # ray.init turns SIGTERM into a bare exit; the study's own stop must run
        ray.init(address=address or "local", **kw)


def _raised(e: Exception) -> str:
    """A Python exception inside a worker call, in one line: its type and first line."""
    cause = getattr(e, "cause", None) or e
    first = (str(cause).strip().splitlines() or [""])[0][:300]
    return f"{type(cause).__name__}: {first}" if first else type(cause).__name__


def _died(e: Exception) -> str:
    """Why an actor is gone, in a few words. Ray's generic death message mentions the OOM killer as
    one possible cause, so only the memory monitor's own wording counts as out of memory."""
    text = str(e).lower()
    if "running low on memory" in text or type(e).__name__ == "OutOfMemoryError":
        cause = "out of memory"
    elif getattr(e, "preempted", False):
        cause = "its node was preempted"
    elif getattr(e, "actor_init_failed", False):
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        cause = f"failed while starting: {lines[-1][:300]}" if lines else "failed while starting"
    else:
        cause = "killed"
    return f"worker died ({cause}: {type(e).__name__})"


class RayPool(WorkerPool):
    asynchronous = True
    replaceable = True

    def __init__(self, space: Space, workers: int, address: str | None, *, dashboard: bool = False,
                 on_phase: PhaseCallback | None = None, **load: bool):
        import ray
        import torch

        from ..worker import TrialWorker, shared_entries

        phase = on_phase or (lambda _: None)
        phase("starting Ray")
        from .preflight import study_plan

        store = study_plan(space, workers, **load)[0].need("object store") if address is None else 0
        init_ray(address, workers * space.search.cpus_per_worker, dashboard=dashboard, object_store_bytes=int(store))
        self.ray = ray
        gpus = space.search.gpus_per_worker
        if gpus is None:
            gpus = 1 if (ray.cluster_resources().get("GPU", 0) or torch.cuda.is_available()) else 0
        have = ray.cluster_resources().get("GPU", 0)
        if gpus and address is None and workers * gpus > have:  # the extra actors would wait forever
            from ..errors import UserError

            raise UserError(f"search.workers: {workers} worker(s) with {gpus:g} GPU each need {workers * gpus:g} "
                            f"GPUs, this node has {have:g}; use --workers {max(1, int(have // gpus))} or "
                            "search.gpus_per_worker")
        phase("loading models")
        # One object per tensor, put as it is computed: the node's one copy is the object store's, and the
        # driver never holds more than one tensor. Held for the study: replacement workers read them too.
        _, payloads = shared_entries(space, **load)
        self.shared = [ray.put(p) for p in payloads]
        self.actor = ray.remote(num_cpus=space.search.cpus_per_worker, num_gpus=gpus, max_restarts=0,
                                max_task_retries=0)(TrialWorker)
        self.data = space.model_dump(mode="json", by_alias=True)
        self.load = load
        self.handles: list[Any] = [self._new(i) for i in range(workers)]
        self.calls: dict[Hashable, int] = {}  # trial call -> slot
        self.starts: dict[Hashable, int] = {}  # start call -> slot
        self.info: dict[int, dict[str, Any]] = {}
        self.failed_at_start: dict[int, str] = {}  # slot -> why its first worker never came up
        self.raised_at_start: dict[int, str] = {}  # slot -> the exception its first worker raised while starting
        phase("starting workers")
        self._settle({w.info.remote(): i for i, w in enumerate(self.handles)})
        phase("preparing evaluation")
        self._settle({w.prepare.remote(): i for i, w in enumerate(self.handles) if i not in self.failed_at_start})
        if self.handles and len(self.raised_at_start) == len(self.handles):  # an input error, not lost workers
            from ..errors import UserError

            self.close()
            raise UserError(f"every worker raised an error while starting, so an input is wrong: "
                            f"{self.raised_at_start[min(self.raised_at_start)]}")

    def _new(self, slot: int) -> Any:
        return self.actor.remote(self.data, [self.shared], worker_id=slot, threads=1, **self.load)  # nested: unresolved

    def _settle(self, calls: dict[Any, int]) -> None:
        for ref, slot in calls.items():
            try:
                self.info[slot] = self.ray.get(ref)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.RayTaskError) as e:
                died = isinstance(e, self.ray.exceptions.RayActorError)
                self.failed_at_start[slot] = _died(e) if died else f"worker failed while starting ({_raised(e)})"
                if not died or getattr(e, "actor_init_failed", False):  # raised, not killed
                    self.raised_at_start[slot] = _raised(e) if not died else _died(e)
                self.ray.kill(self.handles[slot], no_restart=True)

    @property
    def size(self) -> int:
        return len(self.handles)

    def submit(self, slot: int, trial: int, params: dict, seed: int, prune_below: float | None) -> Hashable:
        key = self.handles[slot].run.remote(params, seed, prune_below, trial=trial)
        self.calls[key] = slot
        return key

    def start(self, slot: int) -> Hashable:
        self.ray.kill(self.handles[slot], no_restart=True)
        self.info.pop(slot, None)
        self.handles[slot] = self._new(slot)
        key = self.handles[slot].prepare.remote()
        self.starts[key] = slot
        return key

    def wait(self, keys: list[Hashable], timeout: float | None = None) -> tuple[Hashable, TrialResult | Started] | None:
        ready, _ = self.ray.wait(keys, num_returns=1, timeout=timeout)
        if not ready:
            return None
        key = ready[0]
        if key in self.starts:
            slot = self.starts.pop(key)
            try:
                self.info[slot] = self.ray.get(key)
                return key, Started(slot, True, self.info[slot])
            except self.ray.exceptions.RayActorError as e:
                return key, Started(slot, False, reason=_died(e))
            except self.ray.exceptions.RayTaskError as e:
                return key, Started(slot, False, reason=f"worker failed while starting ({_raised(e)})")
        slot = self.calls.pop(key)
        try:
            return key, self.ray.get(key)
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.OutOfMemoryError) as e:
            return key, TrialResult.died(slot, _died(e))
        except self.ray.exceptions.RayTaskError as e:  # the trial raised (CUDA out of memory, say): it failed
            return key, TrialResult(state="fail", worker=slot, reason=_raised(e))

    def workers(self) -> list[dict[str, Any]]:
        return [self.info[s] for s in sorted(self.info)]

    def close(self) -> None:
        for w in self.handles:
            self.ray.kill(w, no_restart=True)
