"""Resilience, with faults injected at named points (`MERGEOPT_FAULT`, mergeopt/faults.py) so that no
test races a real kill against a real trial: a driver killed with SIGKILL resumes with every finished
trial, a worker killed inside a trial is replaced and its trial retried with the same seed, a study
whose workers are all lost stops with exit status 3 and the command that resumes it, on every storage
backend; and the memory guard refuses what would not fit. Ctrl-C, SIGTERM and SIGHUP: tests/test_drivers.py."""

from __future__ import annotations

import csv
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import run_cli, zoo_test_space

BACKENDS = ["sqlite", "journal", "postgresql"]


def _storage(backend: str, request: pytest.FixtureRequest) -> str | None:
    if backend == "postgresql":
        return request.getfixturevalue("postgres_url")
    return "journal" if backend == "journal" else None


def _optimize(space: Path, run: Path, *extra: str, fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MERGEOPT_FAULT"}
    if fault:
        env["MERGEOPT_FAULT"] = fault
    cmd = [sys.executable, "-m", "mergeopt.cli", "optimize", "--space", str(space), "--run-dir", str(run), "--quiet",
           "--no-export", *extra]
    # A shell's background jobs (nohup, `&`, some CI runners) start with SIGINT ignored, and Python then
    # never raises KeyboardInterrupt: give the study the terminal's default, as a user's Ctrl-C finds it.
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _study(space: Path, run: Path) -> optuna.Study:
    from mergeopt.loop.storage import open_storage

    data = yaml.safe_load(space.read_text())
    return optuna.load_study(study_name=data["name"], storage=open_storage(data.get("storage"), run))


def _complete(study: optuna.Study) -> dict[int, tuple]:
    return {t.number: (tuple(sorted(t.params.items())), tuple(t.values), t.user_attrs["seed"])
            for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}


@pytest.mark.parametrize("backend", BACKENDS)
def test_driver_killed_at_chosen_points_resumes_with_every_finished_trial(backend: str, request, test_zoo: Path,
                                                                         tmp_path: Path):
    """SIGKILL after the 3rd recorded trial, then (resumed) right after asking a candidate, which
    leaves that trial RUNNING; the third run completes the study. Nothing finished is lost or
    changed, and the interrupted trial runs again with its parameters and seed."""
    name = f"driverkill_{backend}"
    space, run = zoo_test_space(tmp_path, name, _storage(backend, request), n_trials=6, workers=1), tmp_path / "run"
    r = _optimize(space, run, "--backend", "inline", fault="driver:tell@3")
    assert r.returncode == -9, r.stderr[-2000:]
    first = _complete(_study(space, run))
    assert len(first) == 3
    r = _optimize(space, run, "--backend", "inline", fault="driver:ask@2")
    assert r.returncode == -9, r.stderr[-2000:]
    study = _study(space, run)
    second = _complete(study)
    assert len(second) == 4 and all(second[k] == v for k, v in first.items())
    running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert len(running) == 1  # the candidate asked just before the kill
    r = run_cli("optimize", "--space", str(space), "--run-dir", str(run), "--quiet", "--no-export", "--backend", "inline")
    assert r.returncode == 0, r.stderr[-2000:]  # the last run in this process: no kill to survive
    study = _study(space, run)
    final = _complete(study)
    assert len(final) == 6 and all(final[k] == v for k, v in second.items())
    lost = study.trials[running[0].number]
    assert lost.state == optuna.trial.TrialState.FAIL and lost.user_attrs["interrupted"]
    assert any(c.params == lost.params and c.user_attrs["seed"] == lost.user_attrs["seed"]
               for c in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))


@pytest.mark.parametrize(("backend", "phase"), [("sqlite", "merge"), ("journal", "generation"), ("postgresql", "judge")])
def test_a_worker_killed_inside_a_trial_is_replaced_and_the_trial_retried(backend: str, phase: str, request,
                                                                          test_zoo: Path, tmp_path: Path):
    """One Ray worker, so that its replacement must run the rest of the study (with two, the other
    worker could finish it first, and what the replacement does would depend on timing)."""
    name = f"workerkill_{backend}"
    space, run = zoo_test_space(tmp_path, name, _storage(backend, request), n_trials=5, workers=1), tmp_path / "run"
    r = _optimize(space, run, fault=f"worker:{phase}@2")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(run / "trials.csv")))
    table = "\n".join(str((r["number"], r["state"], r["reason"], r["worker"], r["pid"], r["seed"])) for r in rows)
    died = [r for r in rows if r["state"] == "FAIL"]
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert [d["number"] for d in died] == ["2"] and "worker died (killed" in died[0]["reason"], table
    assert len(complete) == 5, table
    retry = [c for c in complete if c["seed"] == died[0]["seed"]]
    assert len(retry) == 1 and all(retry[0][k] == died[0][k] for k in died[0] if k.startswith("param:")), table
    before = {c["pid"] for c in complete if int(c["number"]) < 2}
    after = {c["pid"] for c in complete if int(c["number"]) > 2}
    assert len(before) == 1 and len(after) == 1 and before != after, table  # a new process took over


def test_a_study_whose_workers_are_all_lost_stops_with_status_3_and_resumes(test_zoo: Path, tmp_path: Path):
    """Every trial kills its worker; each worker is replaced once, then the study stops: one line that
    names the cause and the command to resume, exit status 3. That command then finishes the study."""
    space = zoo_test_space(tmp_path, "alllost", n_trials=4, workers=1, worker_restarts=1, restart_backoff=0.1)
    run = tmp_path / "run"
    r = _optimize(space, run, fault="worker:merge@*")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 3, r.stderr[-2000:]
    assert len(lines) == 1 and "every worker was lost" in lines[0] and "0 of 4 trials finished" in lines[0], r.stderr
    resume = lines[0].split("resume with: ")[1]
    assert resume.startswith("optimize --space") and str(run) in resume
    r = subprocess.run([sys.executable, "-m", "mergeopt.cli", *shlex.split(resume), "--quiet", "--no-export",
                        "--backend", "inline"], capture_output=True, text=True, timeout=300)  # the printed command
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(_complete(_study(space, run))) == 4


def test_no_worker_that_can_start_stops_the_study(test_zoo: Path, tmp_path: Path):
    space = zoo_test_space(tmp_path, "nostart", n_trials=2, workers=1, worker_restarts=1, restart_backoff=0.1)
    r = _optimize(space, tmp_path / "run", fault="worker:startup")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 3 and len(lines) == 1 and "every worker was lost" in lines[0], r.stderr


def test_an_error_every_worker_raises_while_starting_is_an_input_error(test_zoo: Path, tmp_path: Path):
    """A library's error inside the workers' start (an input the checks could not see) is that input's
    error, exit status 2 and nothing written, never "every worker was lost"."""
    space = zoo_test_space(tmp_path, "raisestart", n_trials=2, workers=1, worker_restarts=1, restart_backoff=0.1)
    r = _optimize(space, tmp_path / "run", fault="worker:startup!RAISE")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "every worker raised an error while starting" in lines[0] and "injected fault at startup" in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_memory_guard_refuses_too_many_workers(test_zoo: Path, tmp_path: Path):
    space = zoo_test_space(tmp_path, "toomany", n_trials=2, workers=400)
    r = _optimize(space, tmp_path / "run")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "400 worker(s): this node's host memory needs" in lines[0] and "use --workers" in lines[0]
    assert not (tmp_path / "run").exists()
