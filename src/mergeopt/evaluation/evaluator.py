"""One evaluator interface: given a resident model and tokenizer, a flat dict of metrics.

Built once per worker (lm-eval model wrapper, tasks, prompt sets, judge), then called per candidate.
Multi-fidelity: a fixed, seeded subset of every set can be scored first and the rest after, so the
search can stop a hopeless candidate early; the full result is the union of both stages."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

from ..errors import UserError
from .assets import EvalAssets
from .helpfulness import LmEvalHelpfulness
from .judges import Label
from .prompt_format import apply_prompt_format
from .safety import SafetyScorer


class MetricError(Exception):
    """A metric came back NaN or inf: the trial fails with this reason, the study goes on."""


@dataclass
class Partial:
    """Raw per-item results of one stage, so stages can be combined exactly."""

    help: dict[str, list[float]] = field(default_factory=dict)  # lm-eval leaf task -> raw per-document values
    harmful: dict[str, list[Label]] = field(default_factory=dict)
    benign: dict[str, list[Label]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def __add__(self, other: Partial) -> Partial:
        def cat(a: dict, b: dict) -> dict:
            return {k: a.get(k, []) + b.get(k, []) for k in sorted(set(a) | set(b))}

        secs = {k: self.seconds.get(k, 0.0) + other.seconds.get(k, 0.0) for k in set(self.seconds) | set(other.seconds)}
        return Partial(cat(self.help, other.help), cat(self.harmful, other.harmful), cat(self.benign, other.benign), secs)


def _split_indices(n: int, fraction: float | None, seed: int, key: str) -> tuple[list[int], list[int]]:
    idx = list(range(n))
    if not fraction:
        return idx, []
    rng = random.Random(f"{seed}/{key}")
    rng.shuffle(idx)
    k = max(1, round(fraction * n))
    return sorted(idx[:k]), sorted(idx[k:])


class Evaluator:
    def __init__(self, model, tokenizer, assets: EvalAssets, *, device: str = "cpu", engine=None):
        if not assets.tasks and not assets.harmful and not assets.benign:
            raise UserError(f"evaluation.{assets.split}: nothing to evaluate; name tasks or prompt files")
        self.assets = assets
        self.chat = apply_prompt_format(tokenizer, assets.chat_template, where="the evaluated model")
        self.helpfulness = (LmEvalHelpfulness(model, tokenizer, assets.tasks, assets.include_path,
                                              batch_size=assets.config.batch_size, device=device, chat=self.chat,
                                              lm=engine.lm_eval_model(tokenizer, batch_size=assets.config.batch_size)
                                              if engine is not None else None)
                            if assets.tasks else None)
        self.safety = SafetyScorer(model, tokenizer, assets, chat=self.chat, engine=engine, device=device)
        frac, seed = assets.config.subset_fraction, assets.config.subset_seed
        self.stages: dict[str, dict[str, dict[str, list[int]]]] = {"subset": {}, "rest": {}}
        sets = {"harmful": assets.harmful, "benign": assets.benign}
        sizes = {("help", leaf): n for leaf, n in self.helpfulness.sizes.items()} if self.helpfulness else {}
        sizes.update({(kind, lg): len(rows) for kind, per in sets.items() for lg, rows in per.items()})
        for (kind, lg), n in sizes.items():
            first, rest = _split_indices(n, frac, seed, f"{kind}/{lg}")
            self.stages["subset"].setdefault(kind, {})[lg] = first
            self.stages["rest"].setdefault(kind, {})[lg] = rest

    @property
    def multi_fidelity(self) -> bool:
        return bool(self.assets.config.subset_fraction)

    def _help_indices(self, stage: str) -> dict[str, list[int]] | None:
        return None if stage == "full" else self.stages[stage].get("help", {})

    def _prompt_rows(self, stage: str) -> tuple[list, list[tuple[str, str]]]:
        """The red-team and benign rows of a stage, and the (kind, language) of each."""
        sel = None if stage == "full" else self.stages[stage]
        rows, keys = [], []
        for kind, per in (("harmful", self.assets.harmful), ("benign", self.assets.benign)):
            for lg, items in per.items():
                chosen = items if sel is None else [items[i] for i in sel[kind][lg]]
                rows.extend(chosen)
                keys.extend([(kind, lg)] * len(chosen))
        return rows, keys

    def prepare(self, stages: list[str]) -> None:
        """Build, without calling the model, what every candidate's evaluation of these stages reuses:
        lm-eval's requests and encoded contexts, the formatted and encoded prompts. A worker does this at
        start-up, so no trial carries one-off costs."""
        for stage in stages:
            idx = self._help_indices(stage)
            if self.helpfulness is not None and (idx is None or any(idx.values())):
                self.helpfulness.prepare(idx)
            self.safety.prepare(self._prompt_rows(stage)[0])

    def run(self, stage: str = "full") -> Partial:
        """Score one stage: `subset`, `rest`, or `full` (everything, in one pass)."""
        part = Partial()
        if self.helpfulness is not None:
            t = time.perf_counter()
            idx = self._help_indices(stage)
            if idx is None or any(idx.values()):
                part.help = self.helpfulness.score(idx)
            part.seconds["helpfulness"] = time.perf_counter() - t
        t = time.perf_counter()
        rows, keys = self._prompt_rows(stage)
        labels = self.safety.label(rows, [kind for kind, _ in keys])
        for (kind, lg), lab in zip(keys, labels, strict=True):
            getattr(part, kind).setdefault(lg, []).append(lab)
        part.seconds["safety"] = time.perf_counter() - t
        return part

    def summarize(self, part: Partial) -> dict[str, float]:
        m: dict[str, float] = {}

        def mean(xs: list[float]) -> float:
            return sum(xs) / len(xs) if xs else float("nan")

        if part.help and self.helpfulness is not None:
            m.update(self.helpfulness.summarize(part.help))
        for name, kind, target in (("harm", "harmful", Label.COMPLIED), ("over_refusal", "benign", Label.REFUSED)):
            per = {lg: mean([float(x == target) for x in v]) for lg, v in getattr(part, kind).items() if v}
            if per:
                m.update({f"{name}/{lg}": v for lg, v in per.items()})
                m[name] = mean(list(per.values()))
        labels = [x for per in (part.harmful, part.benign) for v in per.values() for x in v]
        if labels:
            m["unusable"] = mean([float(x == Label.UNUSABLE) for x in labels])
        bad = [k for k, v in m.items() if not math.isfinite(v)]
        if bad:
            raise MetricError(f"metric {bad[0]} is NaN or inf")
        m.update({f"time/{k}_s": v for k, v in part.seconds.items()})
        return m

    def evaluate(self) -> dict[str, float]:
        return self.summarize(self.run("full"))
