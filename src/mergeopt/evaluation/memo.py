"""Memos for what a worker's evaluation computes again for every candidate although it is a pure
function of inputs that repeat: encodings of the same prompts, decodings and judge labels of the same
answers, lm-eval's renderings and scores of the same documents."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any


class Memo:
    """Results by key, bounded: cleared whole when it outgrows `limit` (a search's working set is far
    below it; what is not resident comes back as new keys on every call and must not pile up)."""

    def __init__(self, limit: int = 200_000):
        self._values: dict[Hashable, Any] = {}
        self._limit = limit

    def get(self, key: Hashable, compute: Callable[[], Any], valid: Callable[[Any], bool] | None = None) -> Any:
        """The value kept for `key`, computed (and kept) when there is none or `valid` rejects it."""
        value = self._values.get(key, _MISSING)
        if value is _MISSING or (valid is not None and not valid(value)):
            if len(self._values) >= self._limit:
                self._values.clear()
            value = self._values[key] = compute()
        return value


_MISSING = object()


class DocMemo:
    """Values computed from a resident object (lm-eval's documents are kept as the same objects for the
    life of a worker): keyed by the object's id and an extra key, and checked against the object itself,
    so an id reused by a new object never hits."""

    def __init__(self, limit: int = 200_000):
        self._memo = Memo(limit)

    def get(self, doc: Any, extra: Hashable, compute: Callable[[], Any]) -> Any:
        return self._memo.get((id(doc), extra), lambda: (doc, compute()), valid=lambda held: held[0] is doc)[1]
