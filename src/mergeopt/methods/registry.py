"""The merge-method registry: every method is declared once, by name, as a pure function of tensors
and parameters. Nothing here knows about files, Optuna or Ray."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import rng


@dataclass(frozen=True)
class TensorContext:
    """What a method may know about the tensor it merges: its name (which seeds its random masks), the
    recipe seed, an optional destination buffer to write into (saves a copy per candidate), and an
    optional memo for values derived from the task vectors alone (they do not change between trials)."""

    name: str
    seed: int = 0
    out: torch.Tensor | None = field(default=None, compare=False, repr=False)
    memo: dict | None = field(default=None, compare=False, repr=False)

    def destination(self, like: torch.Tensor) -> torch.Tensor:
        out = self.out
        if out is not None and out.shape == like.shape and out.dtype == like.dtype and out.device == like.device:
            return out
        return torch.empty_like(like)

    def remember(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if self.memo is None:
            return compute()
        full = (self.name, *key)
        if full not in self.memo:
            self.memo[full] = compute()
        return self.memo[full]

    def mask_key(self, model_index: int) -> tuple[int, int]:
        """The key of this tensor's random mask for one model, from (seed, tensor name, model index):
        the same mask whatever the tensor order, the process or the device the merge runs on."""
        return rng.mask_key(self.seed, self.name, model_index)


# base tensor, task vectors, per-model parameters, global parameters, context -> merged tensor
MethodFn = Callable[[torch.Tensor, list[torch.Tensor], list[dict[str, Any]], dict[str, Any], TensorContext], torch.Tensor]

REQUIRED = object()


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: MethodFn
    model_params: Mapping[str, Any]  # per-model parameter -> default (REQUIRED when none)
    global_params: Mapping[str, Any]  # shared parameter -> default
    random: bool = False  # draws masks: the recipe seed matters
    exact_models: int | None = None  # slerp: exactly one expert besides the base
    doc: str = ""
    mergekit_name: str | None = field(default=None)  # the same method's name in mergekit, if it has one
    paper: str = ""  # where the method comes from, as the model card cites it

    @property
    def mergekit_reproduces(self) -> bool:
        """Whether `mergekit-yaml` gives these weights from the exported config: mergekit has the method
        and it draws no random masks (mergekit seeds its masks differently)."""
        return self.mergekit_name is not None and not self.random

    def resolve_globals(self, given: Mapping[str, Any]) -> dict[str, Any]:
        return self._resolve(given, self.global_params, "parameter")

    def resolve_model(self, given: Mapping[str, Any]) -> dict[str, Any]:
        return self._resolve(given, self.model_params, "per-model parameter")

    def _resolve(self, given: Mapping[str, Any], defaults: Mapping[str, Any], what: str) -> dict[str, Any]:
        """Defaults filled in; unknown or missing required parameters raise KeyError with the message."""
        unknown = set(given) - set(defaults)
        if unknown:
            raise KeyError(f"unknown {what} {sorted(unknown)[0]!r} for method {self.name!r}; expected one of {sorted(defaults)}")
        out = {k: given.get(k, v) for k, v in defaults.items()}
        missing = [k for k, v in out.items() if v is REQUIRED]
        if missing:
            raise KeyError(f"method {self.name!r} needs {what} {missing[0]!r}")
        return out


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"merge method {spec.name!r} registered twice")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; expected one of {sorted(METHODS)}") from None
