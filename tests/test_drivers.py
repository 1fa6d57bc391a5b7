"""One live driver per study, and how a driver stops: a second `optimize` on a study whose driver is alive
is refused on every storage backend; a dead driver's lease is taken over at once (a journal's stale lock
included); SIGTERM and SIGHUP stop a study as Ctrl-C does, with no trial left running; Optuna's
heartbeat on a database server retries a trial whose driver vanished, with its seed. Every fault is
injected at a named point (mergeopt/faults.py): a driver stops itself with SIGSTOP where the test needs it
alive and idle, so nothing here races."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
from conftest import zoo_test_space

S = optuna.trial.TrialState


def _storage(backend: str, request: pytest.FixtureRequest) -> str | None:
    if backend == "postgresql":
        return request.getfixturevalue("postgres_url")
    return "journal" if backend == "journal" else None


def _cmd(space: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mergeopt.cli", "optimize", "--space", str(space), "--run-dir", str(run), "--quiet",
            "--no-export", *extra]


def _env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MERGEOPT_FAULT"}
    if fault:
        env["MERGEOPT_FAULT"] = fault
    return env


def _run(space: Path, run: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(space, run, *extra), capture_output=True, text=True, timeout=300, env=_env(fault),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _study(space: Path, run: Path, storage: str | None) -> optuna.Study:
    from mergeopt.loop.storage import open_storage

    return optuna.load_study(study_name=space.stem, storage=open_storage(storage, run))


def _wait_stopped(proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until the process has stopped itself (SIGSTOP at its fault point): a state, not a duration."""
    deadline = time.monotonic() + timeout
    while psutil.Process(proc.pid).status() != psutil.STATUS_STOPPED:
        if proc.poll() is not None:
            raise AssertionError(f"the first driver ended (status {proc.returncode}) before its fault point: "
                                 f"{proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "the first driver never reached its fault point"
        time.sleep(0.1)


@pytest.mark.parametrize("backend", ["sqlite", "journal", "postgresql"])
def test_a_second_driver_on_a_live_study_is_refused_and_the_first_finishes(backend: str, request, test_zoo: Path,
                                                                           tmp_path: Path):
    storage = _storage(backend, request)
    space, run = zoo_test_space(tmp_path, f"twodrivers_{backend}", storage, n_trials=4, workers=1), tmp_path / "run"
    first = subprocess.Popen(_cmd(space, run, "--backend", "inline"), env=_env("driver:ask@3!STOP"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_stopped(first)
        before = [(t.number, t.state) for t in _study(space, run, storage).trials]
        second = _run(space, run, "--backend", "inline")
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
        assert "another optimize is running study" in lines[0] and f"pid {first.pid}," in lines[0], lines[0]
        assert f"host {os.uname().nodename}" in lines[0] and "since " in lines[0], lines[0]
        assert [(t.number, t.state) for t in _study(space, run, storage).trials] == before  # the second touched nothing
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    study = _study(space, run, storage)
    assert len(study.get_trials(states=(S.COMPLETE,))) == 4 and not study.get_trials(states=(S.RUNNING,))
    assert not study.user_attrs.get("driver_lease")  # released at the end


def test_a_dead_drivers_journal_is_resumed_at_once_without_lock_warnings(test_zoo: Path, tmp_path: Path):
    """kill -9 while the journal's lock file exists (a driver killed inside a write leaves it): the next
    driver finds the lease's holder dead, removes the lock and resumes, with no wait on Optuna's grace
    period and none of its warnings."""
    space, run = zoo_test_space(tmp_path, "journalkill", "journal", n_trials=4, workers=1), tmp_path / "run"
    r = _run(space, run, "--backend", "inline", fault="driver:tell@2")
    assert r.returncode == -9, r.stderr[-2000:]
    (run / "study.journal.lock").write_text("")  # what a kill inside a write leaves
    t0 = time.monotonic()
    r = _run(space, run, "--backend", "inline")
    waited = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.strip() == "", r.stderr  # no "taking longer than 10 seconds to acquire the lock" warnings
    assert not (run / "study.journal.lock").exists()
    study = _study(space, run, "journal")
    assert len(study.get_trials(states=(S.COMPLETE,))) == 4
    print(f"resumed after kill -9 with a stale journal lock in {waited:.1f} s")


@pytest.mark.parametrize(("signame", "status", "backend", "point"), [
    ("TERM", 143, "ray", "tell@2"),  # Ray replaces the driver's SIGTERM handler with a bare exit: ours must hold
    ("HUP", 129, "inline", "tell@2"),
    ("INT", 130, "inline", "ask@3"),  # between Optuna's ask and the hand-over: that trial is requeued too
])
def test_a_signal_stops_the_study_requeues_what_ran_and_says_how_to_resume(signame: str, status: int, backend: str,
                                                                           point: str, test_zoo: Path, tmp_path: Path):
    space, run = zoo_test_space(tmp_path, f"sig{signame.lower()}", n_trials=4, workers=2), tmp_path / "run"
    r = _run(space, run, "--backend", backend, fault=f"driver:{point}!{signame}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == status and len(lines) == 1, (r.returncode, r.stderr[-3000:])  # no Ray dump
    how = "interrupted" if signame == "INT" else f"stopped by SIG{signame}"
    assert how in lines[0] and "resume with: optimize --space" in lines[0], lines[0]
    study = _study(space, run, None)
    assert not study.get_trials(states=(S.RUNNING,))
    assert all(t.user_attrs.get("interrupted") for t in study.get_trials(states=(S.FAIL,)))
    assert not study.user_attrs.get("driver_lease")
    if signame == "TERM":  # the printed command resumes the study (the same for every signal)
        resume = shlex.split(lines[0].split("resume with: ")[1])  # optimize --space ... --run-dir ...
        r = subprocess.run([sys.executable, "-m", "mergeopt.cli", *resume, "--quiet", "--no-export", "--backend", "inline"],
                           capture_output=True, text=True, timeout=300, env=_env())
        assert r.returncode == 0, r.stderr[-2000:]
        assert len(_study(space, run, None).get_trials(states=(S.COMPLETE,))) == 4


def test_a_lease_from_another_host_is_live_until_its_beat_is_stale():
    from mergeopt.loop.lease import STALE_S, Holder, is_live

    now = time.time()
    elsewhere = Holder("another-host", 1, 0.0, "2026-01-01T00:00:00+00:00", now - 5, "t")
    assert is_live(elsewhere, now)
    assert not is_live(Holder(**{**elsewhere.__dict__, "beat": now - STALE_S - 1}), now)
    dead_here = Holder(os.uname().nodename, 2**22 + 12345, 0.0, "2026-01-01T00:00:00+00:00", now, "t")
    assert not is_live(dead_here, now)  # same host: a process that does not exist holds nothing, beat or not
    me = psutil.Process()
    assert is_live(Holder(os.uname().nodename, me.pid, round(me.create_time(), 2), "x", now - 10 * STALE_S, "t"), now)


def test_postgresql_retries_a_trial_whose_heartbeat_stopped_with_its_seed(postgres_url: str, monkeypatch):
    """Optuna's heartbeat on a database server: a RUNNING trial whose beats stop (its driver's node
    vanished) is failed by `fail_stale_trials`, enqueued again with its parameters and seed by Optuna's
    retry callback, and not counted as finished."""
    from mergeopt.loop import lease
    from mergeopt.loop.storage import open_storage
    from mergeopt.loop.store import finished

    monkeypatch.setattr(lease, "STALE_S", 1.0)  # the grace period, so the test waits 2 s instead of 60
    storage = open_storage(postgres_url, Path("/nonexistent"))
    assert storage.get_heartbeat_interval() == int(lease.BEAT_S)
    study = optuna.create_study(study_name="heartbeat", storage=storage)
    with pytest.warns(UserWarning, match="Heartbeat of storage"):  # mergeopt's ask silences it: it beats itself
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    trial.set_user_attr("seed", 1234)
    storage.record_heartbeat(trial._trial_id)
    time.sleep(2.5)  # past the 1 s grace period: stale whatever the machine's speed
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials()
    assert [t.state for t in trials] == [S.FAIL, S.WAITING]
    again = trials[1]
    assert again.params == trials[0].params and again.user_attrs["seed"] == 1234
    assert finished(study) == []


def test_cmaes_population_is_at_least_the_workers_and_the_dashboard_names_the_objectives(tmp_path: Path):
    from conftest import zoo_test_space as make

    from mergeopt.loop.samplers import make_sampler, metric_names
    from mergeopt.space import load_space

    wide = load_space(str(make(tmp_path, "wide", workers=32)))
    assert make_sampler(wide)._popsize == 32
    narrow = load_space(str(make(tmp_path, "narrow", workers=1)))
    assert 4 < make_sampler(narrow)._popsize < 32  # CMA-ES's own default, 4 + 3 ln(dimensions)
    fixed = load_space(str(make(tmp_path, "fixed", workers=32, population=12)))
    assert make_sampler(fixed)._popsize == 12
    assert metric_names(narrow) == ["combined"]
    assert metric_names(load_space(str(make(tmp_path, "mo", sampler="tpe")))) == ["helpfulness", "harm"]
    from mergeopt.loop.store import open_study

    assert open_study(narrow, tmp_path / "run").metric_names == ["combined"]  # what optuna-dashboard shows
