"""Packed jobs (resources.pack) on the real local SLURM cluster, whose nodes declare four dummy
GPUs each (slurm/start.sh): trials as srun steps of one allocation, each bound to its own GPU,
refilled as they end; preemption, a hard kill, and the local executor's runner."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import sqlite3
import subprocess
import urllib.request
from pathlib import Path

from qarac_dist.base.layout import SweepLayout
from qarac_dist.submit import claims
from qarac_dist.submit.sbatch import job_name
from qarac_dist.submit.sweep_dir import Manifest
from qarac_dist.track.mlflow_client import client
from qarac_dist.track.outbox import Outbox
from qarac_dist.track import usage
from qarac_dist.track.trial_dir import read_metrics
from support import fake_commands, OUTSIDE_S, run_sweep, slurm_seconds, table_rows, tiny_config, wait_for, write_config


def _sweep(tmp_path, name, data_cache, seeds, max_steps=4, checkpoint_every=None, executor="slurm", grid=None,
           repeats=1, **resources) -> Path:
    base = tiny_config(data_cache, tmp_path / "unused", training={"max_steps": max_steps},
                       evaluation={"every_steps": max_steps}, checkpointing={"every_steps": checkpoint_every})
    sweep = {"name": name, "base": base, "runs_dir": str(tmp_path / "runs"), "executor": executor,
             "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, "grid": grid or {"training.seed": seeds},
             "repeats": repeats,
             "resources": {"time_min": 10, "max_parallel": 2, "pack": 2, "gpus_per_node": 1, **resources}}
    path = tmp_path / f"{name}.yaml"
    write_config(path, sweep)
    return path


def _manifest(tmp_path, name) -> Manifest:
    return Manifest.load(tmp_path / "runs" / name)


def _stopped(manifest: Manifest, step: int) -> bool:
    """Every trial's rank 0 has frozen itself after `step` (QARAC_FAULT stop, train/faults.py):
    its marker is written, and its process is stopped."""
    for r in manifest.trials.values():
        status = r.trial_dir.status_of(r.attempt)
        if not (r.trial_dir.path / f".fault-stop-{step}-0").exists() or status is None:
            return False
        try:
            state = Path(f"/proc/{status.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            return False
        if state not in "tT":
            return False
    return True


def _gone(job: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job.split("_")[0], "-o", "%i"], capture_output=True, text=True)
    return out.returncode == 0 and not out.stdout.strip()


def _steps_logged(trial_dir) -> list[int]:
    return [row["step"] for row in read_metrics(trial_dir.metrics_file) if "loss" in row]


def _exited(proc: subprocess.Popen, within_s: float) -> bool:
    try:
        proc.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        return False
    return True


def _holding(path: Path, besides: set[int]) -> dict[int, str]:
    """Processes other than `besides` with `path` (or its journal) open: pid -> command line."""
    found = {}
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        pid = int(fd_dir.parent.name)
        if pid in besides:
            continue
        try:
            links = [os.readlink(fd) for fd in fd_dir.iterdir()]
            if any(link.startswith(str(path)) for link in links):
                found[pid] = (fd_dir.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def test_eight_trials_packed_two_per_job_on_both_nodes_reach_the_sqlite_store_once_and_never_open_it(
        cluster, tmp_path, data_cache):
    """Issue 37's cluster check: two jobs, one per node, each running two trials at once as steps
    bound to their own GPUs, refilled as they end; every trial logs each of 60 steps. Observed
    from outside while they run, no process but the driver (the one importer) holds the sqlite
    store open, and every point lands in it exactly once. The trials are 2 configurations x 4
    seeds (repeats, issue 36): packed per seed, recorded and chosen per configuration."""
    path = _sweep(tmp_path, "packed", data_cache, seeds=None, max_steps=60, max_parallel=4,
                  grid={"optimizer.lr": [1e-3, 3e-3]}, repeats=4)
    db = tmp_path / "mlflow.db"
    out, err = (open(tmp_path / name, "w") for name in ("driver.out", "driver.err"))
    sweep = subprocess.Popen(["python", "-m", "qarac_dist.sweep", str(path), "--no-preflight", "--wait"],
                             stdout=out, stderr=err, text=True)
    holders, trials_seen = {}, set()
    while not _exited(sweep, 0.5):  # sampled while the jobs run
        holders.update(_holding(db, {os.getpid(), sweep.pid}))
        manifest = _manifest(tmp_path, "packed")
        for r in (manifest.trials.values() if manifest else []):
            status = r.trial_dir.status_of(r.attempt)
            if status is not None and status.state == "RUNNING" and Path(f"/proc/{status.pid}").exists():
                trials_seen.add(r.id)
    out.close(), err.close()
    stdout, stderr = ((tmp_path / name).read_text() for name in ("driver.out", "driver.err"))
    assert sweep.returncode == 0, stdout + stderr
    assert not holders, holders
    assert len(trials_seen) >= 4, "too few trials observed running: the check above saw nothing"
    assert "an array of 2 job(s) of 2 trial(s) at once" in stdout
    manifest = _manifest(tmp_path, "packed")
    jobs = {j for r in manifest.trials.values() for j in r.job_ids}
    assert len(jobs) == 2 and all(r.state == "COMPLETED" and r.attempt == 1 for r in manifest.trials.values())
    wait_for(lambda: all(_gone(job) for job in jobs), what=f"jobs {jobs} to exit")
    found = claims.read(SweepLayout(tmp_path / "runs" / "packed"))
    assert {tid: c.outcome for tid, c in found.items()} == {tid: "COMPLETED" for tid in manifest.trials}
    steps = {tid: r.step for tid, r in manifest.trials.items()}
    assert len(set(steps.values())) == 8, steps
    for job in jobs:  # within a job: never more than two at once, and two at once for a while
        mine = {tid: c for tid, c in found.items() if c.job == job}
        at_once = [sum(c.started <= m.started < c.ended for c in mine.values()) for m in mine.values()]
        assert max(at_once) == 2, mine
    c = client(manifest.tracking_uri)
    runs = {tid: c.get_run(r.mlflow_run_id) for tid, r in manifest.trials.items()}
    assert {run.data.tags["nodes"] for run in runs.values()} == {"node1", "node2"}
    # SLURM bound a GPU to each step: trials that ran at the same time in a job saw different devices.
    assert {tid: run.data.tags["slurm_step"] for tid, run in runs.items()} == steps
    gpus = {tid: run.data.tags["cuda_visible_devices"] for tid, run in runs.items()}
    for tid, mine in found.items():
        simultaneous = [o for o, other in found.items() if o != tid and other.job == mine.job and
                        other.started < mine.started < other.ended]
        assert all(gpus[o] != gpus[tid] for o in simultaneous), (gpus, found)
    # Every point of every trial, once.
    for tid, run in runs.items():
        assert run.info.status == "FINISHED"
        for key in ("loss", "lr", "grad_norm"):
            assert sorted(m.step for m in c.get_metric_history(run.info.run_id, key)) == list(range(1, 61)), key
        assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "val_accuracy")) == [60]
    environment = c.download_artifacts(next(iter(runs.values())).info.run_id, "environment.json", str(tmp_path))
    assert "#SBATCH --array=0-1%2" in json.loads(open(environment).read())["sbatch"]  # the job's exact script
    rows = sqlite3.connect(db).execute("SELECT COUNT(*), COUNT(DISTINCT run_uuid || key || step) FROM metrics")
    total, distinct = rows.fetchone()
    assert total == distinct
    logs = [p for p in (tmp_path / "runs").rglob("*") if p.is_file() and p.suffix in (".out", ".err", ".log")]
    assert logs and not any("database is locked" in p.read_text(errors="replace") for p in logs)
    assert "database is locked" not in stdout + stderr
    # What it used (issue 39): each job held 2 GPUs and 2 cores for as long as SLURM says (less
    # what ran outside its runner's process), each trial 1 and 1 for the seconds its step's clock
    # recorded; what the jobs held and no step used is the sweep's idle slot time, on the parent.
    layout = SweepLayout(tmp_path / "runs" / "packed")
    held = slurm_seconds(jobs)
    allocated = {job: sum(e["seen"] - e["start"] for e in usage.entries(layout.job_usage(job))) for job in jobs}
    assert all(held[job] - OUTSIDE_S <= allocated[job] <= held[job] + 1 for job in jobs), (allocated, held)
    stepped = sum(e["seen"] - e["start"] for r in manifest.trials.values() for e in usage.entries(r.trial_dir.usage_file))
    idle = 2 * sum(allocated.values()) - stepped
    parent = c.get_run(manifest.mlflow_parent_run_id).data.metrics
    assert idle > 0 and math.isclose(parent["gpu_hours_idle"], idle / 3600, rel_tol=0.05), (parent, idle)
    assert math.isclose(parent["gpu_hours"], 2 * sum(allocated.values()) / 3600, rel_tol=0.05), (parent, allocated)
    assert math.isclose(parent["gpu_hours_completed"], stepped / 3600, rel_tol=0.05), (parent, stepped)
    # Status shows the step that ran each trial, and the idle slots.
    status = subprocess.run(["python", "-m", "qarac_dist.status", str(tmp_path / "runs" / "packed")],
                            capture_output=True, text=True)
    assert {row["trial"]: row["job"] for row in table_rows(status.stdout)} == steps, status.stdout
    assert f"idle packed slots {parent['gpu_hours_idle']:.3f}" in status.stdout
    # Per configuration: its run holds its 4 seeds' runs and their mean; the parent names the
    # configuration with the best mean, as status does.
    verdict = c.get_run(manifest.mlflow_parent_run_id).data
    assert set(manifest.configurations) == {r.configuration for r in manifest.trials.values()} and \
        len(manifest.configurations) == 2
    shown = {row["configuration"]: row for row in table_rows(status.stdout, table=1)}
    assert set(shown) == set(manifest.configurations), status.stdout
    for configuration, run_id in manifest.configurations.items():
        seeds = {tid: run for tid, run in runs.items() if manifest.trials[tid].configuration == configuration}
        assert len(seeds) == 4 and all(run.data.tags["mlflow.parentRunId"] == run_id for run in seeds.values())
        values = [run.data.metrics["best_val_accuracy"] for run in seeds.values()]
        figures = c.get_run(run_id).data.metrics
        assert figures["seeds_finished"] == 4 and math.isclose(figures["best_val_accuracy"], sum(values) / 4)
        assert shown[configuration]["accuracy mean ± std (n/K)"].startswith(f"{sum(values) / 4:.4f} ± ")
        assert shown[configuration]["accuracy mean ± std (n/K)"].endswith("(4/4)")
    chosen = verdict.tags["best_configuration"]
    assert shown[chosen][""] == "*" and verdict.tags["best_configuration_run_id"] == manifest.configurations[chosen]
    assert manifest.trials[verdict.tags["best_trial"]].configuration == chosen
    # The UI command imports while it is open: a point recorded once the UI answers is in the store
    # within its 10 s round (with a loaded machine's margin), and Ctrl-C stops both.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = subprocess.Popen(["python", "-m", "qarac_dist.ui", str(tmp_path / "runs" / "packed"), "--port", str(port)],
                          stdout=open(tmp_path / "ui.log", "w"), stderr=subprocess.STDOUT,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(lambda: _answers(f"http://127.0.0.1:{port}/health"), 120, "the UI to answer", interval=0.5)
    trial = next(iter(manifest.trials.values()))
    Outbox(trial.trial_dir.path).write(["late_metric", 1.5, 1, 61])
    wait_for(lambda: c.get_metric_history(trial.mlflow_run_id, "late_metric"), 60, "the UI's import")
    ui.send_signal(signal.SIGINT)
    assert ui.wait(timeout=60) == 0, (tmp_path / "ui.log").read_text()
    assert not _answers(f"http://127.0.0.1:{port}/health")


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except OSError:
        return False


def test_a_preempted_packed_job_saves_requeues_and_resumes_its_own_trials(cluster, no_requeue_delay, tmp_path,
                                                                           data_cache):
    # Both trials freeze after step 12 (SIGSTOP, past the checkpoint of step 10), so neither ends
    # before the signal however fast or loaded the machine; SIGCONT lets them take it.
    path = _sweep(tmp_path, "preempted", data_cache, seeds=[0, 1], max_steps=120, checkpoint_every=5)
    assert run_sweep(path, "--no-preflight", env={"QARAC_FAULT": "stop:12:0"}).returncode == 0
    manifest = _manifest(tmp_path, "preempted")
    (job,) = {j for r in manifest.trials.values() for j in r.pack_jobs}
    wait_for(lambda: _stopped(manifest, 12), what="both trials frozen after step 12")
    # SLURM's warning goes to the job's steps, not to the batch shell (sbatch --signal without B:).
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    subprocess.run(["scancel", "--signal=CONT", job], check=True)
    proc = run_sweep(path, "--wait")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = _manifest(tmp_path, "preempted")
    for r in manifest.trials.values():
        status = r.trial_dir.status_of(r.attempt)
        assert r.state == "COMPLETED" and r.attempt == 1 and r.job_ids == [job], r
        assert status.starts == 2 and status.resumed_from is not None and status.resumed_from >= 5, status
        assert _steps_logged(r.trial_dir) == list(range(1, 121))  # resumed where it saved: no gap, no repeat
    log = "".join(p.read_text() for p in (tmp_path / "runs" / "preempted" / "submitit").rglob("*_log.out"))
    assert log.count(f"job {job} preempted; its trials saved; requeued") == 1, log


def test_a_packed_job_killed_without_warning_has_its_trials_resumed_by_a_rerun(cluster, tmp_path, data_cache):
    # Both trials freeze after step 12 (SIGSTOP, past the checkpoint of step 10): neither ends
    # before the kill however fast or loaded the machine.
    path = _sweep(tmp_path, "killed", data_cache, seeds=[0, 1], max_steps=120, checkpoint_every=5)
    assert run_sweep(path, "--no-preflight", env={"QARAC_FAULT": "stop:12:0"}).returncode == 0
    manifest = _manifest(tmp_path, "killed")
    (job,) = {j for r in manifest.trials.values() for j in r.pack_jobs}
    wait_for(lambda: _stopped(manifest, 12), what="both trials frozen after step 12")
    # A controller that times out is no proof the job is gone: the re-run stops, submitting nothing.
    timeout = "slurm_load_jobs error: Socket timed out on send/recv operation"
    path_env = fake_commands(tmp_path / "bin", squeue=f'echo "{timeout}" >&2; exit 1')
    before = (tmp_path / "runs" / "killed" / "manifest.json").read_bytes()
    proc = run_sweep(path, "--no-preflight", env={"PATH": path_env})
    assert proc.returncode == 75 and proc.stderr.strip() == (
        f"squeue failed ({timeout}): the jobs' states are unknown, so none was taken for gone"), proc.stderr
    assert (tmp_path / "runs" / "killed" / "manifest.json").read_bytes() == before
    mine = subprocess.run(["squeue", "-h", "-n", job_name("killed"), "-o", "%i"], capture_output=True, text=True)
    assert mine.stdout.split() == [job]  # nothing submitted again
    subprocess.run(["scancel", "--full", "--signal=KILL", job], check=True)  # every process, the batch shell too
    wait_for(lambda: _gone(job), what=f"job {job} to leave the queue")
    proc = run_sweep(path, "--no-preflight", "--wait")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 to run" in proc.stdout, proc.stdout
    manifest = _manifest(tmp_path, "killed")
    for r in manifest.trials.values():
        status = r.trial_dir.status_of(r.attempt)
        assert r.state == "COMPLETED" and r.attempt == 2 and r.job_ids[0] == job and r.job_ids[-1] != job, r
        assert status.resumed_from is not None and status.resumed_from >= 5, status
        assert r.history[0].state in ("LOST", "PREEMPTED"), r.history
    wait_for(lambda: all(_gone(j) for j in manifest.trials[next(iter(manifest.trials))].pack_jobs),
             what="the new job to exit")
    found = claims.read(SweepLayout(tmp_path / "runs" / "killed"))
    assert all(c.attempt == 2 and c.outcome == "COMPLETED" for c in found.values()), found


def test_the_local_executor_runs_packed_trials_with_the_same_claims(tmp_path, data_cache):
    path = _sweep(tmp_path, "local", data_cache, seeds=[0, 1], executor="local", gpus_per_node=0)
    proc = run_sweep(path, "--no-preflight")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = _manifest(tmp_path, "local")
    found = claims.read(SweepLayout(tmp_path / "runs" / "local"))
    (runner,) = {c.job for c in found.values()}  # one job: ceil(max_parallel 2 / pack 2)
    assert all(r.state == "COMPLETED" and r.job_ids == [runner] for r in manifest.trials.values())
    assert sorted(r.step for r in manifest.trials.values()) == [f"{runner}.{k}" for k in range(2)]


def _search_sweep(tmp_path, name, data_cache, executor, trials=3, repeats=1, **resources) -> Path:
    base = tiny_config(data_cache, tmp_path / "unused", training={"max_steps": 4}, evaluation={"every_steps": 2})
    sweep = {"name": name, "base": base, "runs_dir": str(tmp_path / "runs"), "executor": executor,
             "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, "repeats": repeats,
             "search": {"sampler": "tpe", "trials": trials, "seed": 0, "params": {
                 "optimizer.lr": {"distribution": "loguniform", "low": 1.0e-4, "high": 1.0e-2},
                 "model.config.num_hidden_layers": {"distribution": "randint", "low": 1, "high": 2}}},
             "resources": {"time_min": 10, "max_parallel": 2, "pack": 2, **resources}}
    path = tmp_path / f"{name}.yaml"
    write_config(path, sweep)
    return path


def _each_slot_ran_once_with_its_recorded_values(tmp_path, name) -> Manifest:
    from qarac_dist.track import search_record

    layout = SweepLayout(tmp_path / "runs" / name)
    manifest = _manifest(tmp_path, name)
    record = search_record.read(layout)
    assert sorted(a.slot for a in record.asks) == [0, 1, 2]  # each asked once
    assert sorted(t.slot for t in record.tells) == [0, 1, 2] and {t.state for t in record.tells} == {"COMPLETE"}
    asked = {a.trial: a for a in record.asks}
    for tid, r in manifest.trials.items():
        assert r.state == "COMPLETED", r
        config = json.loads((r.trial_dir.path / "config.json").read_text())
        assert config["optimizer"]["lr"] == asked[tid].params["optimizer.lr"]
        assert config["model"]["config"]["num_hidden_layers"] == asked[tid].params["model.config.num_hidden_layers"]
        run = client(manifest.tracking_uri).get_run(r.mlflow_run_id)
        assert r.mlflow_run_id == asked[tid].run_id and float(run.data.params["optimizer.lr"]) == \
            asked[tid].params["optimizer.lr"]
        assert r.label.startswith(f"slot {r.slot}: ")
    return manifest


def test_a_local_search_asks_each_slot_when_it_starts_and_plots_its_history(tmp_path, data_cache):
    path = _search_sweep(tmp_path, "search", data_cache, "local")
    proc = run_sweep(path, "--no-preflight")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = _each_slot_ran_once_with_its_recorded_values(tmp_path, "search")
    artifacts = [a.path for a in client(manifest.tracking_uri).list_artifacts(manifest.mlflow_parent_run_id)]
    assert "search_history.png" in artifacts, artifacts


def test_a_local_search_with_repeats_runs_each_configurations_seeds_with_one_ask(tmp_path, data_cache):
    """2 configurations x 2 seeds: one ask per configuration, every seed trains with its values and
    its own seed, the sampler's history has one finished trial per configuration, and MLflow nests
    each seed's run under its configuration's run, which carries the values and the mean."""
    from qarac_dist.submit.search import history
    from qarac_dist.track import search_record
    from qarac_dist.track.sweep_runs import SEARCH_SLOT

    path = _search_sweep(tmp_path, "repeats", data_cache, "local", trials=2, repeats=2, max_parallel=4, pack=4)
    proc = run_sweep(path, "--no-preflight")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = _manifest(tmp_path, "repeats")
    record = search_record.read(SweepLayout(tmp_path / "runs" / "repeats"))
    assert sorted(a.slot for a in record.asks) == [0, 1] and all(len(a.seeds) == 2 for a in record.asks)
    assert [t.state for t in history(record)] == ["COMPLETE", "COMPLETE"]
    c = client(manifest.tracking_uri)
    for a in record.asks:
        seeds = [manifest.trials[tid] for tid in a.seeds]
        configs = [json.loads((r.trial_dir.path / "config.json").read_text()) for r in seeds]
        assert {cfg["optimizer"]["lr"] for cfg in configs} == {a.params["optimizer.lr"]}
        assert len({cfg["training"]["seed"] for cfg in configs}) == 2
        (configuration,) = {r.configuration for r in seeds}
        run = c.get_run(manifest.configurations[configuration])
        assert run.data.tags[SEARCH_SLOT] == str(a.slot) and "best_val_loss" in run.data.metrics
        assert float(run.data.params["optimizer.lr"]) == a.params["optimizer.lr"]
        assert all(c.get_run(r.mlflow_run_id).data.tags["mlflow.parentRunId"] == run.info.run_id for r in seeds)


def test_a_search_job_killed_while_asking_is_rerun_and_every_slot_ends_once(cluster, no_requeue_delay, tmp_path,
                                                                             data_cache):
    """The job is requeued (as SLURM preempts with PreemptMode=REQUEUE) while its runner waits
    for the record to ask for its first slot (this test holds the record's lock)."""
    from qarac_dist.base.lock import lock

    path = _search_sweep(tmp_path, "asking", data_cache, "slurm", gpus_per_node=1)
    layout = SweepLayout(tmp_path / "runs" / "asking")
    held = lock(layout.search)
    try:
        assert run_sweep(path, "--no-preflight").returncode == 0
        (job,) = {j for r in _manifest(tmp_path, "asking").trials.values() for j in r.pack_jobs}
        wait_for(lambda: any(c.job == job for c in claims.read(layout).values()), what="the job to claim a slot")
        subprocess.run(["scontrol", "requeue", job], check=True)
    finally:
        held.close()
    proc = run_sweep(path, "--wait")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_sweep(path, "--no-preflight", "--wait")  # run again: nothing to ask or run twice
    assert proc.returncode == 0 and "0 to run" in proc.stdout, proc.stdout + proc.stderr
    _each_slot_ran_once_with_its_recorded_values(tmp_path, "asking")


def test_steps_that_cannot_start_send_their_trials_back_to_the_queue(cluster, tmp_path, data_cache):
    """A bad node (srun: "Requested node configuration is not available") failed every waiting
    trial within seconds, each recorded FAIL, shown LOST with an empty error column. Now the job
    takes no more trials after 3 such steps in a row, their claims go back to the queue with
    nothing counted, and the job's error says why. (A fake srun on the job's PATH.)"""
    path = _sweep(tmp_path, "badnode", data_cache, seeds=[0, 1, 2])
    message = "srun: error: Unable to create step for job: Requested node configuration is not available"
    env = {"PATH": fake_commands(tmp_path / "bin", srun=f'echo "{message}" >&2; exit 1')}
    assert run_sweep(path, "--no-preflight", env=env).returncode == 0
    layout = SweepLayout(tmp_path / "runs" / "badnode")
    (job,) = {j for r in _manifest(tmp_path, "badnode").trials.values() for j in r.pack_jobs}
    wait_for(lambda: _gone(job), what=f"job {job} to exit")
    found = claims.read(layout)
    assert found and all(c.job is None and c.outcome is None for c in found.values()), found  # back in the queue
    manifest = _manifest(tmp_path, "badnode")
    assert all(r.trial_dir.status() is None for r in manifest.trials.values())  # no trial began
    status = subprocess.run(["python", "-m", "qarac_dist.status", str(layout.root)], capture_output=True, text=True)
    assert status.returncode == 1 and "steps in a row could not start" in status.stdout, status.stdout
    log = "".join(p.read_text() for p in layout.submitit.rglob("*_log.err"))
    # 3 in a row, or 4: a second step was in flight when the third failed (2 at once).
    assert re.search(rf"took no more trials: [34] steps in a row could not start \({re.escape(message)}", log), \
        log[-3000:]
    out = "".join(p.read_text() for p in layout.submitit.rglob("*_log.out"))
    assert out.count("could not start (exit 1); the trial goes back to the queue") in (3, 4), out

    # The node is recorded; the re-run's jobs keep away from it (--exclude), and the trials run.
    (bad,) = claims.bad_nodes(layout)
    assert bad in ("node1", "node2") and "Requested node configuration is not available" in claims.bad_nodes(layout)[bad]
    before = set(layout.submitit.rglob("*_submission.sh"))
    proc = run_sweep(path, "--no-preflight", "--wait")
    assert proc.returncode == 0 and f"excluded: {bad} (job {job}: " in proc.stdout, proc.stdout + proc.stderr
    (script,) = set(layout.submitit.rglob("*_submission.sh")) - before
    assert f"#SBATCH --exclude={bad}\n" in script.read_text()
    manifest = _manifest(tmp_path, "badnode")
    assert {r.state for r in manifest.trials.values()} == {"COMPLETED"}
    assert {r.trial_dir.status().nodes for r in manifest.trials.values()} == {"node1", "node2"} - {bad}
