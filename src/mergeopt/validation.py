"""Turn pydantic validation errors into one line that names the file, the key path and what was
expected, with a did-you-mean for misspelled keys."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import UserError


def key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<top level>"


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at `loc` (for did-you-mean), walking nested pydantic models."""
    from typing import get_args

    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return []
        ann = fields[part].annotation
        current = None
        for cand in (ann, *get_args(ann), *[a for x in get_args(ann) for a in get_args(x)]):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                current = cand
                break
    return list(getattr(current, "model_fields", {})) if current is not None else []


def format_validation_error(source: str, model: type[BaseModel], err: ValidationError) -> str:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    where = key_path(loc)
    if e["type"] == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else (f"; expected one of {sorted(allowed)}" if allowed else "")
        return f"{source}: {where}: unknown key{hint}"
    msg = e["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{source}: {where}: {msg}"


def load_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: file not found")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{p}: malformed YAML{where}: {problem}") from None


def parse_model(model: type[BaseModel], data: Any, source: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(source, model, err)) from None
