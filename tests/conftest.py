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


class CliResult:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(*args: str) -> CliResult:
    """`mergeopt ARGS` in this process (no interpreter start-up): exit status, stdout and stderr.
    Tests that need process isolation (two processes, kills, Ray) use subprocesses instead."""
    import contextlib
    import io

    from mergeopt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:
            rc = int(e.code or 0)
    return CliResult(rc, out.getvalue(), err.getvalue())
