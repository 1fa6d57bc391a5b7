"""Peak memory of a process tree, to check a memory plan against what a study really uses: the driver,
the Ray services it started (raylet, which holds the plasma object store, gcs_server, the dashboard
and other helpers) and the Ray worker actors under the raylet.

Why PSS (proportional set size) and not RSS: Ray's object store is shared memory (a /dev/shm mapping)
that the raylet and every worker reading an object map, and the processes share library and file
pages too. RSS charges each shared page in full to every process that maps it, so summing RSS over
the tree counts the object store once per mapper. PSS splits each shared page evenly between the
processes mapping it, so the sum over a tree counts every resident page once (pages shared with
processes outside the tree are charged only their share). A page is charged only to the processes
that have faulted it in: a worker that maps an object but never reads part of it pays nothing for
that part.

What it does not see: pages of /dev/shm (or any tmpfs) that no process maps, for instance shared
memory a process created and unmapped without unlinking, still use RAM but are in nobody's PSS; nor
does the page cache of files that are read or written but not mapped. Processes that leave the tree
(re-parented daemons) are not followed. Sampling is periodic: a peak that rises and falls between two
samples is missed, so keep `interval` well under the time a phase lasts.

    python bench/pss.py [--pid PID] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import psutil

GIB = 2**30


def _name(p: psutil.Process) -> str:
    """A short name: the Ray process title (`ray::TrialWorker`, `ray::IDLE`), the executable's name
    (`raylet`, `gcs_server`), or for a Python process `python` and its script or module
    (`python:dashboard`)."""
    try:
        cmd = p.cmdline()
    except (psutil.Error, OSError):
        cmd = []
    try:
        name = p.name()
    except (psutil.Error, OSError):
        name = "?"
    first = cmd[0].split()[0] if cmd and cmd[0].strip() else ""
    if first.startswith("ray::"):
        return first.split(".")[0]  # "ray::TrialWorker.evaluate()" -> "ray::TrialWorker"
    exe = Path(first).name if first else name
    if exe.startswith("python") or name.startswith("python"):
        for i, arg in enumerate(cmd[1:], 1):
            if arg == "-m" and i + 1 < len(cmd):
                return f"python:{cmd[i + 1]}"
            if arg == "-c":
                break
            if arg.endswith(".py"):
                return f"python:{Path(arg).stem}"
        return "python"
    return exe or name


def tree_pss(pid: int | None = None) -> dict[int, tuple[str, int]]:
    """PSS in bytes, with a short name, of a process (this one by default) and all its descendants.
    Processes that vanish or deny access while being read are left out."""
    try:
        root = psutil.Process(pid if pid is not None else os.getpid())
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    out: dict[int, tuple[str, int]] = {}
    for p in procs:
        try:
            pss = p.memory_full_info().pss
        except (psutil.Error, OSError):
            continue
        out[p.pid] = (_name(p), int(pss))
    return out


class PeakPSS:
    """The peak, over time, of the summed PSS of a process tree, sampled every `interval` seconds by a
    daemon thread while the context is open, plus a sample on entry and one on exit.

    After exit: `peak_bytes` (the largest total seen), `at_peak` (the (name, bytes) of each process
    at that sample, largest first), `peak_gib`, `samples` and `seconds` (from entry to exit)."""

    def __init__(self, interval: float = 0.25, pid: int | None = None) -> None:
        self.interval = interval
        self.pid = pid if pid is not None else os.getpid()
        self.peak_bytes = 0
        self.at_peak: list[tuple[str, int]] = []
        self.samples = 0
        self.seconds = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def sample(self) -> int:
        """Take one sample now; returns its total."""
        procs = tree_pss(self.pid)
        total = sum(b for _, b in procs.values())
        with self._lock:
            self.samples += 1
            if total > self.peak_bytes:
                self.peak_bytes = total
                self.at_peak = sorted(procs.values(), key=lambda nb: -nb[1])
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakPSS:
        self._t0 = time.perf_counter()
        self._stop.clear()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="PeakPSS", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample()
        self.seconds = time.perf_counter() - self._t0

    def summary(self, top: int = 8) -> str:
        """`peak X GiB: name Y GiB, ...`, names that occur more than once grouped with a count."""
        groups: dict[str, list[int]] = {}
        for name, b in self.at_peak:
            groups.setdefault(name, []).append(b)
        parts = sorted(groups.items(), key=lambda kv: -sum(kv[1]))
        shown = [f"{n}{f' x{len(bs)}' if len(bs) > 1 else ''} {sum(bs) / GIB:.2f}" for n, bs in parts[:top]]
        return f"peak {self.peak_gib:.2f} GiB: " + ", ".join(shown)


def main() -> None:
    p = argparse.ArgumentParser(description="Peak PSS of a process tree over some seconds.")
    p.add_argument("--pid", type=int, default=None, help="root of the tree (default: this process)")
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--interval", type=float, default=0.25)
    a = p.parse_args()
    with PeakPSS(a.interval, a.pid) as peak:
        time.sleep(a.seconds)
    print(f"{peak.samples} samples over {peak.seconds:.1f} s, {peak.summary()}")


if __name__ == "__main__":
    main()
