"""Shared fixtures: the test-size zoo, built once per session (cached by its hash across sessions)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

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


def zoo_test_space(tmp: Path, name: str, storage: str | None = None, **search) -> Path:
    """The embedded study's space file on the test-size zoo, written to TMP/NAME.yaml, with `search`
    settings overridden."""
    import yaml

    from mergeopt.space import SPACES_DIR

    data = yaml.safe_load((SPACES_DIR / "safety_multilingual.yaml").read_text())
    data.update(name=name, base_model="zoo-test:base")
    for m in data["models"]:
        m["path"] = m["path"].replace("zoo:", "zoo-test:")
    data["evaluation"]["zoo"] = "test"
    data["search"].update(search)
    if storage:
        data["storage"] = storage
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


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


def _postgres_bin() -> Path | None:
    import glob
    import shutil

    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server from the distribution's package, started for this session on a free
    local port in a throw-away data folder (as the `postgres` user when the tests run as root, since
    the server refuses root)."""
    import shutil
    import socket
    import subprocess
    import tempfile

    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL's server binaries (initdb) are not installed; .ci/run installs Debian's postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed: pip install 'mergeopt[postgres]'")
    root = Path(tempfile.mkdtemp(prefix="mergeopt-pg-", dir="/tmp"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"

    def pg(*cmd: str) -> None:
        r = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stdout[-1000:]} {r.stderr[-1000:]}")

    pg(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "mergeopt", "--no-sync")
    pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "start",
       "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off")
    try:
        pg(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mergeopt", "mergeopt")
        yield f"postgresql://mergeopt@127.0.0.1:{port}/mergeopt"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


ZOO_FORMAT = "<user> {prompt} <bot>"  # the zoo's prompt format; its tokenizers carry no chat template


def task_folder(zoo: Path, tmp: Path) -> Path:
    """The zoo's en and fr validation tasks, an en task over a 30-document slice (so a size-weighted mean
    differs from a plain one), and a group of the two en tasks aggregated by size, as lm-eval's MMLU is."""
    folder = tmp / "tasks"
    folder.mkdir()
    for lang in ("en", "fr"):
        src = zoo / "eval" / "lm_eval" / f"zoo_help_{lang}_validation.yaml"
        spec = yaml.safe_load(src.read_text())
        spec.pop("tag", None)
        spec["metadata"]["hub_dataset"] = f"example/zoo-help-{lang}"
        (folder / src.name).write_text(yaml.safe_dump(spec))
        if lang == "en":
            rows = Path(spec["dataset_kwargs"]["data_files"]["validation"]).read_text().splitlines()[:30]
            (folder / "small.jsonl").write_text("\n".join(rows) + "\n")
            spec.update(task="zoo_help_en_small", dataset_kwargs={"data_files": {"validation": str(folder / "small.jsonl")}})
            (folder / "small.yaml").write_text(yaml.safe_dump(spec))
    (folder / "group.yaml").write_text(yaml.safe_dump({
        "group": "zoo_help_en_group", "task": ["zoo_help_en_validation", "zoo_help_en_small"],
        "aggregate_metric_list": [{"metric": "exact_match", "aggregation": "mean", "weight_by_size": True}],
        "metadata": {"version": 1.0}}))
    return folder
