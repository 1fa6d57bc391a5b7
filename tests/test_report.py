"""report.html and `mergeopt dashboard`: the page is self-contained (plotly.js inlined once, nothing
fetched), renders every panel in headless Chromium with no script error, and a panel that cannot be
drawn says so; the dashboard refuses a bad folder or a missing extra in one line, and serves a run's
study."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from conftest import run_cli, zoo_test_space

from mergeopt.space import Space

PANELS = ("pareto", "hypervolume", "importances", "parallel")
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
# Without the background-networking flags Chromium keeps trying the closed network and misbehaves.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=10000", "--disable-dev-shm-usage",
                  "--host-resolver-rules=MAP * ~NOTFOUND")
# Registered before plotly.js runs: a script error or a rejected promise (Plotly.newPlot's) is left on
# <html> for --dump-dom to show.
CATCH_ERRORS = ("<script>(function () { function note(m) { document.documentElement.setAttribute('data-js-error', "
                "String(m)); } window.addEventListener('error', function (e) { note(e.message); }); "
                "window.addEventListener('unhandledrejection', function (e) { note(e.reason); }); })();</script>")


@pytest.fixture(scope="module")
def run(test_zoo: Path, tmp_path_factory) -> Path:
    """A short study on the test zoo with the embedded space's own sampler (cmaes: one combined
    objective, so the front is drawn from the metrics, not the study's values)."""
    tmp = tmp_path_factory.mktemp("report")
    space = zoo_test_space(tmp, "report", n_trials=8, workers=1)
    r = run_cli("optimize", "--space", str(space), "--run-dir", str(tmp / "run"), "--backend", "inline", "--quiet",
                "--no-export")
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp / "run"


def _section(html: str, key: str) -> str:
    m = re.search(rf'<section id="{key}">(.*?)</section>', html, re.S)
    assert m, key
    return m.group(1)


def test_report_html_is_self_contained_with_plotly_js_once(run: Path):
    from plotly.offline import get_plotlyjs

    html = (run / "report.html").read_text()
    assert html.count(get_plotlyjs()[:300]) == 1  # inlined, once
    tags = re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", html, re.I)
    assert not [t for t in tags if re.search(r"\b(src|href)\s*=", t, re.I)], tags  # nothing loaded from anywhere
    for key in PANELS:
        assert f'id="{key}-plot"' in _section(html, key), key
    space = Space.model_validate(json.loads((run / "space.json").read_text()))
    assert space.search.sampler == "cmaes"
    # hover text of the front: trial, method, the recipe's parameters and the per-language metrics
    pareto = re.sub(r"\\u([0-9a-f]{4})", lambda m: chr(int(m.group(1), 16)), _section(html, "pareto"))  # JSON's escapes
    for text in ("<b>trial 0</b>", "<b>weight</b> · help_en ", "<b>helpfulness</b> = ", " · en ", " · fr ", "<b>harm</b> = "):
        assert text in pareto, text
    assert any(f"· {m}" in pareto for m in space.methods)


def test_a_panel_that_cannot_be_drawn_says_so_and_a_multi_objective_study_draws_them_all(run: Path):
    from mergeopt.report_html import build_report_html

    space = Space.model_validate(json.loads((run / "space.json").read_text()))
    recorded = optuna.load_study(study_name=space.name, storage=f"sqlite:///{run / 'study.db'}")
    done = recorded.get_trials(states=(optuna.trial.TrialState.COMPLETE,))

    def study(trials) -> optuna.Study:
        s = optuna.create_study(directions=[o.direction for o in space.objectives])  # as tpe/nsga2 record it
        s.add_trials([optuna.trial.create_trial(
            params=t.params, distributions=t.distributions, user_attrs=t.user_attrs,
            values=[t.user_attrs["metrics"][o.metric] for o in space.objectives]) for t in trials])
        return s

    one = build_report_html(space, study(done[:1]))
    assert "Not drawn: importances need at least 2 complete trials" in _section(one, "importances")
    for key in ("pareto", "hypervolume", "parallel"):
        assert f'id="{key}-plot"' in _section(one, key), key
    full = build_report_html(space, study(done))
    assert "Not drawn" not in full and all(f'id="{k}-plot"' in full for k in PANELS)


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed; .ci/run installs Debian's chromium")
def test_report_renders_every_panel_in_headless_chromium(run: Path, tmp_path: Path):
    page = tmp_path / "report.html"
    page.write_text((run / "report.html").read_text().replace("<head>", "<head>\n" + CATCH_ERRORS, 1))
    r = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    html_tag = re.search(r"<html\b[^>]*>", dom)
    assert html_tag and "data-js-error" not in html_tag.group(0), html_tag
    for key in PANELS:
        section = _section(dom, key)
        assert "js-plotly-plot" in section and 'class="main-svg"' in section, key  # drawn, not only a div
    shot = tmp_path / "shot.png"
    r = _chromium(tmp_path, "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri())
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    from PIL import Image, ImageStat

    img = Image.open(shot).convert("L")
    assert img.size == (1280, 2400)
    assert ImageStat.Stat(img).stddev[0] > 10  # not a blank page
    assert len(img.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50  # text, markers and lines, not a flat fill


def test_dashboard_refuses_a_folder_that_is_not_a_run_in_one_line(tmp_path: Path):
    r = run_cli("dashboard", str(tmp_path / "nowhere"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and str(tmp_path / "nowhere") in r.stderr and "not a run folder" in r.stderr


def test_dashboard_without_its_extra_says_how_to_install_it(run: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # `import optuna_dashboard` raises ImportError
    r = run_cli("dashboard", str(run))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "pip install 'mergeopt[dashboard]'" in r.stderr


LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost never goes through a proxy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(run: Path) -> tuple[subprocess.Popen, int, list | None, OSError | None]:
    """`mergeopt dashboard` on a free port, once it answers. A port taken between choosing it and the
    server binding it (it exits with its one-line error) is retried on another."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for _ in range(3):
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "mergeopt.cli", "dashboard", str(run), "--port", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline, studies, err = time.monotonic() + 90, None, None
        while studies is None and time.monotonic() < deadline and proc.poll() is None:
            try:  # the server is up once it answers; until then the connection is refused
                with LOCAL.open(f"http://127.0.0.1:{port}/api/studies", timeout=10) as resp:
                    studies = json.load(resp)["study_summaries"]
            except OSError as e:
                err = e
                time.sleep(0.5)
        if studies is None and proc.poll() == 2 and "cannot listen there" in proc.stderr.read():
            continue
        return proc, port, studies, err
    raise AssertionError("three free ports were all taken before the server bound them")


def test_dashboard_serves_the_run_study_until_stopped(run: Path):
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed: pip install 'mergeopt[dashboard]'")
    proc, port, studies, err = _serve(run)
    try:
        assert studies is not None, (proc.poll(), err)
        assert [s["study_name"] for s in studies] == ["report"]
        assert studies[0]["directions"] == ["maximize"]  # cmaes: the combined score
        with LOCAL.open(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}", timeout=30) as resp:
            detail = json.load(resp)
        assert len(detail["trials"]) == 8 and all("metrics" in str(t["user_attrs"]) for t in detail["trials"])
    finally:
        proc.terminate()
        try:
            out, errs = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, errs = proc.communicate()
    assert f"127.0.0.1:{port}/dashboard/" in out, (out, errs)
