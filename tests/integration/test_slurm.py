"""Sweeps on the real local SLURM cluster (slurm/start.sh): arrays, parallelism, a 2-node
DeepSpeed trial, idempotent re-runs. Skipped when no cluster answers, except in CI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from qarac_dist.submit.sweep_dir import Manifest
from support import ROOT, logged_losses, tiny_config, wait_for, write_config



def _sweep(tmp_path, name, data_cache, **fields):
    base = tiny_config(data_cache, tmp_path / "unused", training={"max_steps": 4}, evaluation={"every_steps": 4})
    sweep = {"name": name, "base": base, "runs_dir": str(tmp_path / "runs"), "executor": "slurm",
             "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},  # not the checkout's (cwd=ROOT)
             "resources": {"time_min": 10, "max_parallel": 4}, **fields}
    path = tmp_path / f"{name}.yaml"
    write_config(path, sweep)
    return path


def _sweep_cli(path, *args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "qarac_dist.sweep", str(path), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return proc


def _squeue_running(name: str) -> int:
    out = subprocess.run(["squeue", "-h", "-r", "-n", name, "-t", "RUNNING", "-o", "%i"], capture_output=True,
                         text=True).stdout
    return len(out.split())


def _squeue_count(name: str) -> int:
    return len(subprocess.run(["squeue", "-h", "-r", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout.split())


def test_array_respects_its_parallelism_limit(cluster, tmp_path, data_cache):
    path = _sweep(tmp_path, "par", data_cache, grid={"training.seed": [0, 1, 2]},
                  resources={"time_min": 10, "max_parallel": 2})
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(_squeue_running("qarac-par"))
            time.sleep(0.3)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        proc = _sweep_cli(path, "--wait", "--no-preflight")
    finally:
        stop.set()
        watcher.join()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = Manifest.load(tmp_path / "runs" / "par")
    job_ids = [r.job_id for r in manifest.trials.values()]
    assert len({j.split("_")[0] for j in job_ids}) == 1, job_ids  # one array
    assert sorted(int(j.split("_")[1]) for j in job_ids) == [0, 1, 2]
    assert all(r.state == "COMPLETED" for r in manifest.trials.values())
    assert max(seen) == 2, seen  # the cluster has room for 3; SLURM holds it at 2
    assert "best trial:" in proc.stdout



def test_two_node_deepspeed_trial_matches_two_local_tasks(cluster, tmp_path, data_cache):
    two_nodes = _sweep(tmp_path, "nodes2", data_cache, resources={"nodes": 2, "tasks_per_node": 1, "time_min": 10})
    proc = _sweep_cli(two_nodes, "--wait", "--no-preflight")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    local = _sweep(tmp_path, "local2", data_cache, executor="local", resources={"tasks_per_node": 2, "time_min": 10})
    proc = _sweep_cli(local, "--no-preflight")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (slurm_trial,) = Manifest.load(tmp_path / "runs" / "nodes2").trials.values()
    (local_trial,) = Manifest.load(tmp_path / "runs" / "local2").trials.values()
    assert slurm_trial.id == local_trial.id  # same resolved config
    slurm_state = json.loads((tmp_path / "runs" / "nodes2" / "trials" / slurm_trial.id / "state.json").read_text())
    assert slurm_state["world_size"] == 2 and slurm_state["nodes"] == "node[1-2]"
    a = logged_losses(tmp_path / "runs" / "nodes2" / "trials" / slurm_trial.id)
    b = logged_losses(tmp_path / "runs" / "local2" / "trials" / local_trial.id)
    assert len(a) == 4 and a == pytest.approx(b, abs=1e-6)


def test_rerun_submits_nothing_twice_and_only_failed_trials_again(cluster, tmp_path, data_cache):
    """Submitted held (`--hold`), so the re-run meets both trials in the queue however fast they
    would end (on a fast machine both had ended before the check); released, one fails and one
    completes, and the next re-run submits the failed one alone."""
    path = _sweep(tmp_path, "rerun", data_cache, grid={"data.label_column": ["label", "no_such_column"]},
                  resources={"time_min": 10, "max_parallel": 4, "extra_sbatch": {"hold": True}})
    try:
        assert _sweep_cli(path).returncode == 0
        first = {r.id: r.job_id for r in Manifest.load(tmp_path / "runs" / "rerun").trials.values()}
        assert _squeue_count("qarac-rerun") == 2

        proc = _sweep_cli(path)  # while they wait in the queue
        assert "0 to run" in proc.stdout, proc.stdout + proc.stderr
        assert {r.id: r.job_id for r in Manifest.load(tmp_path / "runs" / "rerun").trials.values()} == first

        (array,) = {job.split("_")[0] for job in first.values()}
        subprocess.run(["scontrol", "release", array], check=True)
        wait_for(lambda: _squeue_count("qarac-rerun") == 0, 300, "both trials to end")
        status = subprocess.run([sys.executable, "-m", "qarac_dist.status", str(tmp_path / "runs" / "rerun")],
                                capture_output=True, text=True)
        assert status.returncode == 1, status.stdout  # one trial failed
        assert "no_such_column" in status.stdout and "COMPLETED" in status.stdout

        # After they ended: only the failed one again (preflight would now stop the broken trial
        # before it is submitted; this test is about re-runs).
        proc = _sweep_cli(path, "--no-preflight")
        assert "1 to run" in proc.stdout, proc.stdout + proc.stderr
        after = Manifest.load(tmp_path / "runs" / "rerun").trials.values()
        resubmitted = [r for r in after if r.job_id != first[r.id]]
        assert len(resubmitted) == 1 and resubmitted[0].overrides["data.label_column"] == "no_such_column"
        assert resubmitted[0].attempt == 2 and len(resubmitted[0].job_ids) == 2
        assert len(list((tmp_path / "runs" / "rerun" / "trials").iterdir())) == 2
    finally:
        subprocess.run(["scancel", "-n", "qarac-rerun"], check=False)  # the resubmitted trial waits held


def test_resources_the_cluster_cannot_satisfy_are_refused_in_one_line(cluster, tmp_path, data_cache):
    path = _sweep(tmp_path, "huge", data_cache, resources={"nodes": 5, "time_min": 10})
    proc = _sweep_cli(path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{path}: resources: sbatch refused the job:"), proc.stderr
    assert not (tmp_path / "runs").exists()
    assert _squeue_count("qarac-huge") == 0
