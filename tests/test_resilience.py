"""Resilience: a study killed at random points resumes with every finished trial, a worker killed
mid-trial is restarted and its trial retried, and the memory guard refuses what would not fit."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml

from mergeopt.space import SPACES_DIR


def _space(tmp: Path, name: str, **search) -> Path:
    data = yaml.safe_load((SPACES_DIR / "safety_multilingual.yaml").read_text())
    data.update(name=name, base_model="zoo-test:base")
    for m in data["models"]:
        m["path"] = m["path"].replace("zoo:", "zoo-test:")
    data["evaluation"]["zoo"] = "test"
    data["search"].update(search)
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _cmd(space: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mergeopt.cli", "optimize", "--space", str(space), "--run-dir", str(run), "--quiet",
            "--no-export", *extra]


def _complete(run: Path, name: str) -> dict[int, tuple]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{run / 'study.db'}")
    return {t.number: (tuple(sorted(t.params.items())), tuple(t.values))
            for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}


def test_sigkill_at_random_points_then_resume_keeps_every_finished_trial(test_zoo: Path, tmp_path: Path):
    space, run = _space(tmp_path, "killed", n_trials=10, workers=1), tmp_path / "run"
    rng = random.Random(7)
    seen: dict[int, tuple] = {}
    for _ in range(3):
        p = subprocess.Popen(_cmd(space, run, "--backend", "inline"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(6.0, 12.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        if (run / "study.db").exists():
            now = _complete(run, "killed")
            assert all(now.get(k) == v for k, v in seen.items())  # nothing finished is lost or changed
            seen = now
    r = subprocess.run(_cmd(space, run, "--backend", "inline"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    final = _complete(run, "killed")
    assert all(final.get(k) == v for k, v in seen.items())
    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{run / 'study.db'}")
    counted = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(counted) == 10
    interrupted = [t for t in study.trials if t.user_attrs.get("interrupted")]
    # every interrupted trial's parameters ran again, with the same seed
    for t in interrupted:
        if t.params:
            assert any(c.params == t.params and c.user_attrs["seed"] == t.user_attrs["seed"] for c in counted)


def _kill_a_worker_mid_trial(space: Path, run: Path) -> str | None:
    """One study with 2 Ray workers, one of which is SIGKILLed inside a trial; None when the study
    completed every trial and retried the interrupted ones with the same parameters and seed, else
    what went wrong."""
    p = subprocess.Popen(_cmd(space, run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed: list[int] = []
    deadline = time.time() + 120
    # Two kills, 4 s apart: a kill can land just as a trial ends (then Ray restarts an idle actor and
    # nothing needs retrying); two of them both missing a trial is very unlikely.
    while len(killed) < 2 and time.time() < deadline and p.poll() is None:
        out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if "ray::TrialWorker.run" in line:  # an actor inside a trial
                killed.append(int(line.split()[0]))
                os.kill(killed[-1], signal.SIGKILL)
                time.sleep(4.0)
                break
        time.sleep(0.05)
    _, err = p.communicate(timeout=300)
    if not killed:
        return "never saw a worker inside a trial"
    if p.returncode != 0:
        return f"optimize exited {p.returncode}: {err[-1500:]}"
    rows = list(csv.DictReader(open(run / "trials.csv")))
    died = [r for r in rows if r["state"] == "FAIL" and "worker died" in r["reason"]]
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    table = "\n".join(str((r["number"], r["state"], r["reason"], r["worker"], r["seed"])) for r in rows)
    if not died:
        return f"no trial recorded a worker death:\n{table}"
    if len(complete) != 10:
        return f"{len(complete)} complete trials, expected 10:\n{table}"
    for d in died:  # retried with the same parameters and seed
        if not any(c["seed"] == d["seed"] and all(c[k] == d[k] for k in c if k.startswith("param:")) for c in complete):
            return f"trial {d['number']} was not retried:\n{table}"
    return None


def test_killed_worker_is_restarted_and_its_trial_retried(test_zoo: Path, tmp_path: Path):
    """Real kills race with real trials, so the scenario runs up to twice (fresh run folders) and fails
    only when both attempts fail."""
    problems = []
    for attempt in range(2):
        space = _space(tmp_path, f"workerkill{attempt}", n_trials=10, workers=2)
        problem = _kill_a_worker_mid_trial(space, tmp_path / f"run{attempt}")
        if problem is None:
            return
        problems.append(problem)
    raise AssertionError("\n---\n".join(problems))


def test_memory_guard_refuses_too_many_workers(test_zoo: Path, tmp_path: Path):
    space = _space(tmp_path, "toomany", n_trials=2, workers=400)
    r = subprocess.run(_cmd(space, tmp_path / "run"), capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "400 worker(s) need about" in lines[0] and "use --workers" in lines[0]
    assert not (tmp_path / "run").exists()
