"""Shared fixtures: the test-size zoo, built once per session (cached by its hash across sessions)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mergeopt._env import quiet_libraries

quiet_libraries()
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def zoo_root() -> Path:
    return Path(os.environ.get("MERGEOPT_ZOO_DIR", Path.home() / ".cache" / "mergeopt" / "zoo"))


@pytest.fixture(scope="session")
def test_zoo(zoo_root: Path) -> Path:
    from mergeopt.zoo import build_zoo

    return build_zoo("test", seed=0, root=zoo_root, progress=False)
