"""One concrete merge: mergekit's YAML (`models` with `model` and `parameters`, `merge_method`,
`base_model`, `parameters`, `dtype`) plus mergeopt's own keys (`seed`, `language` / `objective` tags,
`language_coefficients`, `objective_coefficients`). A search trial proposes one of these."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .methods import RESCALE_MODES, get_method
from .validation import load_yaml, parse_model

Value = float | bool | str | list[float]
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "fp32": "float32", "bf16": "bfloat16",
          "fp16": "float16"}


class RecipeModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Value] = Field(default_factory=dict)
    language: str | None = None
    objective: str | None = None


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[RecipeModel]
    parameters: dict[str, Value] = Field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] = "float32"
    out_dtype: Literal["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] | None = None
    seed: int = 0
    language_coefficients: dict[str, float] = Field(default_factory=dict)
    objective_coefficients: dict[str, float] = Field(default_factory=dict)
    layer_range: list[int] | None = None  # from mergekit's `slices:` form; must span every layer
    task_vectors: Literal["full", "int8"] = Field("full", description=(
        "how the search stored the task vectors: `int8` (placement: int8) rounds each to int8 with one "
        "float32 scale per row before merging, and the merge reproduces that rounding; mergeopt's own key"))

    @model_validator(mode="before")
    @classmethod
    def _mergekit_forms(cls, data: Any) -> Any:
        """mergekit's other spellings of the same whole-model merge: one slice whose sources all span the
        same layers (mergekit-evolve writes these), `tokenizer_source: base`, and `int8_mask`, which only
        changes how mergekit stores its masks. What would change the weights otherwise is refused."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("parameters"), dict):
            data["parameters"] = {k: v for k, v in data["parameters"].items() if k != "int8_mask"}
        source = data.pop("tokenizer_source", None)
        if source not in (None, "base"):
            raise ValueError(f"tokenizer_source: {source!r} is not supported; mergeopt copies the base model's "
                             "tokenizer (tokenizer_source: base)")
        if "slices" not in data:
            return data
        if "models" in data:
            raise ValueError("slices: give models or slices, not both")
        slices = data.pop("slices")
        if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
            raise ValueError("slices: mergeopt merges whole models; give one slice whose sources span every layer "
                             "(several slices, as in passthrough merges, are not supported)")
        sources = slices[0].get("sources")
        if not isinstance(sources, list) or not sources or not all(isinstance(s, dict) and "model" in s for s in sources):
            raise ValueError("slices[0].sources: expected a list of {model, layer_range, parameters}")
        ranges = {tuple(s.get("layer_range") or ()) for s in sources}
        if len(ranges) != 1:
            raise ValueError(f"slices[0].sources: the sources span different layers {sorted(ranges)}; "
                             "mergeopt merges whole models")
        data["models"] = [{k: v for k, v in s.items() if k != "layer_range"} for s in sources]
        span = ranges.pop()
        if span:
            data["layer_range"] = list(span)
        return data

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        try:
            get_method(v)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        return v

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        spec = get_method(self.merge_method)
        experts = self.experts()
        if self.merge_method != "linear" and not self.base_model:
            raise ValueError(f"method {self.merge_method!r} needs base_model")
        if spec.exact_models is not None and len(experts) != spec.exact_models:
            raise ValueError(f"method {self.merge_method!r} takes exactly {spec.exact_models} model(s) besides the base, "
                             f"got {len(experts)}")
        try:
            spec.resolve_globals({k: v for k, v in self.parameters.items() if k in spec.global_params})
            for m in experts:
                spec.resolve_model(self._model_params(m, spec))
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        unknown = set(self.parameters) - set(spec.global_params) - set(spec.model_params)
        if unknown:
            raise ValueError(f"unknown parameter {sorted(unknown)[0]!r} for {self.merge_method!r}; expected one of "
                             f"{sorted({*spec.global_params, *spec.model_params})}")
        rescale = self.parameters.get("rescale")
        if isinstance(rescale, str) and rescale not in RESCALE_MODES:
            raise ValueError(f"parameters.rescale must be one of {list(RESCALE_MODES)} or a boolean, got {rescale!r}")
        return self

    def _model_params(self, m: RecipeModel, spec) -> dict[str, Any]:
        """Per-model parameters with mergekit's precedence: the model's own, then top-level ones."""
        inherited = {k: v for k, v in self.parameters.items() if k in spec.model_params}
        return {**inherited, **m.parameters}

    def experts(self) -> list[RecipeModel]:
        """The models merged onto the base. The base itself, when listed, joins only a linear merge."""
        if self.merge_method == "linear":
            return list(self.models)
        return [m for m in self.models if m.model != self.base_model]

    def resolved_globals(self) -> dict[str, Any]:
        spec = get_method(self.merge_method)
        g = spec.resolve_globals({k: v for k, v in self.parameters.items() if k in spec.global_params})
        if "rescale" in g and isinstance(g["rescale"], bool):
            g["rescale"] = spec.global_params["rescale"] if g["rescale"] and spec.global_params["rescale"] != "none" \
                else ("inverse" if g["rescale"] else "none")
        return g

    def resolved_models(self) -> list[dict[str, Any]]:
        """Per-model parameters (values may still be per-layer lists) with the effective weight
        weight x language_coefficient[lang] x objective_coefficient[obj] (a missing tag contributes 1)."""
        spec = get_method(self.merge_method)
        out = []
        for m in self.experts():
            p = spec.resolve_model(self._model_params(m, spec))
            factor = self.language_coefficients.get(m.language, 1.0) if m.language else 1.0
            factor *= self.objective_coefficients.get(m.objective, 1.0) if m.objective else 1.0
            if "weight" in p and factor != 1.0:
                w = p["weight"]
                p["weight"] = [x * factor for x in w] if isinstance(w, list) else w * factor
            out.append(p)
        return out

    @property
    def torch_dtype(self) -> str:
        return DTYPES[self.dtype]

    @property
    def output_dtype(self) -> str:
        return DTYPES[self.out_dtype or self.dtype]

    def to_yaml(self) -> str:
        data = self.model_dump(exclude_defaults=False, exclude_none=True)
        if data.get("task_vectors") == "full":  # the default: a plain mergekit recipe
            data.pop("task_vectors")
        return yaml.safe_dump(data, sort_keys=False)


def load_recipe(path: str | Path) -> Recipe:
    """A recipe file, its relative model paths resolved against the file's folder."""
    from .refs import anchor

    recipe = parse_model(Recipe, load_yaml(path), str(path))
    folder = Path(path).absolute().parent
    data = recipe.model_dump()
    data["base_model"] = anchor(data.get("base_model"), folder)
    for m in data["models"]:
        m["model"] = anchor(m["model"], folder)
    return Recipe.model_validate(data)
