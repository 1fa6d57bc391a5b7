"""One worker in the driver's process: tests, debugging, a single worker without Ray. A call runs when
it is submitted, so the study is strictly sequential."""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from typing import Any

from ..result import TrialResult
from ..space import Space
from .pools import PhaseCallback, Started, WorkerPool


class InlinePool(WorkerPool):
    def __init__(self, space: Space, *, on_phase: PhaseCallback | None = None, **load: bool):
        from ..worker import TrialWorker

        (on_phase or (lambda _: None))("loading models")
        self.worker = TrialWorker(space.model_dump(mode="json", by_alias=True), worker_id=0, **load)
        (on_phase or (lambda _: None))("preparing evaluation")
        self.info = self.worker.prepare()
        self.results: dict[int, TrialResult | Started] = {}
        self.keys = itertools.count()

    @property
    def size(self) -> int:
        return 1

    def submit(self, slot: int, trial: int, params: dict, seed: int, prune_below: float | None) -> Hashable:
        key = next(self.keys)
        self.results[key] = self.worker.run(params, seed, prune_below, trial=trial)
        return key

    def wait(self, keys: list[Hashable], timeout: float | None = None) -> tuple[Hashable, TrialResult | Started] | None:
        key = keys[0]  # ran at submission: always ready
        return key, self.results.pop(key)

    def workers(self) -> list[dict[str, Any]]:
        return [self.info]

    def close(self) -> None:
        pass
