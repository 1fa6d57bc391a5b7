"""A real two-node Ray cluster on this machine: a head (`ray start --head`) and a second node
(`ray start --address`), each with its own raylet and object store. A study joins it with --address;
both nodes run trials, and each node holds one copy of the base and task vectors, which its actors
map from that node's shared memory."""

from __future__ import annotations

import collections
import contextlib
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import zoo_test_space

RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")


@pytest.fixture(scope="module")
def two_node_cluster():
    if RAY is None:
        pytest.skip("the ray command is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus=2", "--object-store-memory=200000000", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                        "--include-dashboard=false", *common], check=True, capture_output=True, env=env, timeout=180)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.2", *common],
                       check=True, capture_output=True, env=env, timeout=180)
        yield f"127.0.0.1:{port}"
    finally:
        _stop_cluster(port)


def _stop_cluster(port: int) -> None:
    """Kill this cluster's processes only (its GCS, raylets, their workers and helpers all name the GCS
    port on their command line); `ray stop` would stop every Ray instance on the machine."""
    import psutil

    mine: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if f":{port}" in cmd or f"--gcs_server_port={port}" in cmd:
            with contextlib.suppress(psutil.Error):  # and the agents they started, which rename themselves
                mine.update({c.pid: c for c in [p, *p.children(recursive=True)]})
    mine_list = list(mine.values())
    for p in mine_list:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(mine_list, timeout=30)
    # `ray start` records the cluster for later `ray.init()` calls to join; remove that record as `ray stop` does
    current = Path("/tmp/ray/ray_current_cluster")
    if current.exists() and current.read_text().strip().endswith(f":{port}"):
        current.unlink()


def test_a_study_on_a_two_node_cluster_uses_both_nodes_with_one_copy_each(two_node_cluster: str, test_zoo: Path,
                                                                         tmp_path: Path):
    space = zoo_test_space(tmp_path, "twonode", n_trials=8, workers=4)
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "mergeopt.cli", "optimize", "--space", str(space), "--run-dir", str(run),
                        "--address", two_node_cluster, "--quiet", "--no-export"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    workers = json.loads((run / "workers.json").read_text())
    by_node = collections.defaultdict(list)
    for w in workers:
        by_node[w["node"]].append(w)
    assert len(workers) == 4 and len(by_node) == 2 and all(len(ws) == 2 for ws in by_node.values()), workers
    backing = {}
    for node, ws in by_node.items():
        assert all(w["shared_bytes"]["copied"] == 0 and w["shared_bytes"]["mapped"] > 0 for w in ws), ws
        # both actors of a node map the same bytes of the same shared-memory file: one copy per node
        assert ws[0]["shared_backing"] is not None and ws[0]["shared_backing"] == ws[1]["shared_backing"], ws
        backing[node] = ws[0]["shared_backing"]
    assert len(set(backing.values())) == 2  # each node has its own copy
    rows = list(csv.DictReader(open(run / "trials.csv")))
    assert sum(row["state"] == "COMPLETE" for row in rows) == 8
    assert {row["node"] for row in rows if row["state"] == "COMPLETE"} == set(by_node)  # both nodes ran trials


def test_a_local_study_starts_its_own_ray_while_a_cluster_runs_on_the_machine(two_node_cluster: str, test_zoo: Path,
                                                                              tmp_path: Path):
    """`ray.init()` joins a cluster that `ray start` left on the machine; without --address a study must
    start its own private instance instead (and not fail on num_cpus)."""
    space = zoo_test_space(tmp_path, "besidecluster", n_trials=2, workers=1)
    r = subprocess.run([sys.executable, "-m", "mergeopt.cli", "optimize", "--space", str(space), "--run-dir",
                        str(tmp_path / "run"), "--quiet", "--no-export"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    workers = json.loads((tmp_path / "run" / "workers.json").read_text())

    query = (f"import ray, json; ray.init(address={two_node_cluster!r}, logging_level='ERROR'); "
             "print(json.dumps([n['NodeID'] for n in ray.nodes()]))")
    info = subprocess.run([sys.executable, "-c", query], capture_output=True, text=True, timeout=300)
    cluster_nodes = set(json.loads(info.stdout.strip().splitlines()[-1]))
    assert len(cluster_nodes) == 2 and workers[0]["node"] not in cluster_nodes
