"""Fixtures. Helpers live in support.py (imported by the tests themselves)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from support import MlflowServer


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture
def mlflow_server(tmp_path):
    """A server of the test's own, for tests that stop and restart it."""
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_mlflow_server(tmp_path_factory):
    """One server per test process (xdist worker), started when a test first asks for it, for
    tests that leave it running: each test writes under an experiment named for itself. A
    server took 14-20 s to start in CI's fixture setup."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cluster():
    try:
        ok = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=20)
        states = ok.stdout.split() if ok.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        states = []
    if sum(s in ("idle", "mixed", "allocated") for s in states) < 2:
        if os.environ.get("CI"):
            pytest.fail("CI must start the local SLURM cluster (slurm/start.sh)")
        pytest.skip("no local SLURM cluster; run slurm/install.sh and slurm/start.sh")


@pytest.fixture
def no_requeue_delay():
    """SLURM makes a requeued batch job eligible only 2 minutes later (hard-coded); while a
    test runs, move those jobs' start time to now so the tests take seconds, not minutes. A job
    is released only once it has been pending for 5 s: released at once, it can be started
    while its previous run is still being torn down, and SLURM then kills it ("Job credential
    revoked")."""
    import threading
    import time

    stop = threading.Event()
    first_seen: dict[str, float] = {}

    def release():
        while not stop.is_set():
            out = subprocess.run(["squeue", "-h", "-r", "-t", "PD", "-o", "%i %r"], capture_output=True, text=True).stdout
            waiting = {job: reason.strip() for job, _, reason in (line.partition(" ") for line in out.splitlines())}
            for job, reason in waiting.items():
                if reason != "BeginTime":
                    continue
                first_seen.setdefault(job, time.monotonic())
                if time.monotonic() - first_seen[job] >= 5:
                    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
                    del first_seen[job]
            stop.wait(0.5)

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join()
