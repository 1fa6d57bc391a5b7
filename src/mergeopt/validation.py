"""Turn pydantic validation errors into one line that names the file, the key path and what was
expected, with a did-you-mean for misspelled keys."""

from __future__ import annotations

import difflib
import re
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


_UNION_TAG = re.compile(r"^(float|int|str|bool|none|list\[.*\]|dict\[.*\]|[A-Z]\w*|function-\w+\[.*\]|literal\[.*\])$")


def _pick_error(errors: list[dict]) -> dict:
    """For a value that fits no member of a union (`1.0` or `{low, high}`), the member it was meant
    for is the one whose error is not a plain type mismatch."""
    first_loc = [p for p in errors[0]["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p))]
    same = [e for e in errors if [p for p in e["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p))] [:len(first_loc)] == first_loc]
    meaningful = [e for e in same if not e["type"].endswith(("_type", "_parsing"))]
    return (meaningful or errors)[0]


def format_validation_error(source: str, model: type[BaseModel], err: ValidationError) -> str:
    errors = err.errors()
    # a misspelled key is both unknown and, under its right name, missing: the unknown one says which
    extra = [x for x in errors if x["type"] == "extra_forbidden"]
    e = extra[0] if extra else _pick_error(errors)
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p)))
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
