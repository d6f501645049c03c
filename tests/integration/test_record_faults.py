"""The sweep's record under faults that hostile reviews found, with real processes: a second
start on a live trial directory, a runner that fails or is SIGKILLed while its trials train,
and a scheduler that does not answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from qarac_dist.base.layout import SweepLayout
from qarac_dist.submit import claims
from qarac_dist.submit.sweep_dir import Manifest
from qarac_dist.track.trial_dir import TrialDir, read_metrics
from support import HELPERS, ROOT, run_sweep, tiny_config, wait_for, write_config


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [HELPERS, os.environ.get("PYTHONPATH")])), **extra}


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return False
    return stat[0] != "Z"


def _logged(trial: TrialDir) -> list[int]:
    return [r["step"] for r in read_metrics(trial.metrics_file) if "loss" in r] if trial.metrics_file.exists() else []


def test_a_second_start_on_a_live_trial_directory_refuses_naming_the_holder(tmp_path, data_cache):
    """Whatever the bookkeeping says, one directory has one writer: the training job's rank 0
    holds its lock, and a second job refuses before writing anything there."""
    out = tmp_path / "out"
    # Slow steps (until the test makes `go`): the first job outlasts the second one's start-up.
    cfg = tiny_config(data_cache, out, training={"max_steps": 200, "log_every": 1}, evaluation={"every_steps": 200})
    cfg["model"] = {"factory": "faults:slow_steps", "factory_kwargs": {"seconds": 1.0, "until": str(tmp_path / "go")}}
    config = write_config(tmp_path / "c.yaml", cfg)
    first = subprocess.Popen([sys.executable, "-m", "qarac_dist.train", str(config)], cwd=ROOT, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        trial = TrialDir(out)
        wait_for(lambda: _logged(trial), what="the first job's first step")
        holder = trial.status()
        second = subprocess.run([sys.executable, "-m", "qarac_dist.train", str(config)], cwd=ROOT, env=_env(),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(f"{config}: {out}: another process is training this trial (pid {first.pid} on ")
        assert line.endswith("); a second one does not start. Wait for it to end, or stop it")
        assert "Traceback" not in second.stderr
        assert trial.status() == holder  # nothing written by the refused job
    finally:
        (tmp_path / "go").touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert TrialDir(out).status().state == "COMPLETED" and _logged(TrialDir(out)) == list(range(1, 201))


def _packed_local_sweep(tmp_path, data_cache) -> Path:
    base = tiny_config(data_cache, tmp_path / "unused", training={"max_steps": 40, "log_every": 1},
                       evaluation={"every_steps": 40}, checkpointing={"every_steps": 8})
    base["model"] = {"factory": "faults:slow_steps", "factory_kwargs": {"seconds": 1.0, "until": str(tmp_path / "go")}}
    sweep = {"name": "packed", "base": base, "runs_dir": str(tmp_path / "runs"), "executor": "local",
             "grid": {"training.seed": [0, 1]}, "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
             "resources": {"time_min": 10, "max_parallel": 2, "pack": 2}}
    return write_config(tmp_path / "packed.yaml", sweep)


def _trials(tmp_path) -> list[TrialDir]:
    return [r.trial_dir for r in Manifest.load(tmp_path / "runs" / "packed").trials.values()]


def _training_before_a_checkpoint(tmp_path) -> bool:
    trials = _trials(tmp_path)
    return all(_logged(t) and t.status().state == "RUNNING" for t in trials) and \
        any(t.status().last_checkpoint is None for t in trials)


def _past_a_new_checkpoint(tmp_path, after: dict) -> bool:
    for trial in _trials(tmp_path):
        status = trial.status()
        if status is None or status.state != "RUNNING" or (status.last_checkpoint or 0) <= after.get(trial.path, 0):
            return False
    return True


def _runner(layout: SweepLayout) -> int:
    (job,) = {c.job for c in claims.read(layout).values() if c.open}
    return int(job)


def test_a_local_runner_that_fails_or_is_killed_stops_its_trials_and_a_rerun_resumes_them(tmp_path, data_cache):
    """Two trials as steps of one local runner. (1) Its claims file is damaged under it (before
    a trial's first checkpoint, which the runner notes there): the runner stops, its trials save
    as on SLURM's warning and its job log says why. (2) Restored
    and re-run, the new runner is SIGKILLed: its ranks get SIGTERM from the kernel (parent-death
    signal), save and exit, so no orphan trains on beside the next start. (3) A re-run resumes
    both from where they saved and completes them."""
    path = _packed_local_sweep(tmp_path, data_cache)
    layout = SweepLayout(tmp_path / "runs" / "packed")
    driver = subprocess.Popen([sys.executable, "-m", "qarac_dist.sweep", str(path), "--no-preflight"], cwd=tmp_path,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: layout.manifest.exists() and _training_before_a_checkpoint(tmp_path), what="both trials training")
    runner = _runner(layout)
    good = layout.claims.read_bytes()
    layout.claims.write_text('{"t": "not a claim"}\n')  # what the runner reads before it takes the next trial
    wait_for(lambda: not _alive(runner), what="the runner to stop")
    driver.communicate(timeout=300)
    for trial in _trials(tmp_path):
        assert trial.status().state == "PREEMPTED", trial.status()
    log = "".join(p.read_text() for p in layout.submitit.glob(f"{runner}_0_log.err"))
    assert f"qarac_dist: job {runner} stops: DamagedFile: {layout.claims}: not a claims file" in log, log[-3000:]

    layout.claims.write_bytes(good)
    saved = {t.path: t.status().last_checkpoint for t in _trials(tmp_path)}
    driver = subprocess.Popen([sys.executable, "-m", "qarac_dist.sweep", str(path), "--no-preflight"], cwd=tmp_path,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: _past_a_new_checkpoint(tmp_path, saved), what="both trials past a new checkpoint")
    runner = _runner(layout)
    ranks = [t.status().pid for t in _trials(tmp_path)]
    os.kill(runner, signal.SIGKILL)
    wait_for(lambda: not any(_alive(pid) for pid in ranks), what="the killed runner's trials to stop")
    for trial in _trials(tmp_path):
        assert trial.status().state == "PREEMPTED", trial.status()
    driver.communicate(timeout=300)

    (tmp_path / "go").touch()
    stopped = {t.path: t.status().step for t in _trials(tmp_path)}
    proc = run_sweep(path, "--no-preflight", env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for r in Manifest.load(layout.root).trials.values():
        status = r.trial_dir.status_of(r.attempt)
        assert r.state == "COMPLETED" and status.resumed_from == stopped[r.trial_dir.path], (r, status)
        assert _logged(r.trial_dir) == list(range(1, 41))  # no gap, no step twice
