"""Model references: the one place in the core that reaches the embedded zoo (`zoo:NAME`, `evaluation.zoo`).

A space file, a recipe or the command line names a model by a local folder (absolute, or relative to
the file that names it) or by `zoo:NAME` / `zoo-test:NAME`, a model of the embedded zoo (a plug-in of
the tests and the demo: it is built when missing). What is written for others to run (an exported
recipe, a mergekit config) holds absolute folders or Hub ids, never a `zoo:` reference."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import UserError

_ZOO = re.compile(r"zoo(?:-(test|default))?:(\w+)")


def is_zoo_ref(ref: str) -> bool:
    return _ZOO.fullmatch(ref) is not None


def resolve_model_path(ref: str) -> Path:
    """The folder a reference names; a zoo reference builds its zoo when missing."""
    m = _ZOO.fullmatch(ref)
    if m:
        from .zoo.plugin import model_folder

        try:
            return model_folder(m.group(1) or "default", m.group(2))
        except UserError as e:
            raise UserError(f"{ref}: {e}") from None
    return Path(ref).expanduser()


def unbuilt_zoo(space) -> str | None:
    """The size of an embedded zoo the space names that is not built yet (a run builds it), else None."""
    sizes = {m.group(1) or "default" for ref in (space.base_model, *(e.path for e in space.models))
             if (m := _ZOO.fullmatch(ref))}
    if space.evaluation.zoo:
        sizes.add(space.evaluation.zoo)
    if not sizes:
        return None
    from .zoo.build import zoo_dir

    return next((size for size in sorted(sizes) if not (zoo_dir(size, 0) / "zoo.json").exists()), None)


def zoo_evaluation(size: str, split: str) -> dict:
    """The embedded zoo's evaluation assets for `evaluation.zoo` (see mergeopt.zoo.plugin)."""
    from .zoo.plugin import evaluation

    return evaluation(size, split)


def zoo_reference_cards(size: str) -> dict[str, dict[str, float]]:
    """The embedded zoo's reference models' validation cards, to place beside a front."""
    from .zoo.plugin import reference_cards

    return reference_cards(size)


def anchor(ref: str | None, folder: Path) -> str | None:
    """A relative local path as an absolute one, relative to `folder` (the file that names it);
    zoo references and absolute paths unchanged."""
    if not ref or is_zoo_ref(ref):
        return ref
    p = Path(ref).expanduser()
    # normalised, symlinks kept: a model's default name is its folder's name as written
    return os.path.normpath(p if p.is_absolute() else Path(os.path.abspath(folder)) / p)


def portable(ref: str) -> str:
    """The reference as it is written for others: an absolute folder (a zoo model's own folder)."""
    return str(resolve_model_path(ref).resolve())
